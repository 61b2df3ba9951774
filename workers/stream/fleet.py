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
from prometheus_client import CollectorRegistry, start_http_server

from workers.metrics import FleetCollector
from workers.stream.replica import ReplicaActor
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
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.actors: list[Any] = []
        self._http: Any = None

    def connect(self) -> None:
        """Join the Ray cluster (or start a local one). Note: `ray.init` replaces the process's SIGTERM handler."""
        if not ray.is_initialized():
            ray.init(address=self.settings.fleet.ray_address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=True)

    def start(self, *, ready_timeout_s: float = 300, stop: threading.Event | None = None) -> bool:
        """Start the replicas and wait until each is ready; False if `stop` was set meanwhile."""
        fleet = self.settings.fleet
        self.connect()
        actor_cls = ray.remote(ReplicaActor).options(
            num_cpus=fleet.cpus_per_replica,
            num_gpus=fleet.gpus_per_replica,
            max_restarts=-1,
            max_task_retries=-1,
            max_concurrency=4,  # stats/metrics/stop answer while the pipeline thread runs
        )
        payload = self.settings.model_dump(mode="json")
        self.actors = [actor_cls.remote(payload, i) for i in range(fleet.replicas)]
        waiting = [a.ready.remote() for a in self.actors]
        deadline = time.monotonic() + ready_timeout_s
        while waiting:  # in short waits, so that a stop request is not held up by a slow model load
            if stop is not None and stop.is_set():
                return False
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(waiting)} replica(s) not ready after {ready_timeout_s:g} s")
            done, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=0.5)
            try:
                ray.get(done)  # a replica that failed to start raises here
            except ray.exceptions.RayActorError as exc:
                if not getattr(exc, "actor_init_failed", False):
                    raise
                raise ReplicaStartFailed(f"a replica failed to start: {start_failure(exc)}") from exc
        log.info("fleet.ready", replicas=fleet.replicas, gpus_per_replica=fleet.gpus_per_replica, topic=self.settings.kafka.topic)
        if fleet.metrics_port:
            registry = CollectorRegistry()
            registry.register(FleetCollector(self.scrape_metrics))
            self._http = start_http_server(fleet.metrics_port, addr=fleet.metrics_host, registry=registry)
            log.info("fleet.metrics", port=fleet.metrics_port)
        return True

    def scrape_metrics(self, timeout_s: float = 5.0) -> dict[str, bytes]:
        refs = {str(i): a.metrics.remote() for i, a in enumerate(self.actors)}
        out = {}
        for name, ref in refs.items():
            try:
                out[name] = ray.get(ref, timeout=timeout_s)
            except Exception:  # a replica restarting: it shows up again at the next scrape
                continue
        return out

    def stats(self, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        out = []
        for i, a in enumerate(self.actors):
            try:
                out.append(ray.get(a.stats.remote(), timeout=timeout_s))
            except Exception as exc:
                out.append({"replica": i, "alive": False, "error": type(exc).__name__})
        return out

    def pids(self) -> list[int]:
        return ray.get([a.pid.remote() for a in self.actors], timeout=60)

    def serve_forever(self, stop: threading.Event, report_every_s: float = 30.0) -> None:
        while not stop.wait(report_every_s):
            stats = self.stats()
            log.info("fleet.stats", tagged=sum(s.get("tagged", 0) for s in stats),
                     dead_letters=sum(s.get("dead_letters", 0) for s in stats),
                     alive=sum(1 for s in stats if s.get("alive")), replicas=len(stats),
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
        refs = [a.stop.remote() for a in self.actors]
        results: list[dict[str, Any]] = []
        for ref in refs:
            try:
                results.append(ray.get(ref, timeout=max(1.0, deadline - time.monotonic())))
            except Exception as exc:
                log.warning("fleet.stop_failed", error=f"{type(exc).__name__}: {exc}")
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception as exc:  # already gone
                log.debug("fleet.kill_failed", error=str(exc))
        stopped = len(self.actors)
        self.actors = []
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            thread.join(timeout=5)
            self._http = None
        if stopped and self.settings.kafka.static_membership:
            leave_group(self.settings, stopped)
        log.info("fleet.stopped", tagged=sum(r.get("tagged", 0) for r in results), drained=len(results), replicas=stopped)
        return results


def leave_group(settings: Settings, replicas: int) -> None:
    """Static members never leave on close (so that a restarted replica takes its partitions back at once):
    when the whole fleet stops, remove them, so that the group reassigns their partitions now rather than
    a session timeout later (other consumers of the group, a smaller fleet starting next)."""
    from kafka.admin import KafkaAdminClient, MemberToRemove

    k = settings.kafka
    instances = [f"{k.group_id}-replica-{i}" for i in range(replicas)]
    try:
        admin = KafkaAdminClient(bootstrap_servers=k.bootstrap_servers.split(","), request_timeout_ms=5_000, **k.client_options)
        try:
            answers = admin.remove_group_members(k.group_id, [MemberToRemove(group_instance_id=i) for i in instances])
        finally:
            admin.close()
        log.info("fleet.left_group", group=k.group_id, members={m: e.__name__ for m, e in answers.items()})
    except Exception as exc:  # the broker away: the members expire after session_timeout_ms anyway
        log.warning("fleet.leave_group_failed", group=k.group_id, error=f"{type(exc).__name__}: {exc}")
