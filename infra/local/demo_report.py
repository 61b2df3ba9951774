"""What the demo shows at the end: the time each phase took, the summary table and var/demo/report.html."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field


@dataclass
class Timings:
    phases: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        say(f"== {name}")
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = time.monotonic() - t0
            say(f"   {name}: {self.phases[name]:.0f} s")


def say(message: str) -> None:
    print(message, flush=True)


@dataclass
class DemoResult:
    stamp: str
    artifact: str
    metrics: dict[str, Any]
    trained: bool
    results: list[dict[str, Any]]
    backfilled: list[dict[str, Any]]
    official: list[dict[str, Any]]
    checkpoint: str | None
    dead_letters: list[dict[str, Any]]
    switched: bool  # every replica ended on demo@2
    backfill: dict[str, Any]
    requests: int


class ModelSummary(BaseModel):
    artifact: str
    trained_now: bool  # False: an artifact of the same recipe was reused
    held_out_map: float | None
    label_prior_map: float | None
    held_out_ap_by_group: dict[str, float | None] = Field(default_factory=dict, description="colour, shape, background")


class StreamSummary(BaseModel):
    requests: int
    distinct_results: int
    duplicates: int
    dead_letters_by_kind: dict[str, int]
    results_per_vocabulary: dict[str, int]
    every_replica_on_demo_2: bool


class BackfillCounts(BaseModel):
    tagged: int
    errors: int
    skipped: int


class OfficialPhotos(BaseModel):
    tagged: int
    checkpoint: str


class DemoSummary(BaseModel):
    """var/demo/summary.json: numbers a script can check; the printed table is rendered from it."""

    schema_version: Literal[2] = 2  # 2: model.held_out_ap_by_group
    run: str
    model: ModelSummary
    stream: StreamSummary
    backfill: BackfillCounts
    photos_tagged_with_checkpoint: OfficialPhotos | None
    seconds_by_phase: dict[str, float]
    seconds_total: float

    @classmethod
    def of(cls, ctx: DemoResult, timings: Timings, total: float) -> DemoSummary:
        from ramplus_core.evaluation import group_average_precision
        from ramplus_core.synthetic import TAG_GROUPS

        final = ctx.metrics.get("final", {})
        by_group = group_average_precision(final.get("val_tag_ap") or {}, TAG_GROUPS) if final.get("val_tag_ap") else {}
        ids = Counter(r["id"] for r in ctx.results)
        return cls(
            run=ctx.stamp,
            model=ModelSummary(artifact=ctx.artifact, trained_now=ctx.trained, held_out_map=final.get("val_map"),
                               label_prior_map=final.get("prior_map"),
                               held_out_ap_by_group={g: None if v is None else round(v, 4) for g, v in by_group.items()}),
            stream=StreamSummary(
                requests=ctx.requests, distinct_results=len(ids), duplicates=sum(n - 1 for n in ids.values()),
                dead_letters_by_kind=dict(sorted(Counter(d["error"]["kind"] for d in ctx.dead_letters).items())),
                results_per_vocabulary=dict(sorted(Counter(r["vocab"] for r in ctx.results).items())),
                every_replica_on_demo_2=ctx.switched,
            ),
            backfill=BackfillCounts(tagged=ctx.backfill["images_tagged"], errors=sum(ctx.backfill["errors"].values()),
                                    skipped=ctx.backfill["images_skipped"]),
            photos_tagged_with_checkpoint=OfficialPhotos(tagged=len(ctx.official), checkpoint=ctx.checkpoint) if ctx.checkpoint else None,
            seconds_by_phase={k: round(v, 1) for k, v in timings.phases.items()},
            seconds_total=round(total, 1),
        )

    def rows(self) -> list[tuple[str, str]]:
        """The table's wording, each count with its label."""
        m, st, b, photos = self.model, self.stream, self.backfill, self.photos_tagged_with_checkpoint

        def score(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.3f}"

        def counts(values: dict[str, Any]) -> str:
            return ", ".join(f"{k}: {v}" for k, v in values.items()) or "none"

        return [
            ("run", self.run),
            ("model", f"{m.artifact} ({'trained now' if m.trained_now else 'reused'})"),
            ("held-out mAP", f"{score(m.held_out_map)} (label prior: {score(m.label_prior_map)})"),
            ("held-out AP by group", ", ".join(f"{g} {score(v)}" for g, v in m.held_out_ap_by_group.items()) or "n/a"),
            ("stream", f"{st.requests} requests -> {st.distinct_results} results, {st.duplicates} duplicates"),
            ("dead letters", counts(st.dead_letters_by_kind)),
            ("results per vocabulary", counts(st.results_per_vocabulary)),
            ("every replica on demo@2", "yes" if st.every_replica_on_demo_2 else "no"),
            ("backfill", f"{b.tagged} tagged, {b.errors} errors, {b.skipped} skipped (done before)"),
            ("photos tagged with --checkpoint", f"{photos.tagged} ({photos.checkpoint})" if photos else "not run (no --checkpoint)"),
            ("seconds by phase", counts(self.seconds_by_phase)),
            ("seconds in all", f"{self.seconds_total:.0f}"),
        ]


def print_summary(summary: DemoSummary) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="RAMPlus demo", show_header=False)
    for key, value in summary.rows():
        table.add_row(key, value)
    Console(width=140).print(table)


def write_report(out: Path, ctx: DemoResult, images: dict[str, bytes], timings: Timings) -> Path:
    from workers.train.report import Report, render, report_images
    from workers.schemas import TagResult

    stream = [TagResult.model_validate(r) for r in sorted(ctx.results, key=lambda r: r["ts"])]
    backfill = [TagResult.model_validate(r) for r in sorted(ctx.backfilled, key=lambda r: r["uri"])]
    official = [
        TagResult(id=Path(r["path"]).stem, uri=r["uri"], tags=r["tags"], vocab=r["vocab"], model=r["model"], worker="ramplus tag")
        for r in ctx.official
    ]
    summary = {k: v for k, v in DemoSummary.of(ctx, timings, sum(timings.phases.values())).rows()
               if k != "results per vocabulary"}  # the page counts its cards per vocabulary itself
    items = (report_images(stream, images, path="stream (Kafka -> fleet -> S3)")
             + report_images(backfill, images, path="backfill (S3 prefix -> Ray Data -> S3)")
             + report_images(official, images, path=f"{Path(str(ctx.checkpoint)).name} (ramplus tag)"))
    page = out / "report.html"
    page.write_text(render(Report("RAMPlus demo: " + ctx.stamp, summary, items)), encoding="utf-8")
    return page


def what_next(report: Path, summary: Path, *, artifact: str, stack_stopped: bool) -> str:
    """The lines the demo ends with: where its outputs are and how to go on with the model it trained."""
    lines = [
        "what next:",
        f"  open the report:        xdg-open {report}   (or open file://{report.resolve()} in a browser)",
        f"  the summary, as JSON:   {summary}",
    ]
    if stack_stopped:
        lines.append("  the model lives in the local S3 server, which the demo started and stopped; start the stack again:")
        lines.append("                          python infra/local/stack.py up")
    lines += [
        "  tag your own images with this model (the stack's settings in your shell, then the CLI):",
        '                          eval "$(python infra/local/stack.py env)"',
        f"                          .venv/bin/ramplus tag path/to/images --checkpoint {artifact}",
    ]
    return "\n".join(lines)
