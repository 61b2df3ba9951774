"""Prometheus metrics: each replica keeps its own registry; the fleet serves them all on one endpoint.

Replicas are separate processes (Ray actors, possibly on other nodes), so the fleet driver pulls each
replica's exposition text and re-serves it with a `replica` label (`FleetCollector`): one scrape target,
and a restarted replica simply shows a counter reset, which Prometheus handles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ReplicaMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.images = Counter("ramplus_images_tagged", "Images tagged and written", registry=r)
        self.dead_letters = Counter("ramplus_dead_letters", "Requests sent to the dead-letter topic", ["kind"], registry=r)
        self.errors = Counter("ramplus_errors", "Failed attempts (retried) by stage", ["stage"], registry=r)
        self.batch_size = Histogram("ramplus_batch_size", "Images per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("ramplus_batch_seconds", "Forward pass time per batch", registry=r)
        self.latency = Histogram(
            "ramplus_end_to_end_seconds", "From the record's timestamp to its result in S3", buckets=LATENCY_BUCKETS, registry=r
        )
        self.in_flight = Gauge("ramplus_in_flight", "Records polled and not yet committable", registry=r)
        self.warmup_seconds = Gauge(
            "ramplus_warmup_seconds", "Compiling and warming up the model's batch sizes before joining the group (0: not compiled)",
            registry=r,
        )
        self.oldest_in_flight = Gauge(
            "ramplus_oldest_in_flight_seconds", "Age of the oldest record holding back a partition's commits", registry=r,
        )
        self.stuck = Counter(
            "ramplus_stuck_records", "Records in flight longer than RAMPLUS_FLEET__STUCK_AFTER_S (each reported once)",
            registry=r,
        )
        self.skipped = Counter(
            "ramplus_records_skipped", "Records committed with neither a result nor a dead letter (see the log)", ["reason"],
            registry=r,
        )
        self.dead_letters_cut = Counter(
            "ramplus_dead_letters_cut", "Dead letters sent without the record's value: the whole letter did not fit the topic",
            registry=r,
        )
        self.rebalances = Counter(
            "ramplus_partition_events", "Partitions assigned, revoked (handed over cleanly) or lost (evicted)", ["event"],
            registry=r,
        )
        self.rebalance_drain_seconds = Histogram(
            "ramplus_rebalance_drain_seconds", "How long a revocation waited for in-flight records",
            buckets=(0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r,
        )
        self.stale_dropped = Counter(
            "ramplus_stale_results_dropped", "Results not written: their partition moved to another replica meanwhile",
            registry=r,
        )
        self.replayed_skipped = Counter(
            "ramplus_replayed_records_skipped", "Records the Kafka client delivered again without our seek (not redone)",
            registry=r,
        )
        self.ownership_lapses = Counter(
            "ramplus_ownership_lapses", "Times writes were held: group membership not confirmed recently", registry=r,
        )
        self.writes_withdrawn = Counter(
            "ramplus_writes_withdrawn",
            "Result objects deleted again: their write was answered only after the membership lease ran out",
            registry=r,
        )
        self.undecodable = Gauge(
            "ramplus_partition_undecodable",
            "1 while a partition is paused at a batch the Kafka client cannot decode (its offset is the label)",
            ["topic", "partition", "offset"], registry=r,
        )
        self.ready = Gauge(
            "ramplus_replica_ready", "1 while the replica serves every partition it owns; 0 while one is paused undecodable",
            registry=r,
        )
        self.ready.set(1)
        self.lag = Gauge("ramplus_partition_lag", "Records behind the end of the partition", ["topic", "partition"], registry=r)
        self.vocab_switches = Counter("ramplus_vocab_switches", "Vocabulary versions switched to", registry=r)
        self.vocab_switch_seconds = Histogram(
            "ramplus_vocab_switch_seconds", "From noticing a new active version to using it (load + validate + swap)",
            buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16), registry=r,
        )
        self.vocab_refused = Counter("ramplus_vocab_refused", "Vocabulary versions refused", ["reason"], registry=r)
        self.vocab_cache = Counter(
            "ramplus_vocab_cache", "Lookups of vocabularies named by requests (hit/loaded/refused/unavailable/evicted)",
            ["outcome"], registry=r,
        )
        self.vocab_cache_size = Gauge("ramplus_vocab_cache_size", "Vocabularies kept loaded besides the active one", registry=r)
        # Canary vocabularies (workers/vocab/canary.py); `canary` is the candidate's name@version.
        self.canary_fraction = Gauge(
            "ramplus_canary_fraction", "Share of requests scored by the canary too; the series is gone once it stops",
            ["canary"], registry=r,
        )
        self.canary_images = Counter("ramplus_canary_images", "Images scored by the canary (and written)", ["canary"], registry=r)
        self.canary_agreement = Histogram(
            "ramplus_canary_agreement", "Per image: Jaccard of the active version's and the canary's tag sets", ["canary"],
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0), registry=r,
        )
        self.canary_positives = Counter(
            "ramplus_canary_positives", "Tags given to canary-scored images, by the active version and by the canary",
            ["canary", "side"], registry=r,
        )
        self.canary_tag_rate = Gauge(
            "ramplus_canary_tag_rate",
            "Per-tag positive rate on canary-scored images, for the tags whose rate changes most (bounded label set)",
            ["canary", "side", "tag"], registry=r,
        )
        self.canary_write_failures = Counter(
            "ramplus_canary_write_failures", "Canary result objects that could not be written (never holds the stream)",
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class FleetMetrics:
    """The driver's own metrics (no `replica` label): the fleet's size as the lag and Ray see it."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.desired = Gauge("ramplus_fleet_replicas_desired", "Replicas the fleet wants (lag scaling, or the fixed count)", registry=r)
        self.ready = Gauge("ramplus_fleet_replicas_ready", "Replicas started and consuming", registry=r)
        self.pending = Gauge(
            "ramplus_fleet_replicas_pending", "Replicas waiting for resources or loading (what a cluster autoscaler adds nodes for)",
            registry=r,
        )
        self.lag = Gauge("ramplus_fleet_lag_records", "Records of the topic the group has not committed", registry=r)
        self.scalings = Counter("ramplus_fleet_scalings", "Scaling decisions carried out", ["direction"], registry=r)
        self.members_removed = Counter(
            "ramplus_fleet_members_removed", "Static members of lost replicas removed from the group before their session timeout",
            registry=r,
        )


class FleetCollector:
    """A prometheus_client collector that re-serves replicas' metrics with a `replica` label."""

    def __init__(self, scrape: Callable[[], dict[str, bytes]]) -> None:
        self._scrape = scrape  # replica name -> exposition text

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for replica, text in self._scrape().items():
            for family in text_string_to_metric_families(text.decode("utf-8")):
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                for s in family.samples:
                    out.add_sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)
        return list(merged.values())
