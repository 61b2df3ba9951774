"""A self-contained HTML report of tagging results: each image with its tags, scores and vocabulary version.

What the demo ends with, and what a person opens to see the product work: one file, no scripts, no
external fetches (images are inlined as small JPEG thumbnails), so it opens from a laptop's disk or an S3
console alike. Everything the results say goes through `html.escape`: ids, URIs and tag names come from
producers and vocabularies, not from us.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ramplus_core import load_image
from ramplus_core.errors import RamPlusError
from workers.schemas import TagResult

THUMBNAIL_SIDE = 160
MAX_TAGS_SHOWN = 12


@dataclass(frozen=True)
class ReportImage:
    """One image of the report: its result line plus where it went through (stream, backfill, ...)."""

    result: TagResult
    thumbnail: str | None = None  # a data: URI, or None when the image could not be read for the report
    path: str = "stream"


@dataclass
class Report:
    title: str
    summary: dict[str, str | int | float] = field(default_factory=dict)
    images: list[ReportImage] = field(default_factory=list)


def thumbnail(data: bytes, side: int = THUMBNAIL_SIDE) -> str:
    """A JPEG data: URI of the image scaled to fit `side`; decoded within the model's own limits
    (`load_image`: size, pixel count, corruption), whose errors it raises."""
    image = load_image(data, name="report thumbnail").convert("RGB")
    image.thumbnail((side, side))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #1d1d1f; background: #fafafa; }
h1 { font-size: 22px; margin: 0 0 12px; }
table.summary { border-collapse: collapse; margin-bottom: 20px; }
table.summary td, table.summary th { border: 1px solid #ccc; padding: 4px 10px; text-align: left; font-size: 14px; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
.card { width: 230px; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
.card img { display: block; max-width: 160px; max-height: 160px; margin: 0 auto 6px; }
.noimg { height: 60px; line-height: 60px; text-align: center; color: #888; font-size: 12px; }
.id { font-size: 12px; color: #555; word-break: break-all; }
.path { font-size: 12px; color: #555; }
.vocab { display: inline-block; font-size: 11px; padding: 1px 6px; border-radius: 8px; color: #fff; margin: 4px 0; }
ul.tags { list-style: none; padding: 0; margin: 4px 0 0; font-size: 13px; }
ul.tags li { display: flex; align-items: center; gap: 6px; }
.bar { height: 6px; background: #3b82f6; border-radius: 3px; }
.score { margin-left: auto; font-variant-numeric: tabular-nums; color: #333; }
.none { color: #888; font-size: 12px; }
"""

_PALETTE = ("#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626", "#0891b2")


def _vocab_colours(images: Sequence[ReportImage]) -> dict[str, str]:
    versions = sorted({i.result.vocab for i in images})
    return {v: _PALETTE[n % len(_PALETTE)] for n, v in enumerate(versions)}


def _card(item: ReportImage, colour: str) -> str:
    r = item.result
    esc = html.escape
    picture = (
        f'<img src="{item.thumbnail}" alt="{esc(r.id)}">' if item.thumbnail else '<div class="noimg">no preview</div>'
    )
    tags = sorted(r.tags, key=lambda t: -t.score)[:MAX_TAGS_SHOWN]
    rows = "".join(
        f'<li><span class="tag">{esc(t.tag)}</span><span class="bar" style="width:{max(2, round(60 * t.score))}px"></span>'
        f'<span class="score">{t.score:.3f}</span></li>'
        for t in tags
    )
    more = f'<li class="none">+{len(r.tags) - len(tags)} more</li>' if len(r.tags) > len(tags) else ""
    listing = f'<ul class="tags">{rows}{more}</ul>' if tags else '<div class="none">no tag above its threshold</div>'
    return (
        f'<div class="card" data-id="{esc(r.id)}" data-vocab="{esc(r.vocab)}" data-path="{esc(item.path)}">{picture}'
        f'<div class="id">{esc(r.id)}' + (f"<br>{esc(r.uri)}" if r.uri != r.id else "") + "</div>"  # a backfill's id is its URI
        f'<span class="vocab" style="background:{colour}">{esc(r.vocab)}</span> <span class="path">{esc(item.path)}</span>'
        f"{listing}</div>"
    )


def render(report: Report) -> str:
    """The report as one HTML document (UTF-8 text)."""
    esc = html.escape
    colours = _vocab_colours(report.images)
    per_vocab = Counter(i.result.vocab for i in report.images)
    summary = {**report.summary, **{f"cards below with {v} (every section)": n for v, n in sorted(per_vocab.items())}}
    rows = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in summary.items())
    sections = []
    for path in dict.fromkeys(i.path for i in report.images):
        cards = "".join(_card(i, colours[i.result.vocab]) for i in report.images if i.path == path)
        count = sum(1 for i in report.images if i.path == path)
        sections.append(f'<h2>{esc(path)} ({count} images)</h2><div class="grid">{cards}</div>')
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(report.title)}</title><style>{_CSS}</style></head><body>"
        f'<h1>{esc(report.title)}</h1><table class="summary">{rows}</table>{"".join(sections)}</body></html>'
    )


def report_images(results: Iterable[TagResult], images: dict[str, bytes], *, path: str) -> list[ReportImage]:
    """Pair results with their image bytes (by URI); an unreadable image gets no preview, not an error."""
    out = []
    for result in results:
        data = images.get(result.uri)
        preview = None
        if data is not None:
            try:
                preview = thumbnail(data)
            except RamPlusError:  # unreadable for a preview: the report shows the result anyway
                preview = None
        out.append(ReportImage(result, preview, path))
    return out
