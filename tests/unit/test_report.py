"""The HTML report: every result shown with its tags, scores and vocabulary; nothing from the results runs."""

from __future__ import annotations

import io
import re

from PIL import Image

from helpers import jpeg_bytes, random_images
from ramplus_core.tagging import TagScore
from workers.train.report import Report, ReportImage, render, report_images, thumbnail
from workers.schemas import TagResult


def result(id_: str, uri: str, tags: dict[str, float], vocab: str = "synth@1") -> TagResult:
    return TagResult(id=id_, uri=uri, tags=[TagScore(tag=t, score=s) for t, s in tags.items()], vocab=vocab,
                     model="tiny@64", worker="test")


def test_every_result_is_a_card_with_its_tags_scores_and_vocabulary():
    images = {f"s3://b/{i}.jpg": jpeg_bytes(im) for i, im in enumerate(random_images(3, seed=1))}
    results = [result("a", "s3://b/0.jpg", {"red": 0.91, "circle": 0.74}), result("b", "s3://b/1.jpg", {}, "synth@2")]
    items = report_images(results, images, path="stream") + report_images(
        [result("c", "s3://b/2.jpg", {"blue": 0.5}, "synth@2")], images, path="backfill"
    )
    page = render(Report("Demo", {"images": 3}, items))
    cards = re.findall(r'<div class="card" data-id="([^"]+)" data-vocab="([^"]+)" data-path="([^"]+)">', page)
    assert cards == [("a", "synth@1", "stream"), ("b", "synth@2", "stream"), ("c", "synth@2", "backfill")]
    assert "red</span>" in page and "0.910" in page and "circle</span>" in page and "0.740" in page
    assert "no tag above its threshold" in page  # b has none
    assert "<tr><th>cards below with synth@2 (every section)</th><td>2</td></tr>" in page
    assert page.count('src="data:image/jpeg;base64,') == 3
    assert "<h2>stream (2 images)</h2>" in page and "<h2>backfill (1 images)</h2>" in page


def test_what_producers_wrote_is_escaped_not_run():
    evil = '<script>alert(1)</script>'
    page = render(Report(evil, {evil: evil}, [ReportImage(result(evil, "s3://b/x?<b>", {evil: 0.9}, "v@1"), None)]))
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "no preview" in page


def test_thumbnails_are_small_and_unreadable_images_get_none():
    big = Image.new("RGB", (800, 400), (10, 200, 30))
    uri = thumbnail(jpeg_bytes(big))
    import base64

    decoded = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert decoded.size == (160, 80)
    items = report_images([result("x", "s3://b/bad.jpg", {})], {"s3://b/bad.jpg": b"not an image"}, path="stream")
    assert items[0].thumbnail is None


def test_a_card_names_its_uri_once_and_its_source_does_not_wrap_mid_word():
    same = render(Report("r", {}, [ReportImage(result("s3://b/k.jpg", "s3://b/k.jpg", {"red": 0.9}), None, "backfill (S3 prefix -> Ray Data -> S3)")]))
    assert same.count("s3://b/k.jpg</div>") == 1 and same.count("s3://b/k.jpg<br>") == 0  # a backfill's id is its URI
    other = render(Report("r", {}, [ReportImage(result("req-1", "s3://b/k.jpg", {"red": 0.9}), None)]))
    assert "req-1<br>s3://b/k.jpg" in other
    assert '<span class="path">backfill (S3 prefix -&gt; Ray Data -&gt; S3)</span>' in same
    css = same.split("<style>")[1].split("</style>")[0]
    assert ".path {" in css and "break-all" not in css.split(".path {")[1].split("}")[0]
