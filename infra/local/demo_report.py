"""What the demo shows at the end: the time each phase took, the summary table and var/demo/report.html."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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


def summary_dict(ctx: DemoResult, timings: Timings, total: float) -> dict[str, Any]:
    final = ctx.metrics.get("final", {})
    ids = Counter(r["id"] for r in ctx.results)
    return {
        "run": ctx.stamp,
        "model": ctx.artifact + (" (trained now)" if ctx.trained else " (reused)"),
        "held-out mAP / label prior": f"{final.get('val_map', float('nan')):.3f} / {final.get('prior_map', float('nan')):.3f}",
        "stream requests": ctx.requests,
        "stream results (distinct ids, duplicates)": f"{len(ids)}, {sum(n - 1 for n in ids.values())}",
        "dead letters by kind": dict(sorted(Counter(d["error"]["kind"] for d in ctx.dead_letters).items())),
        "results per vocabulary": dict(sorted(Counter(r["vocab"] for r in ctx.results).items())),
        "every replica on demo@2": ctx.switched,
        "backfill tagged / errors / skipped": f"{ctx.backfill['images_tagged']} / {sum(ctx.backfill['errors'].values())} / {ctx.backfill['images_skipped']}",
        "photos tagged with --checkpoint": f"{len(ctx.official)} ({ctx.checkpoint})" if ctx.checkpoint else "not run (no --checkpoint)",
        "seconds by phase": {k: round(v, 1) for k, v in timings.phases.items()},
        "seconds in all": round(total, 1),
    }


def _flat(value: Any) -> str:
    return ", ".join(f"{k}: {v}" for k, v in value.items()) if isinstance(value, dict) else str(value)


def print_summary(ctx: DemoResult, timings: Timings, total: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="RAMPlus demo", show_header=False)
    for key, value in summary_dict(ctx, timings, total).items():
        table.add_row(key, _flat(value))
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
    summary = {k: _flat(v) for k, v in summary_dict(ctx, timings, sum(timings.phases.values())).items()
               if k not in ("results per vocabulary", "seconds in all")}
    items = (report_images(stream, images, path="stream (Kafka -> fleet -> S3)")
             + report_images(backfill, images, path="backfill (S3 prefix -> Ray Data -> S3)")
             + report_images(official, images, path=f"{Path(str(ctx.checkpoint)).name} (ramplus tag)"))
    page = out / "report.html"
    page.write_text(render(Report("RAMPlus demo: " + ctx.stamp, summary, items)), encoding="utf-8")
    return page
