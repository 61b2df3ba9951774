"""The HTML report opens in headless Chromium and shows every image with its tags (a screenshot is checked).

Integration tier: it installs Chromium with apt the first time, like the local stack's servers.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from browser import dump_dom, screenshot
from helpers import jpeg_bytes, make_tiny_model, random_images
from ramplus_core import preprocess, select_tags
from workers.train.report import Report, render, report_images
from workers.schemas import TagResult

pytestmark = pytest.mark.integration
MARKER = (250, 20, 200)  # a colour no other part of the page uses: its pixels show that images rendered


def tagged(model, images: dict[str, Image.Image], vocab_version: str) -> list[TagResult]:
    uris = list(images)
    answers = select_tags(model.tag_logits(preprocess([images[u] for u in uris], 64)), model.vocabulary)
    return [
        TagResult(id=f"img-{n}", uri=u, tags=a.tags, vocab=f"{model.vocabulary.name}@{vocab_version}", model="tiny@64",
                  worker="test")
        for n, (u, a) in enumerate(zip(uris, answers))
    ]


def test_the_report_opens_in_chromium_and_shows_each_image_with_its_tags(tmp_path):
    model = make_tiny_model()
    model.vocabulary.thresholds.fill_(0.0)  # an untrained model: show every tag, so there is text to find
    pictures = {f"s3://demo/{i}.jpg": im for i, im in enumerate(random_images(5, seed=4))}
    pictures["s3://demo/marker.jpg"] = Image.new("RGB", (120, 90), MARKER)
    first, second = dict(list(pictures.items())[:3]), dict(list(pictures.items())[3:])
    results = tagged(model, first, "1") + tagged(model, second, "2")
    blobs = {u: jpeg_bytes(im, quality=95) for u, im in pictures.items()}
    page = tmp_path / "report.html"
    page.write_text(render(Report("RAMPlus demo", {"images": len(results)}, report_images(results, blobs, path="stream"))))

    dom = dump_dom(page)
    cards = re.findall(r'<div class="card" data-id="([^"]+)" data-vocab="([^"]+)"', dom)
    assert cards == [(r.id, r.vocab) for r in results]
    for r in results:
        assert r.tags, "thresholds at 0: every tag is listed"
        for t in r.tags[:3]:
            assert f"{t.score:.3f}" in dom
    assert {"tiny-vocab@1", "tiny-vocab@2"} <= set(re.findall(r'class="vocab"[^>]*>([^<]+)<', dom))

    png = screenshot(page, tmp_path / "report.png")
    shot = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert shot.shape == (1600, 1280, 3)
    assert shot.std() > 20, "a blank page"
    marker = (np.abs(shot - np.array(MARKER)).sum(-1) < 40).sum()
    assert marker > 0.8 * 120 * 90, f"the marker image is not on the screenshot ({marker} pixels)"
