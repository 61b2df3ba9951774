"""`ramplus tag` on local files and folders."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import ramplus_core
from helpers import jpeg_bytes, random_images
from workers.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    for i, im in enumerate(random_images(3, seed=7)):
        (root / f"img{i}.jpg").write_bytes(jpeg_bytes(im))
    (root / "sub").mkdir()
    random_images(1, seed=8)[0].save(root / "sub" / "deep.png")
    (root / "notes.txt").write_text("not an image, and not picked up from a folder")
    return root


@pytest.fixture(scope="module")
def our_checkpoint(tmp_path_factory, tiny_official_checkpoint):
    model = ramplus_core.load_checkpoint(tiny_official_checkpoint)
    return ramplus_core.save_pretrained(model, tmp_path_factory.mktemp("model") / "tiny")


def test_json_lines_for_a_folder(image_dir, our_checkpoint):
    result = runner.invoke(app, ["tag", str(image_dir), "--checkpoint", str(our_checkpoint), "--json", "--threshold", "0", "--top-k", "3"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(line["path"].split("/")[-1] for line in lines) == ["deep.png", "img0.jpg", "img1.jpg", "img2.jpg"]
    for line in lines:
        scores = [t["score"] for t in line["tags"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert line["model"] == "tiny@64"


def test_scores_agree_with_the_library(image_dir, our_checkpoint):
    result = runner.invoke(app, ["tag", f"file://{image_dir}/img1.jpg", "--checkpoint", str(our_checkpoint), "--json", "--all-scores"])
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout)
    model = ramplus_core.load_checkpoint(our_checkpoint)
    expected = ramplus_core.Tagger(model).tag([ramplus_core.load_image(image_dir / "img1.jpg")], all_scores=True)[0]
    assert line["scores"] == pytest.approx(expected.scores, abs=1e-6)


def test_table_output(image_dir, our_checkpoint):
    result = runner.invoke(app, ["tag", str(image_dir / "img0.jpg"), "--checkpoint", str(our_checkpoint), "--threshold", "0", "--top-k", "2"])
    assert result.exit_code == 0, result.output
    path, tags = result.stdout.strip().split("\t")
    assert path.endswith("img0.jpg") and tags.count("(") == 2


def test_bad_images_are_reported_and_the_rest_still_tagged(tmp_path, image_dir, our_checkpoint):
    (tmp_path / "broken.jpg").write_bytes(jpeg_bytes(random_images(1)[0])[:300])
    (tmp_path / "text.png").write_text("hello")
    result = runner.invoke(app, ["tag", str(tmp_path / "broken.jpg"), str(tmp_path / "text.png"), str(image_dir / "img0.jpg"),
                                 str(tmp_path / "missing.jpg"), "--checkpoint", str(our_checkpoint), "--json"])
    assert result.exit_code == 1
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = {line["path"].split("/")[-1]: line.get("error", {}).get("kind") for line in lines}
    assert kinds == {"broken.jpg": "decode", "text.png": "not_image", "img0.jpg": None, "missing.jpg": "not_found"}


def test_without_a_checkpoint_it_says_how_to_get_one(image_dir, monkeypatch):
    monkeypatch.delenv("RAMPLUS_MODEL__CHECKPOINT", raising=False)
    result = runner.invoke(app, ["tag", str(image_dir)])
    assert result.exit_code == 2
    assert "xinyu1205/recognize-anything-plus-model" in result.stderr


def test_the_checkpoint_comes_from_the_one_settings_name_and_a_retired_name_is_refused_not_ignored(
    image_dir, our_checkpoint, monkeypatch
):
    monkeypatch.setenv("RAMPLUS_MODEL__CHECKPOINT", str(our_checkpoint))
    result = runner.invoke(app, ["tag", str(image_dir / "img0.jpg"), "--json"])
    assert result.exit_code == 0, result.stderr
    monkeypatch.setenv("RAMPLUS_CHECKPOINT", str(our_checkpoint))
    result = runner.invoke(app, ["tag", str(image_dir / "img0.jpg"), "--json"])
    assert result.exit_code == 2
    assert "RAMPLUS_CHECKPOINT is now RAMPLUS_MODEL__CHECKPOINT" in result.stderr


def test_a_bad_checkpoint_is_one_line_not_a_traceback(tmp_path, image_dir):
    (tmp_path / "x.pth").write_text("nope")
    result = runner.invoke(app, ["tag", str(image_dir), "--checkpoint", str(tmp_path / "x.pth")])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "unknown checkpoint format" in result.stderr
    assert "Traceback" not in result.output


def test_remote_uris_are_refused_clearly(our_checkpoint):
    result = runner.invoke(app, ["tag", "https://example.com/cat.jpg", "--checkpoint", str(our_checkpoint)])
    assert result.exit_code == 2 and "local files and file:// URIs only" in result.stderr


def test_an_open_set_vocabulary_file(tmp_path, image_dir, our_checkpoint, tiny_text_encoder):
    vocab = ramplus_core.Vocabulary.from_tags(["cat", "dog", "car"], tiny_text_encoder.encode, text_encoder=tiny_text_encoder.id, name="mini")
    vocab.save(tmp_path / "mini.safetensors")
    result = runner.invoke(app, ["tag", str(image_dir / "img0.jpg"), "--checkpoint", str(our_checkpoint),
                                 "--vocab", str(tmp_path / "mini.safetensors"), "--json", "--threshold", "0"])
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout)
    assert line["vocab"] == "mini@1" and sorted(t["tag"] for t in line["tags"]) == ["car", "cat", "dog"]


def test_serve_without_a_checkpoint_says_how_to_get_one(monkeypatch):
    from typer.testing import CliRunner

    from workers.cli import app

    monkeypatch.delenv("RAMPLUS_MODEL__CHECKPOINT", raising=False)
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 2
    assert "no checkpoint configured" in result.output and "RAMPLUS_MODEL__CHECKPOINT" in result.output


def test_produce_refuses_a_missing_path(tmp_path):
    from typer.testing import CliRunner

    from workers.cli import app

    result = CliRunner().invoke(app, ["produce", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "nope" in result.output


def test_samples_writes_scikit_images_real_photos_as_jpegs(tmp_path):
    from PIL import Image

    from workers.io.samples import SAMPLE_PHOTOS

    result = runner.invoke(app, ["samples", str(tmp_path / "photos")])
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "photos").iterdir())
    assert [f.stem for f in files] == sorted(SAMPLE_PHOTOS)
    sizes = set()
    for f in files:
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            sizes.add(im.size)
            assert min(im.size) >= 256  # real photos, not thumbnails
    assert len({f.read_bytes() for f in files}) == len(files)
    assert (741, 500) in sizes  # the motorcycle's left view, not its stereo stack or disparity map


def test_a_skipped_image_is_named_once_with_its_reason(tmp_path, our_checkpoint):
    (tmp_path / "text.png").write_text("hello")
    result = runner.invoke(app, ["tag", str(tmp_path / "text.png"), str(tmp_path / "gone.jpg"), "--checkpoint", str(our_checkpoint)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("skipped ") for line in lines)
    assert lines[0].count("text.png") == 1 and "not an image" in lines[0].lower()
    assert lines[1].count("gone.jpg") == 1 and "no such file" in lines[1]


def test_the_fast_path_with_jpegs_decoded_in_the_batch(image_dir, our_checkpoint):
    """`--fast --decode gpu`: the fleet's path (on the CPU, torchvision's decoder), close to the exact one."""
    args = ["tag", str(image_dir), "--checkpoint", str(our_checkpoint), "--json", "--all-scores"]
    fast = [json.loads(line) for line in runner.invoke(app, [*args, "--fast", "--decode", "gpu"]).stdout.splitlines()]
    exact = [json.loads(line) for line in runner.invoke(app, args).stdout.splitlines()]
    assert [f["path"] for f in fast] == [e["path"] for e in exact] and len(fast) == 4
    for f, e in zip(fast, exact):
        assert max(abs(a - b) for a, b in zip(f["scores"].values(), e["scores"].values())) < 0.1
    bad = runner.invoke(app, [*args, "--fast", "--decode", "nvjpeg"])
    assert bad.exit_code == 2 and "decode must be auto, cpu or gpu" in bad.stderr
