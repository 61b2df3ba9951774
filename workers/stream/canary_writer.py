"""The pipeline's canary side (workers/vocab/canary.py): which rows of a batch the canary scores, and
writing its lines next to the results that were written.

Best effort by design: the canary is an observation of the stream, not part of it. A failed canary write
is retried briefly, then counted and logged; it never holds a batch, a commit or the consumers' results.
"""

from __future__ import annotations

from typing import Any

import structlog
from tenacity import Retrying, stop_after_attempt, wait_fixed

from ramplus_core.tagging import ImageTags
from workers.errors import InputError
from workers.metrics import ReplicaMetrics
from workers.stream.ports import CanarySink
from workers.stream.records import TopicPartition
from workers.vocab.canary import Canary, CanaryBatch, CanaryLine, CanaryTally, chosen

log = structlog.get_logger("ramplus.canary")


class CanaryWriter:
    def __init__(self, sink: CanarySink, worker: str, metrics: ReplicaMetrics) -> None:
        self.sink, self.worker, self.metrics = sink, worker, metrics
        self.tally: CanaryTally | None = None

    def choose(self, canary: Canary | None, batch: list[Any]) -> CanaryBatch | None:
        """The rows of `batch` (the pipeline's `Prepared`) scored by `canary` too: requests that follow the
        active version (not pinned to another) whose id is chosen at the canary's fraction."""
        if canary is None:
            if self.tally is not None:  # stopped: its per-tag series go with it
                self.tally.clear_rates()
                self.tally = None
            return None
        rows = [n for n, p in enumerate(batch) if p.vocab is None and chosen(p.request.id, canary.fraction)]
        return CanaryBatch(canary, rows) if rows else None

    def write(self, canary: CanaryBatch, results: list[tuple[Any, ImageTags | InputError]], written: set[int]) -> None:
        """Lines for the rows whose results were written (`written`: ids of their `Prepared`)."""
        ref = canary.canary.ref
        if self.tally is None or self.tally.ref != ref:
            if self.tally is not None:
                self.tally.clear_rates()
            self.tally = CanaryTally(ref, self.metrics)
        by_partition: dict[TopicPartition, list[tuple[int, CanaryLine]]] = {}
        for n, canary_tags in canary.tags.items():
            prepared, active_tags = results[n]
            if id(prepared) not in written or isinstance(active_tags, InputError):
                continue
            record, request = prepared.record, prepared.request
            line = CanaryLine.of(active_tags, canary_tags, id=request.id, uri=request.uri, worker=self.worker, source=record.source)
            by_partition.setdefault(record.tp, []).append((record.offset, line))
        for tp, lines in by_partition.items():
            try:
                Retrying(stop=stop_after_attempt(3), wait=wait_fixed(0.2), reraise=True)(
                    self.sink.write, ref, tp, [o for o, _ in lines], [line.model_dump_json() for _, line in lines],
                )
            except Exception as exc:
                self.metrics.canary_write_failures.inc()
                log.warning("canary.write_failed", canary=ref, partition=tp[1], lines=len(lines), error=f"{type(exc).__name__}: {exc}")
                continue
            for _, line in lines:
                self.tally.observe(line)
