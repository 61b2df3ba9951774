"""`make run`'s demo (infra/local/demo.py --quick) end to end on the real local stack, then its HTML report
in headless Chromium. CI runs it from a fresh clone, so the first run here trains the model itself."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import dump_dom, screenshot

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SCENES, BACKFILL, PHOTOS, BAD = 60, 30, 5, 3  # the quick recipe; scikit-image's photos; the bad requests


def test_the_quick_demo_runs_the_lifecycle_and_its_report_shows_every_image(stack, tiny_model_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, not the test session's
    done = subprocess.run([sys.executable, str(ROOT / "infra" / "local" / "demo.py"), "--quick", "--retrain", "--out", str(tmp_path),
                           # the official checkpoint's path through `ramplus tag` (none here: our own format stands in)
                           "--checkpoint", str(tiny_model_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    # servers it did not start stay up
    assert all(stack.is_ready(s) for s in ("kafka", "redis", "s3")), "the demo stopped servers it did not start"

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"].endswith("(trained now)")  # by jobs/retrain.py, submitted through Ray's job API
    assert "retrain.epoch" in done.stdout  # the job's epoch lines, relayed as they came
    distinct, duplicates = map(int, summary["stream results (distinct ids, duplicates)"].split(", "))
    assert (distinct, duplicates) == (SCENES + PHOTOS, 0)
    assert summary["stream requests"] == SCENES + PHOTOS + BAD
    assert summary["dead letters by kind"] == {"forbidden": 1, "not_found": 1, "not_image": 1}
    per_vocab = summary["results per vocabulary"]
    assert set(per_vocab) == {"demo@1", "demo@2"} and sum(per_vocab.values()) == SCENES + PHOTOS, per_vocab
    assert summary["every replica on demo@2"] is True
    tagged, errors, _ = summary["backfill tagged / errors / skipped"].split(" / ")
    assert (int(tagged), int(errors)) == (BACKFILL + PHOTOS, 0)
    held_out, prior = map(float, summary["held-out mAP / label prior"].split(" / "))
    assert held_out > prior  # even the quick training learns something (colours and backgrounds come first)

    page = tmp_path / "report.html"
    dom = dump_dom(page)
    cards = re.findall(r'<div class="card" data-id="([^"]+)" data-vocab="([^"]+)"', dom)
    assert len(cards) == SCENES + PHOTOS + BACKFILL + PHOTOS + PHOTOS
    assert {v for _, v in cards} == {"demo@1", "demo@2", "tiny-vocab@1"}
    assert dom.count("data:image/jpeg;base64,") == len(cards), "a card without its image"
    shown = re.findall(r'<span class="tag">([^<]+)</span><span class="bar"[^>]*></span><span class="score">([0-9.]+)</span>', dom)
    assert len(shown) >= len(cards) // 2, "tags with their scores are on the page"
    assert "chelsea" in dom and "stream (Kafka" in dom and "backfill (S3" in dom and "tiny (ramplus tag)" in dom
    assert summary["photos tagged with --checkpoint"].startswith(f"{PHOTOS} (")
    # demo@2 is the object tags only: no background tag in any of its cards
    for card in dom.split('<div class="card" ')[1:]:
        if 'data-vocab="demo@2"' in card.split(">", 1)[0]:
            assert not [t for t in re.findall(r'<span class="tag">([^<]+)</span>', card) if "background" in t]

    shot = np.asarray(Image.open(screenshot(page, tmp_path / "report.png")).convert("RGB")).astype(int)
    assert shot.std() > 20, "a blank page"
