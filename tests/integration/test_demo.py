"""`make run`'s demo (infra/local/demo.py --quick) end to end on the real local stack, then its HTML report
in headless Chromium. CI runs it from a fresh clone, so the first run here trains the model itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import dump_dom, screenshot
from infra.local.demo_report import DemoSummary
from workers.io.samples import sample_photos

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

    summary = DemoSummary.model_validate_json((tmp_path / "summary.json").read_text())  # typed numbers, versioned
    assert summary.schema_version == 2
    assert summary.model.trained_now  # by jobs/retrain.py, submitted through Ray's job API
    assert "retrain.epoch" in done.stdout  # the job's epoch lines, relayed as they came
    stream = summary.stream
    assert (stream.distinct_results, stream.duplicates) == (SCENES + PHOTOS, 0)
    assert stream.requests == SCENES + PHOTOS + BAD
    assert stream.dead_letters_by_kind == {"forbidden": 1, "not_found": 1, "not_image": 1}
    per_vocab = stream.results_per_vocabulary
    assert set(per_vocab) == {"demo@1", "demo@2"} and sum(per_vocab.values()) == SCENES + PHOTOS, per_vocab
    assert stream.every_replica_on_demo_2 is True
    assert (summary.backfill.tagged, summary.backfill.errors) == (BACKFILL + PHOTOS, 0)
    # The quick recipe learns visibly (issue 18): twice the label prior, and colours and backgrounds, not only one group.
    assert summary.model.held_out_map >= 2 * summary.model.label_prior_map, summary.model
    groups = summary.model.held_out_ap_by_group
    assert set(groups) == {"colour", "shape", "background"} and groups["colour"] > 0.6 and groups["background"] > 0.9, groups

    # It ends saying what to do next, and the command it gives for your own images works as printed.
    command = next(line.strip() for line in done.stdout.splitlines() if "ramplus tag path/to/images --checkpoint" in line)
    assert command.split("--checkpoint ")[1] == summary.model.artifact
    mine = tmp_path / "mine"
    mine.mkdir()
    for name, data in list(sample_photos().items())[:PHOTOS]:
        (mine / f"{name}.jpg").write_bytes(data)
    tagged = subprocess.run([sys.executable, "-m", "workers.cli", "tag", str(mine), "--json", "--checkpoint", summary.model.artifact],
                            cwd=ROOT, env={**env, **stack.env}, capture_output=True, text=True, timeout=300)
    assert tagged.returncode == 0, tagged.stderr[-3000:]
    assert len(tagged.stdout.splitlines()) == PHOTOS
    assert "xdg-open" in done.stdout and "stack.py env" in done.stdout
    # Quiet by default: one warning per fact, no Ray Data execution plans or progress-bar notices.
    log = done.stdout + done.stderr
    assert "Starting execution of Dataset" not in log and "Progress bars disabled" not in log
    assert "No pretrained weights loaded" not in log  # open_clip's duplicate of text_encoder.random_weights

    page = tmp_path / "report.html"
    dom = dump_dom(page)
    cards = re.findall(r'<div class="card" data-id="([^"]+)" data-vocab="([^"]+)"', dom)
    assert len(cards) == SCENES + PHOTOS + BACKFILL + PHOTOS + PHOTOS
    assert {v for _, v in cards} == {"demo@1", "demo@2", "tiny-vocab@1"}
    assert dom.count("data:image/jpeg;base64,") == len(cards), "a card without its image"
    shown = re.findall(r'<span class="tag">([^<]+)</span><span class="bar"[^>]*></span><span class="score">([0-9.]+)</span>', dom)
    assert len(shown) >= len(cards) // 2, "tags with their scores are on the page"
    assert "chelsea" in dom and "stream (Kafka" in dom and "backfill (S3" in dom and "tiny (ramplus tag)" in dom
    assert summary.photos_tagged_with_checkpoint is not None and summary.photos_tagged_with_checkpoint.tagged == PHOTOS
    # demo@2 is the object tags only: no background tag in any of its cards
    for card in dom.split('<div class="card" ')[1:]:
        if 'data-vocab="demo@2"' in card.split(">", 1)[0]:
            assert not [t for t in re.findall(r'<span class="tag">([^<]+)</span>', card) if "background" in t]

    shot = np.asarray(Image.open(screenshot(page, tmp_path / "report.png")).convert("RGB")).astype(int)
    assert shot.std() > 20, "a blank page"
