"""The fleet: N replica actors on a Ray cluster, one Prometheus endpoint, a clean stop.

The driver only starts, watches and stops replicas; all the work happens in the actors. Ray restarts a
replica that crashes (`max_restarts=-1`): its constructor runs again, reloads the model and rejoins the
consumer group, and the group rebalances; offsets not committed are redone (see workers/stream/s3_sink.py).
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import ray
import structlog
from prometheus_client import start_http_server

from workers.metrics import FleetCollector, FleetMetrics
from workers.stream.autoscale import Scaler, ScalingDecision, ScalingPolicy
from workers.stream.group_admin import LagProbe, remove_static_members
from workers.stream.replica import ReplicaActor
from workers.stream.replica_health import ActorState, LostReplicas, actor_health, live_nodes
from workers.settings import Settings

log = structlog.get_logger("ramplus.fleet")
NAMESPACE = "ramplus"
STOP_MARGIN_S = 20.0  # on top of drain_timeout_s: closing consumers, killing actors, leaving the group
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*): (.+)$", re.MULTILINE)


class ReplicaStartFailed(RuntimeError):
    """A replica's constructor raised (Ray does not restart those): the fleet cannot serve as configured."""


def start_failure(exc: BaseException) -> str:
    """The one line that says why a replica's constructor raised, out of Ray's traceback-laden message."""
    text = str(exc)
    found = _EXCEPTION_LINE.findall(text)
    if not found:
        return text.strip().splitlines()[-1] if text.strip() else type(exc).__name__
    name, message = found[-1]
    return f"{name.rsplit('.', 1)[-1]}: {message.strip()}"


def ensure_topics(settings: Settings, partitions: int = 4) -> None:
    """Create the request and dead-letter topics when missing (production clusters usually pre-create them)."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers.split(","), **settings.kafka.client_options)
    try:
        existing = set(admin.list_topics())
        wanted = [t for t in (settings.kafka.topic, settings.kafka.dead_letter_topic) if t not in existing]
        if wanted:
            try:
                admin.create_topics([NewTopic(t, partitions, 1) for t in wanted])
            except TopicAlreadyExistsError:
                pass
            log.info("topics.created", topics=wanted, partitions=partitions)
    finally:
        admin.close()


class Fleet:
    """Starts, watches, scales and stops the replicas (`watch_once` runs every `fleet.watch_interval_s`).

    Replica `i` is the group's static member `<group>-replica-<i>`. The watcher gives a lost replica's
    partitions to the others (workers/stream/replica_health.py) and, with `min_replicas`/`max_replicas`,
    sizes the fleet by the group's lag (workers/stream/autoscale.py).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        fleet = settings.fleet
        self.actors: dict[int, Any] = {}
        self.metrics = FleetMetrics()
        self.desired = fleet.initial_replicas
        self.lost = LostReplicas(fleet.lost_replica_grace_s)
        self.scaler = Scaler(ScalingPolicy(
            fleet.min_replicas or 1, fleet.max_replicas or 1, fleet.target_lag_per_replica,
            fleet.scale_up_delay_s, fleet.scale_down_delay_s,
        )) if fleet.scales else None
        self.lag_probe = LagProbe(settings.kafka)
        self._http: Any = None
        self._actor_cls: Any = None
        self._ready: set[int] = set()
        self._ready_refs: dict[int, Any] = {}
        self._retiring: dict[int, threading.Thread] = {}
        self._started_indices: set[int] = set()
        self._lock = threading.RLock()
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._lag_failed = False
        self.decisions: list[tuple[float, int, ScalingDecision]] = []  # (monotonic time, size before, decision)

    def connect(self) -> None:
        """Join the Ray cluster (or start a local one). Note: `ray.init` replaces the process's SIGTERM handler."""
        if not ray.is_initialized():
            ray.init(address=self.settings.fleet.ray_address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=True)

    def start(self, *, ready_timeout_s: float = 300, stop: threading.Event | None = None, watch: bool = True) -> bool:
        """Start the replicas and wait until each is ready; False if `stop` was set meanwhile.

        Then (with `watch`) the watcher thread runs until `stop()`: lost replicas, lag scaling, metrics.
        """
        fleet = self.settings.fleet
        self.connect()
        self._actor_cls = ray.remote(ReplicaActor).options(
            num_cpus=fleet.cpus_per_replica,
            num_gpus=fleet.gpus_per_replica,
            resources=dict(fleet.resources_per_replica) or None,
            max_restarts=-1,
            max_task_retries=-1,
            max_concurrency=4,  # stats/metrics/stop answer while the pipeline thread runs
        )
        with self._lock:
            for i in range(self.desired):
                self._spawn(i)
        waiting = dict(self._ready_refs)
        deadline = time.monotonic() + ready_timeout_s
        while waiting:  # in short waits, so that a stop request is not held up by a slow model load
            if stop is not None and stop.is_set():
                return False
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(waiting)} replica(s) not ready after {ready_timeout_s:g} s")
            done, _ = ray.wait(list(waiting.values()), num_returns=len(waiting), timeout=0.5)
            for i in [i for i, ref in waiting.items() if ref in done]:
                try:
                    ray.get(waiting.pop(i))  # a replica that failed to start raises here
                except ray.exceptions.RayActorError as exc:
                    if not getattr(exc, "actor_init_failed", False):
                        raise
                    raise ReplicaStartFailed(f"a replica failed to start: {start_failure(exc)}") from exc
                with self._lock:
                    self._ready.add(i)
                    self._ready_refs.pop(i, None)
        log.info("fleet.ready", replicas=len(self.actors), gpus_per_replica=fleet.gpus_per_replica, topic=self.settings.kafka.topic,
                 scaling=f"{fleet.min_replicas}..{fleet.max_replicas}" if fleet.scales else "fixed")
        self.metrics.desired.set(self.desired)
        if fleet.metrics_port:
            self.metrics.registry.register(FleetCollector(self.scrape_metrics))
            self._http = start_http_server(fleet.metrics_port, addr=fleet.metrics_host, registry=self.metrics.registry)
            log.info("fleet.metrics", port=fleet.metrics_port)
        if watch:
            self._watch_stop.clear()
            self._watcher = threading.Thread(target=self._watch_forever, name="ramplus-fleet-watch", daemon=True)
            self._watcher.start()
        return True

    def _spawn(self, index: int) -> None:
        payload = self.settings.model_dump(mode="json")
        actor = self._actor_cls.remote(payload, index)
        self.actors[index] = actor
        self._ready_refs[index] = actor.ready.remote()
        self._started_indices.add(index)

    # -- watching -----------------------------------------------------------------------------------------

    def _watch_forever(self) -> None:
        while not self._watch_stop.wait(self.settings.fleet.watch_interval_s):
            try:
                self.watch_once(time.monotonic())
            except Exception as exc:  # the watcher must outlive a GCS or broker hiccup
                log.warning("fleet.watch_failed", error=f"{type(exc).__name__}: {exc}")

    def watch_once(self, now: float) -> None:
        """One look at the replicas and the lag: give lost replicas' partitions away, scale, update metrics."""
        self._collect_ready()
        alive_nodes = live_nodes()
        pending = 0
        with self._lock:
            watched = {i: a for i, a in self.actors.items() if i not in self._retiring}
        for i, actor in watched.items():
            health = actor_health(actor, alive_nodes)
            if health.state is not ActorState.ALIVE or i not in self._ready:
                pending += 1
            reason = self.lost.seen(i, health, now, alive_nodes)
            if reason is not None:
                log.warning("fleet.replica_lost", replica=i, reason=reason, node=health.node_id,
                            detail="its partitions go to the other replicas now; it rejoins when Ray restarts it")
                remove_static_members(self.settings.kafka, [i], reason=f"replica {i} lost: {reason}")
                self.metrics.members_removed.inc()
        self.metrics.pending.set(pending)
        self.metrics.ready.set(len(watched) - pending)
        try:
            lag = self.lag_probe.measure()
            self._lag_failed = False
        except Exception as exc:  # the broker away: no scaling on a lag we cannot see
            if not self._lag_failed:
                log.warning("fleet.lag_unknown", error=f"{type(exc).__name__}: {exc}")
            self._lag_failed = True
            self.lag_probe.close()
            return
        self.metrics.lag.set(lag.records)
        if self.scaler is None:
            return
        decision = self.scaler.decide(len(watched), lag.records, lag.partitions, now)
        if decision is not None:
            self.decisions.append((now, len(watched), decision))
            self.scale_to(decision.replicas, decision.reason)

    def _collect_ready(self) -> None:
        with self._lock:
            refs = dict(self._ready_refs)
        if not refs:
            return
        done, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=0)
        for i, ref in refs.items():
            if ref not in done:
                continue
            try:
                ray.get(ref)
                with self._lock:
                    self._ready.add(i)
                log.info("fleet.replica_ready", replica=i)
            except Exception as exc:
                log.error("fleet.replica_start_failed", replica=i, error=start_failure(exc))
            with self._lock:
                self._ready_refs.pop(i, None)

    def scale_to(self, replicas: int, reason: str) -> None:
        """Grow with new replicas (pending until Ray finds them resources), or drain and retire the newest."""
        with self._lock:
            active = sorted(i for i in self.actors if i not in self._retiring)
            before = len(active)
            if replicas > before:
                free = [i for i in range(replicas + len(self._retiring)) if i not in self.actors]
                for i in free[: replicas - before]:
                    self._spawn(i)
            else:
                for i in active[replicas:]:
                    thread = threading.Thread(target=self._retire, args=(i,), name=f"ramplus-retire-{i}", daemon=True)
                    self._retiring[i] = thread
                    thread.start()
            self.desired = replicas
        direction = "up" if replicas > before else "down"
        self.metrics.scalings.labels(direction=direction).inc()
        self.metrics.desired.set(replicas)
        log.info("fleet.scaled", direction=direction, replicas_before=before, replicas=replicas, reason=reason)

    def _retire(self, index: int) -> None:
        """Drain (finish, write, commit, close), then leave the group: nothing lost, nothing redone."""
        actor = self.actors[index]
        timeout = self.settings.fleet.drain_timeout_s + STOP_MARGIN_S
        try:
            stats = ray.get(actor.stop.remote(), timeout=timeout)
            log.info("fleet.replica_retired", replica=index, tagged=stats.get("tagged", 0))
        except Exception as exc:  # not drained in time: what it did not commit is redone by the next owner
            log.warning("fleet.retire_failed", replica=index, error=f"{type(exc).__name__}: {exc}")
        try:
            ray.kill(actor, no_restart=True)
        except Exception as exc:  # already gone
            log.debug("fleet.kill_failed", error=str(exc))
        remove_static_members(self.settings.kafka, [index], reason=f"replica {index} scaled down")
        with self._lock:
            self.actors.pop(index, None)
            self._ready.discard(index)
            self._ready_refs.pop(index, None)
            self._retiring.pop(index, None)
            self._started_indices.discard(index)
            self.lost.forget(index)

    # -- reading ------------------------------------------------------------------------------------------

    def _current(self) -> list[tuple[int, Any]]:
        with self._lock:
            return sorted(self.actors.items())

    def scrape_metrics(self, timeout_s: float = 5.0) -> dict[str, bytes]:
        refs = {str(i): a.metrics.remote() for i, a in self._current()}
        out = {}
        for name, ref in refs.items():
            try:
                out[name] = ray.get(ref, timeout=timeout_s)
            except Exception:  # a replica restarting: it shows up again at the next scrape
                continue
        return out

    def stats(self, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        out = []
        for i, a in self._current():
            try:
                out.append(ray.get(a.stats.remote(), timeout=timeout_s))
            except Exception as exc:
                out.append({"replica": i, "alive": False, "error": type(exc).__name__})
        return out

    def pids(self) -> list[int]:
        return ray.get([a.pid.remote() for _, a in self._current()], timeout=60)

    def serve_forever(self, stop: threading.Event, report_every_s: float = 30.0) -> None:
        while not stop.wait(report_every_s):
            stats = self.stats()
            log.info("fleet.stats", tagged=sum(s.get("tagged", 0) for s in stats),
                     dead_letters=sum(s.get("dead_letters", 0) for s in stats),
                     alive=sum(1 for s in stats if s.get("alive")), replicas=len(stats), desired=self.desired,
                     not_ready=sum(1 for s in stats if s.get("alive") and not s.get("ready", True)))
            for s in stats:
                for u in s.get("undecodable", []):
                    log.warning("fleet.partition_undecodable", replica=s.get("replica"), **u)

    def stop(self) -> list[dict[str, Any]]:
        """Drain every replica (finish, write, commit, close its consumer), remove them, leave the group.

        Bounded: replicas drain in parallel for at most `drain_timeout_s`, and the whole stop takes at most
        `drain_timeout_s + STOP_MARGIN_S`, within the k8s manifest's termination grace period. A replica
        that does not answer in time is killed; what it had not committed is redone by the next owner.
        """
        deadline = time.monotonic() + self.settings.fleet.drain_timeout_s + STOP_MARGIN_S
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30)
            self._watcher = None
        with self._lock:
            retiring = list(self._retiring.values())
        for thread in retiring:
            thread.join(timeout=max(1.0, deadline - time.monotonic()))
        current = self._current()
        # Only replicas alive can drain; one that waits for a node (or restarts) has nothing to finish, and
        # a stop call would wait for it to start first.
        alive_nodes = live_nodes()
        gone = (ActorState.PENDING, ActorState.RESTARTING, ActorState.DEAD)  # UNKNOWN (GCS hiccup): try to drain it
        draining = [a for _, a in current if actor_health(a, alive_nodes).state not in gone]
        refs = [a.stop.remote() for a in draining]
        results: list[dict[str, Any]] = []
        for ref in refs:
            try:
                results.append(ray.get(ref, timeout=max(1.0, deadline - time.monotonic())))
            except Exception as exc:
                log.warning("fleet.stop_failed", error=f"{type(exc).__name__}: {exc}")
        for _, a in current:
            try:
                ray.kill(a, no_restart=True)
            except Exception as exc:  # already gone
                log.debug("fleet.kill_failed", error=str(exc))
        with self._lock:
            self.actors = {}
            self._ready.clear()
            self._ready_refs.clear()
        self.lag_probe.close()
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            thread.join(timeout=5)
            self._http = None
        if self._started_indices:
            # Static members never leave on close (so that a restarted replica takes its partitions back at
            # once): when the fleet stops, remove them, so that the group reassigns their partitions now
            # rather than a session timeout later (other consumers of the group, a smaller fleet next).
            remove_static_members(self.settings.kafka, sorted(self._started_indices), reason="fleet stopped")
        log.info("fleet.stopped", tagged=sum(r.get("tagged", 0) for r in results), drained=len(results), replicas=len(current))
        return results
