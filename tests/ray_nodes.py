"""More Ray nodes on this machine for the session's cluster, and a node's death as it happens in production.

Each added node is its own raylet (own ports, own object store, its own custom resources), started the way
`ray start --address ...` starts one (ray.cluster_utils). `kill` sends SIGKILL to every process of the node,
found by PID (the node's own processes and every descendant of its raylet: workers, agents, the replicas
placed there), never by name, so that nothing else on the machine is touched.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import psutil
import ray

SLOT = "ramplus_test_slot"  # the custom resource that places one replica per added node


class RayNodes:
    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.added: list[Any] = []

    def add(self, *, num_cpus: float = 1, slots: int = 1) -> Any:
        node = self.cluster.add_node(num_cpus=num_cpus, resources={SLOT: slots} if slots else {})
        self.added.append(node)
        self.cluster.wait_for_nodes()
        return node

    def pids(self, node: Any) -> set[int]:
        own = {info.process.pid for infos in node.all_processes.values() for info in infos if info.process is not None}
        found = set(own)
        for pid in own:
            try:
                found.update(child.pid for child in psutil.Process(pid).children(recursive=True))
            except psutil.NoSuchProcess:
                continue
        return found

    def kill(self, node: Any) -> set[int]:
        """SIGKILL every process of `node` at once; returns their PIDs once all are gone."""
        pids = self.pids(node)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes of node {node.node_id[:12]} still alive 10 s after SIGKILL")
            time.sleep(0.1)
        self._forget(node)
        return pids

    def alive(self, node: Any) -> bool:
        return any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes())

    def _forget(self, node: Any) -> None:
        # The cluster's bookkeeping (and its reaping of the dead raylet): its processes are already gone.
        try:
            self.cluster.remove_node(node, allow_graceful=False)
        except Exception:  # noqa: BLE001 - the processes are dead; the bookkeeping is best effort
            self.cluster.worker_nodes.discard(node)
        if node in self.added:
            self.added.remove(node)

    def remove_all(self) -> None:
        for node in list(self.added):
            self.kill(node)
