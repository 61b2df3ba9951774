"""Canary vocabularies: score a fraction of live traffic with a candidate version before it is activated.

Control (Redis, next to the versions in `workers/vocab/store.py`):

    ramplus:vocab:{name}:canary      JSON CanaryConfig: the candidate version, the fraction, when it started
    ramplus:vocab:{name}:canaried    set: versions that ever ran as a canary (`activate` shows their report)
    channel ramplus:vocab:events     {"event": "canary_started"|"canary_stopped", "name", "version", "ts"}

Every replica following `name` loads the candidate (checked like any version) and, for the requests that
follow the active version and whose id hashes below the fraction, runs the tag head a second time with it
on the same image embeddings (the encoder runs once). The canary results go to their own S3 prefix, never
into the results consumers read; `CanaryReport` compares them with the active version's.

Which requests: a stable hash of the request id, so the same request is chosen by every replica, again
on a replay, and in an offline check; the fraction of a stream is the fraction of its ids below it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from ramplus_core.model import VocabularyTensors
from ramplus_core.tagging import ImageTags
from workers.schemas import SourceRef, utc_now
from workers.vocab.store import EVENTS, VocabStore, VocabStoreError, parse_ref

CANARY_HASH_SPACE = 2**64


def chosen(request_id: str, fraction: float) -> bool:
    """Whether a request is scored by the canary: blake2b of its id, read as a number in [0, 1)."""
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / CANARY_HASH_SPACE < fraction


def jaccard(a: Iterable[str], b: Iterable[str]) -> float:
    """Tag-set agreement: |a & b| / |a | b|; two empty sets agree completely."""
    sa, sb = set(a), set(b)
    union = sa | sb
    return 1.0 if not union else len(sa & sb) / len(union)


class CanaryConfig(BaseModel):
    version: str
    fraction: float = Field(gt=0, le=1)
    started_at: float = Field(default_factory=time.time)


@dataclass
class Canary:
    """A canary as a replica holds it: the candidate's tensors and the fraction of requests it scores."""

    vocab: VocabularyTensors
    fraction: float

    @property
    def ref(self) -> str:
        return self.vocab.vocabulary.ref


@dataclass
class CanaryBatch:
    """What one batch asks of the canary: the batch positions to score with it too. The engine fills `tags`
    (position -> the canary's answer), from the image embeddings the batch computed anyway."""

    canary: Canary
    rows: list[int]
    tags: dict[int, ImageTags] = field(default_factory=dict)


class CanaryLine(BaseModel):
    """One JSON line per image in the canary objects: both answers, side by side."""

    id: str
    uri: str
    active: str = Field(description="name@version the consumers' result was tagged with")
    canary: str = Field(description="name@version of the canary")
    active_tags: list[str]
    canary_tags: list[str]
    agreement: float = Field(description="Jaccard of the two tag sets")
    ts: Any = Field(default_factory=utc_now)
    worker: str
    source: SourceRef | None = None

    @classmethod
    def of(cls, active: ImageTags, canary: ImageTags, *, id: str, uri: str, worker: str,  # noqa: A002 - the field's name
           source: SourceRef | None) -> CanaryLine:
        a, c = active.names, canary.names
        return cls(id=id, uri=uri, active=active.vocab, canary=canary.vocab, active_tags=a, canary_tags=c,
                   agreement=jaccard(a, c), worker=worker, source=source)


class CanaryTally:
    """A replica's running comparison for one canary, exported as metrics: images, agreement, positives,
    and the per-tag rates of the `top` tags whose rate changes most (a bounded label set: a vocabulary of
    50,000 tags must not become 100,000 series). The full per-tag comparison is `CanaryReport`'s."""

    def __init__(self, ref: str, metrics: Any, *, top: int = 10, refresh_s: float = 5.0) -> None:
        self.ref, self.metrics, self.top, self.refresh_s = ref, metrics, top, refresh_s
        self.images = 0
        self.fired: dict[str, Counter[str]] = {"active": Counter(), "canary": Counter()}
        self._refreshed = 0.0

    def observe(self, line: CanaryLine) -> None:
        self.images += 1
        m = self.metrics
        m.canary_images.labels(canary=self.ref).inc()
        m.canary_agreement.labels(canary=self.ref).observe(line.agreement)
        for side, tags in (("active", line.active_tags), ("canary", line.canary_tags)):
            m.canary_positives.labels(canary=self.ref, side=side).inc(len(tags))
            self.fired[side].update(tags)
        if time.monotonic() - self._refreshed > self.refresh_s:
            self.refresh()

    def refresh(self) -> None:
        self._refreshed = time.monotonic()
        a, c = self.fired["active"], self.fired["canary"]
        changed = sorted(set(a) | set(c), key=lambda t: (-abs(c[t] - a[t]), t))[: self.top]
        self.clear_rates()
        for tag in changed:
            for side, fired in (("active", a), ("canary", c)):
                self.metrics.canary_tag_rate.labels(canary=self.ref, side=side, tag=tag).set(fired[tag] / self.images)

    def clear_rates(self) -> None:
        gauge = self.metrics.canary_tag_rate
        for labels in [s.labels for fam in gauge.collect() for s in fam.samples if s.labels.get("canary") == self.ref]:
            gauge.remove(labels["canary"], labels["side"], labels["tag"])


# -- control ------------------------------------------------------------------------------------------------


class CanaryControl:
    """Start, stop and read the canary of a vocabulary name (one at a time per name)."""

    def __init__(self, store: VocabStore) -> None:
        self.store = store

    def _key(self, name: str) -> str:
        return self.store._key(name, "canary")

    def start(self, ref: str, fraction: float, *, dim: int | None = None) -> CanaryConfig:
        """Checks the version first (loads it: checksum, shape, dimension, finiteness), so a candidate that
        cannot load is refused here and nothing changes. Raises VocabularyError/VocabStoreError."""
        name, version = parse_ref(ref)
        if version is None:
            raise VocabStoreError(f"{ref}: name the candidate version (name@version)")
        if version == self.store.active_version(name):
            raise VocabStoreError(f"{ref} is the active version: a canary compares another version with it")
        self.store.load(name, version, dim=dim)
        config = CanaryConfig(version=version, fraction=fraction)
        self.store.redis.set(self._key(name), config.model_dump_json())
        self.store.redis.sadd(self.store._key(name, "canaried"), version)
        self._event("canary_started", name, version)
        return config

    def stop(self, name: str) -> CanaryConfig | None:
        """Stops the canary of `name`; returns what it was (None: there was none)."""
        config = self.get(name)
        self.store.redis.delete(self._key(name))
        if config is not None:
            self._event("canary_stopped", name, config.version)
        return config

    def was_canaried(self, name: str, version: str) -> bool:
        """Whether `name@version` ever ran as a canary (its results may be in S3)."""
        return bool(self.store.redis.sismember(self.store._key(name, "canaried"), version))

    def get(self, name: str) -> CanaryConfig | None:
        raw = self.store.redis.get(self._key(name))
        return None if raw is None else CanaryConfig.model_validate_json(raw)

    def _event(self, event: str, name: str, version: str) -> None:
        self.store.redis.publish(EVENTS, json.dumps({"event": event, "name": name, "version": version, "ts": time.time()}))


# -- report -------------------------------------------------------------------------------------------------


class TagRate(BaseModel):
    tag: str
    active: float | None = Field(description="Share of images the active version gave this tag (None: not in it)")
    canary: float | None = Field(description="Share of images the canary gave this tag (None: not in it)")

    @property
    def change(self) -> float:
        return (self.canary or 0.0) - (self.active or 0.0)


class CanaryReport(BaseModel):
    canary: str
    active: list[str] = Field(description="Active versions the canary was compared with")
    images: int
    agreement_mean: float | None
    agreement_quantiles: dict[str, float] = Field(description="p10, p50, p90 of per-image agreement")
    agreement_histogram: list[int] = Field(description="Images per agreement decile [0, 0.1), ..., [0.9, 1.0]")
    largest_changes: list[TagRate]
    never_fired: list[str] = Field(description="Canary tags no image was given")
    never_fired_count: int
    positives_per_image: dict[str, float]

    @classmethod
    def of(cls, canary: str, lines: Iterable[CanaryLine], *, canary_tags: Sequence[str] | None = None,
           active_tags: Sequence[str] | None = None, top: int = 20) -> CanaryReport:
        """From the canary lines (the last line per request id counts: a replay rewrites, never adds)."""
        by_id = {line.id: line for line in lines if line.canary == canary}
        rows = list(by_id.values())
        n = len(rows)
        agreements = sorted(r.agreement for r in rows)
        fired_active = Counter(t for r in rows for t in r.active_tags)
        fired_canary = Counter(t for r in rows for t in r.canary_tags)
        in_active = set(active_tags) if active_tags is not None else set(fired_active)
        in_canary = set(canary_tags) if canary_tags is not None else set(fired_canary)
        rates = [
            TagRate(tag=t, active=fired_active[t] / n if t in in_active else None,
                    canary=fired_canary[t] / n if t in in_canary else None)
            for t in sorted(in_active | in_canary)
        ] if n else []
        rates.sort(key=lambda r: (-abs(r.change), r.tag))
        never = sorted(t for t in in_canary if fired_canary[t] == 0) if n else []
        histogram = [0] * 10
        for a in agreements:
            histogram[min(int(a * 10), 9)] += 1
        return cls(
            canary=canary, active=sorted({r.active for r in rows}), images=n,
            agreement_mean=sum(agreements) / n if n else None,
            agreement_quantiles={f"p{q}": agreements[min(n - 1, int(q / 100 * n))] for q in (10, 50, 90)} if n else {},
            agreement_histogram=histogram,
            largest_changes=[r for r in rates[:top] if r.change != 0],
            never_fired=never[:top], never_fired_count=len(never),
            positives_per_image={"active": sum(fired_active.values()) / n, "canary": sum(fired_canary.values()) / n} if n else {},
        )

    def text(self) -> str:
        if not self.images:
            return f"canary {self.canary}: no images scored yet"
        q = self.agreement_quantiles
        out = [
            f"canary {self.canary} vs {', '.join(self.active)}: {self.images} images",
            f"agreement (Jaccard of tag sets): mean {self.agreement_mean:.3f}, p10 {q['p10']:.3f}, p50 {q['p50']:.3f}, p90 {q['p90']:.3f}",
            "agreement deciles: " + " ".join(str(c) for c in self.agreement_histogram),
            f"tags per image: active {self.positives_per_image['active']:.2f}, canary {self.positives_per_image['canary']:.2f}",
            "largest per-tag rate changes (active -> canary):",
        ]
        fmt = lambda v: "   -  " if v is None else f"{v:6.3f}"  # noqa: E731
        out += [f"  {r.tag:<40} {fmt(r.active)} -> {fmt(r.canary)}" for r in self.largest_changes] or ["  none"]
        out.append(f"canary tags that never fired: {self.never_fired_count}"
                   + (f" ({', '.join(self.never_fired)}{', ...' if self.never_fired_count > len(self.never_fired) else ''})"
                      if self.never_fired else ""))
        return "\n".join(out)
