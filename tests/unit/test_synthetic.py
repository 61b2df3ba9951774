"""The synthetic dataset: deterministic scenes whose tags and captions say what is drawn, and its writers."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ramplus_core.descriptions import load_descriptions
from ramplus_core.synthetic import (
    BACKGROUNDS,
    COLOURS,
    GENERATOR_VERSION,
    SHAPES,
    SHAPES_V1,
    TAG_GROUPS,
    TAGS,
    describe_tags,
    draw_scene,
    generate,
    scene_seed,
    tag_groups,
)
from workers.cli import app
from workers.train.manifest import ManifestError, ManifestRecord, read_manifest, resolve_uri, write_manifest
from workers.train.synth_data import DatasetError, split_of, write_dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def scenes():
    return list(generate(160, seed=0))


@pytest.fixture(scope="module")
def scenes_v1():
    return list(generate(80, seed=0, version=1))


def nearest(pixels: np.ndarray, palette: dict[str, tuple[int, int, int]], within: float) -> Counter[str]:
    """How many pixels are within `within` (RGB distance) of each palette colour."""
    names = list(palette)
    centres = np.array([palette[c] for c in names], np.float32)
    dist = np.linalg.norm(pixels.reshape(-1, 1, 3).astype(np.float32) - centres[None], axis=-1)
    best = dist.argmin(axis=1)
    close = dist.min(axis=1) < within
    return Counter(names[i] for i in best[close])


def at_64_after_jpeg(image: Image.Image) -> np.ndarray:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92, subsampling=0)
    return np.asarray(Image.open(buffer).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))


# ------------------------------------------------------------------------------------------ vocabulary


def test_the_vocabulary_is_thirteen_tags_in_three_groups_and_v1_keeps_its_fifteen():
    assert GENERATOR_VERSION == 2 and SHAPES == ("circle", "ring", "bar")
    assert TAG_GROUPS == {"colour": list(COLOURS), "shape": list(SHAPES), "background": list(BACKGROUNDS)}
    assert TAGS == [t for g in TAG_GROUPS.values() for t in g] and len(set(TAGS)) == len(TAGS) == 13
    v1 = tag_groups(1)
    assert v1["shape"] == list(SHAPES_V1) and sum(map(len, v1.values())) == 15
    assert list(describe_tags(1)) == [t for g in v1.values() for t in g]
    with pytest.raises(ValueError, match="unknown generator version 3"):
        next(generate(1, version=3))


def test_object_colours_are_far_from_each_other_and_from_every_background():
    colours = np.array(list(COLOURS.values()), np.float32)
    backgrounds = np.array(list(BACKGROUNDS.values()), np.float32)
    between = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
    assert between[~np.eye(len(colours), dtype=bool)].min() > 90
    assert np.linalg.norm(colours[:, None] - backgrounds[None], axis=-1).min() > 90


def test_every_tag_has_five_distinct_descriptions_and_they_are_stable():
    descriptions = describe_tags()
    assert list(descriptions) == TAGS
    for tag, texts in descriptions.items():
        assert len(texts) == 5 == len(set(texts)) and all(t.strip() for t in texts), tag
    assert describe_tags() == descriptions


# ---------------------------------------------------------------------------------------- determinism


def test_the_same_seed_draws_the_same_pixels_tags_and_captions():
    a, b = list(generate(4, seed=3)), list(generate(4, seed=3))
    for x, y in zip(a, b):
        assert x.image.tobytes() == y.image.tobytes() and x.tags == y.tags and x.captions == y.captions
    assert [s.image.tobytes() for s in generate(4, seed=4)] != [s.image.tobytes() for s in a]


def test_scene_i_depends_only_on_seed_and_i():
    long = list(generate(6, seed=7))
    shard = list(generate(2, seed=7, start=4))
    assert [s.image.tobytes() for s in shard] == [s.image.tobytes() for s in long[4:]]
    assert draw_scene(scene_seed(7, 5)).image.tobytes() == long[5].image.tobytes()
    assert list(generate(3, seed=7))[2].captions == long[2].captions


def test_a_written_dataset_is_byte_identical_on_a_rerun(tmp_path):
    write_dataset(str(tmp_path / "a"), n=5, seed=11, size=64, progress=False)
    write_dataset(str(tmp_path / "b"), n=5, seed=11, size=64, progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 5 + 3
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


# ------------------------------------------------------------------------------- content matches tags


def test_v2_draws_one_or_two_objects_v1_one_to_four(scenes, scenes_v1):
    counts = Counter(len(s.objects) for s in scenes)
    assert set(counts) == {1, 2} and min(counts.values()) >= len(scenes) // 3
    counts = Counter(len(s.objects) for s in scenes_v1)
    assert set(counts) == {1, 2, 3, 4} and min(counts.values()) >= len(scenes_v1) // 8
    assert {o.shape for s in scenes for o in s.objects} == set(SHAPES)
    assert {o.shape for s in scenes_v1 for o in s.objects} == set(SHAPES_V1)


def test_v1_scenes_are_still_the_ones_old_seeds_drew():
    """Datasets written by generator v1 can be redrawn: the same objects, sizes, tags and captions."""
    first = list(generate(3, seed=5, version=1))
    assert [s.captions[0] for s in first] == [
        "a yellow star and an orange cross on a white background",
        "a yellow triangle, a yellow square and a purple cross on a white background",
        "a purple triangle, a yellow star, an orange square and a green triangle on a black background",
    ]
    assert [round(o.radius, 3) for o in first[2].objects] == [18.936, 21.456, 21.838, 15.954]
    assert all(o.angle != 0 for s in first for o in s.objects if o.shape != "circle")


def test_colours_can_be_held_back():
    drawn = list(generate(60, seed=2, colours=["red", "blue"]))
    assert {o.colour for s in drawn for o in s.objects} == {"red", "blue"}
    assert all(not set(s.tags) & (set(COLOURS) - {"red", "blue"}) for s in drawn)
    with pytest.raises(ValueError, match="subset"):
        draw_scene(1, colours=["red", "teal"])


def test_tags_are_the_colours_and_shapes_of_the_objects_plus_the_background(scenes):
    for s in scenes:
        assert s.tags == sorted({o.colour for o in s.objects} | {o.shape for o in s.objects} | {s.background})
        assert set(s.tags) <= set(TAGS) and sum(t in BACKGROUNDS for t in s.tags) == 1


def test_objects_are_large_upright_and_apart_in_v2(scenes):
    for s in scenes:
        for o in s.objects:
            assert 0.28 <= 2 * o.radius / s.image.width <= 0.70 and o.angle == 0
            assert o.visible == 1.0
        if len(s.objects) == 2:  # the circumscribed circles may overlap (a bar is thin), the pixels may not
            a, b = s.objects
            assert np.hypot(a.center[0] - b.center[0], a.center[1] - b.center[1]) > 0.25 * (a.radius + b.radius)


def test_objects_are_large_enough_for_64_pixels_and_mostly_visible_in_v1(scenes_v1):
    for s in scenes_v1:
        for o in s.objects:
            assert 0.2 <= 2 * o.radius / s.image.width <= 0.5
            assert o.visible >= 0.75


def test_a_ring_is_hollow_and_a_bar_is_long():
    ring = next(s for s in generate(200, seed=3) if [o.shape for o in s.objects] == ["ring"])
    bar = next(s for s in generate(200, seed=3) if [o.shape for o in s.objects] == ["bar"])
    (o,) = ring.objects
    cx, cy = map(int, o.center)
    centre = np.asarray(ring.image)[cy, cx].astype(np.float32)
    assert np.linalg.norm(centre - np.array(COLOURS[o.colour])) > 90  # the middle shows the background
    (o,) = bar.objects
    mask = np.linalg.norm(np.asarray(bar.image).astype(np.float32) - np.array(COLOURS[o.colour]), axis=-1) < 40
    ys, xs = np.nonzero(mask)
    assert (xs.max() - xs.min()) > 3 * (ys.max() - ys.min())


def test_a_lone_object_colour_dominates_the_image_at_64_pixels_after_jpeg(scenes):
    lone = [s for s in scenes if len(s.objects) == 1]
    assert len(lone) >= 20
    for s in lone:
        found = nearest(at_64_after_jpeg(s.image), COLOURS, within=60)
        assert found.most_common(1)[0][0] == s.objects[0].colour, (s.tags, found)


def test_the_background_tag_is_the_most_common_surface(scenes):
    for s in scenes[:40]:
        assert nearest(at_64_after_jpeg(s.image), BACKGROUNDS, within=80).most_common(1)[0][0] == s.background


def test_the_first_caption_names_every_tag_and_all_captions_name_the_objects(scenes):
    for s in scenes:
        assert 2 <= len(s.captions) <= 3
        assert all(tag in s.captions[0] for tag in s.tags), (s.tags, s.captions[0])
        for caption in s.captions:
            assert all(o.colour in caption and o.shape in caption for o in s.objects), caption


def test_repeated_objects_are_counted_in_the_first_caption(scenes):
    twice = next(s for s in scenes if max(Counter((o.colour, o.shape) for o in s.objects).values()) == 2)
    (colour, shape), _ = Counter((o.colour, o.shape) for o in twice.objects).most_common(1)[0]
    assert f"two {colour} {shape}" in twice.captions[0]


# ------------------------------------------------------------------------------------------ manifests


def test_split_gives_val_exactly_its_share_of_every_prefix():
    for n in (1, 5, 10, 37, 1000):
        assert sum(split_of(i, 0.2) == "val" for i in range(n)) == int(n * 0.2)
    assert all(split_of(i, 0.0) == "train" for i in range(50))
    assert all(split_of(i, 1.0) == "val" for i in range(50))


def test_a_manifest_round_trips_on_disk(tmp_path):
    records = [
        ManifestRecord(uri="images/0.jpg", captions=["a red circle on a black background"], tags=["red", "circle"], split="train"),
        ManifestRecord(uri="s3://b/x.jpg", captions=["one", "two"], tags=[]),
    ]
    assert write_manifest(tmp_path / "m" / "manifest.jsonl", records) == 2
    assert read_manifest(tmp_path / "m" / "manifest.jsonl") == records
    assert resolve_uri(tmp_path / "m" / "manifest.jsonl", "images/0.jpg") == str(tmp_path / "m" / "images" / "0.jpg")
    assert resolve_uri("s3://bucket/ds/manifest.jsonl", "images/0.jpg") == "s3://bucket/ds/images/0.jpg"
    assert resolve_uri("s3://bucket/ds/manifest.jsonl", "s3://b/x.jpg") == "s3://b/x.jpg"


@pytest.mark.parametrize(
    ("bad_line", "says"),
    [
        ('{"uri": "a.jpg", "captions": [', "not JSON"),
        ('{"uri": "a.jpg", "tags": ["red"]}', "captions"),
        ('{"uri": "a.jpg", "captions": []}', "captions"),
        ('{"uri": "a.jpg", "captions": ["x"], "split": "dev"}', "split"),
        ('{"uri": "a.jpg", "captions": ["x"], "caption": "typo"}', "caption"),
        ('["a.jpg"]', "JSON object"),
    ],
)
def test_a_malformed_line_is_named_by_its_number(tmp_path, bad_line, says):
    good = '{"uri": "a.jpg", "captions": ["a caption"]}'
    path = tmp_path / "manifest.jsonl"
    path.write_text(f"{good}\n\n{bad_line}\n{good}\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    assert f"{path}:3:" in str(info.value) and says in str(info.value)


def test_a_missing_manifest_says_so(tmp_path):
    with pytest.raises(ManifestError, match="no such manifest"):
        read_manifest(tmp_path / "nope.jsonl")


class MemoryS3:
    """The few boto3 S3 client calls the writers use, over a dict (thread-safe enough for dict sets)."""

    class exceptions:  # mirrors boto3's client.exceptions
        class ClientError(Exception):
            def __init__(self) -> None:
                self.response = {"Error": {"Code": "404"}}

        class NoSuchKey(Exception):
            pass

    def __init__(self, buckets: set[str]) -> None:
        self.buckets, self.objects = buckets, {}

    def head_bucket(self, Bucket: str) -> None:
        if Bucket not in self.buckets:
            raise self.exceptions.ClientError()

    def put_object(self, Bucket: str, Key: str, Body: bytes, ContentType: str) -> None:
        self.objects[(Bucket, Key)] = Body

    def get_object(self, Bucket: str, Key: str) -> dict:
        if (Bucket, Key) not in self.objects:
            raise self.exceptions.NoSuchKey()
        return {"Body": io.BytesIO(self.objects[(Bucket, Key)])}


def test_an_s3_dataset_has_the_same_objects_as_a_folder(tmp_path):
    client = MemoryS3({"bkt"})
    summary = write_dataset("s3://bkt/ds", n=30, seed=2, size=48, client=client, workers=3, progress=False)
    write_dataset(str(tmp_path), n=30, seed=2, size=48, progress=False)
    assert summary.manifest == "s3://bkt/ds/manifest.jsonl"
    local = {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert {k.removeprefix("ds/"): v for (_, k), v in client.objects.items()} == local
    assert read_manifest(summary.manifest, client=client) == read_manifest(tmp_path / "manifest.jsonl")
    with pytest.raises(ManifestError, match="no such object"):
        read_manifest("s3://bkt/other.jsonl", client=client)


def test_a_missing_bucket_fails_before_anything_is_drawn():
    with pytest.raises(DatasetError, match="bucket missing"):
        write_dataset("s3://nope/ds/", n=3, seed=0, client=MemoryS3(set()), progress=False)


# ------------------------------------------------------------------------------------------------ CLI


def test_data_synth_writes_a_dataset_to_a_folder(tmp_path):
    out = tmp_path / "ds"
    result = runner.invoke(app, ["data", "synth", str(out), "--n", "10", "--seed", "1", "--size", "64", "--val-fraction", "0.2"])
    assert result.exit_code == 0, result.output
    assert "wrote 10 images (8 train, 2 val)" in result.stdout
    records = read_manifest(out / "manifest.jsonl")
    assert [r.split for r in records].count("val") == 2
    for record, scene in zip(records, generate(10, seed=1, size=64)):
        assert record.tags == scene.tags and record.captions == scene.captions
        with Image.open(resolve_uri(out / "manifest.jsonl", record.uri)) as image:
            assert image.format == "JPEG" and image.size == (64, 64)
    meta = json.loads((out / "tags.json").read_text())
    assert meta["tags"] == TAGS and meta["descriptions"] == describe_tags() and meta["generator"]["seed"] == 1
    official = load_descriptions(out / "descriptions.json")
    assert [next(iter(item)) for item in official] == TAGS and official[0]["red"][0] == "a photo of a red."


def test_data_synth_errors_are_one_line_and_exit_2(tmp_path):
    (tmp_path / "file").write_text("in the way")
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "file"), "--n", "2"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


def test_data_synth_draws_with_an_older_generator_or_fewer_colours(tmp_path):
    out = tmp_path / "v1"
    result = runner.invoke(app, ["data", "synth", str(out), "--n", "6", "--size", "64", "--generator", "1", "--colours", "red, blue"])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "tags.json").read_text())
    assert meta["generator"]["version"] == 1 and meta["generator"]["colours"] == ["red", "blue"]
    assert meta["groups"] == {**tag_groups(1), "colour": ["red", "blue"]}
    assert [next(iter(item)) for item in load_descriptions(out / "descriptions.json")] == meta["tags"]
    for record, scene in zip(read_manifest(out / "manifest.jsonl"), generate(6, size=64, version=1, colours=["red", "blue"])):
        assert record.tags == scene.tags and set(record.tags) <= set(meta["tags"])
    for args, says in ((["--generator", "7"], "unknown generator version 7"), (["--colours", "teal"], "subset")):
        bad = runner.invoke(app, ["data", "synth", str(tmp_path / "bad"), "--n", "2", *args])
        assert bad.exit_code == 2 and says in bad.stderr, bad.output
        assert not (tmp_path / "bad" / "manifest.jsonl").exists()
