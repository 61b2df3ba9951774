"""Backfill over a real S3 server (s3proxy), with a local Ray, the tiny model and the Redis vocabulary store."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import redis

from helpers import jpeg_bytes, random_images
from fleet_kit import fleet_settings, make_topics, publish, wait_until
from integration.test_hot_swap import all_results, make_vocab
from workers.backfill.run import run_backfill
from workers.stream.fleet import Fleet
from workers.settings import BackfillSettings, FetchSettings, ModelSettings, S3Settings, Settings
from workers.vocab.store import VocabStore

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
MAX_BYTES = 40_000


def backfill_settings(stack, tiny_model_dir, bucket: str, **backfill) -> Settings:
    return Settings(
        s3=S3Settings(endpoint_url=stack.s3_endpoint, bucket=bucket),
        fetch=FetchSettings(timeout_s=5, attempts=2),
        model=ModelSettings(checkpoint=str(tiny_model_dir), device="cpu"),
        redis={"url": stack.redis_url},
        backfill=BackfillSettings(**{"input": f"s3://{bucket}/images/", "output": f"s3://{bucket}/out/", **backfill}),
    )


def upload_mixed(s3_client, bucket: str, good: int = 472) -> dict[str, str]:
    """{key: expected outcome}: 'ok', or the error kind the report must give."""
    expected: dict[str, str] = {}
    for i, image in enumerate(random_images(good, seed=5, size=(80, 64))):
        key = f"images/{'png' if i % 10 == 0 else 'jpg'}/{i:04d}.{'png' if i % 10 == 0 else 'jpg'}"
        body = jpeg_bytes(image) if i % 10 else _png(image)
        s3_client.put_object(Bucket=bucket, Key=key, Body=body)
        expected[key] = "ok"
    for i in range(20):  # a JPEG cut short: its header reads, its data does not
        key = f"images/corrupt/{i:02d}.jpg"
        s3_client.put_object(Bucket=bucket, Key=key, Body=jpeg_bytes(random_images(1, seed=100 + i)[0])[:400])
        expected[key] = "decode"
    for i in range(5):
        key = f"images/text/{i}.jpg"
        s3_client.put_object(Bucket=bucket, Key=key, Body=f"not an image {i}\n".encode() * 20)
        expected[key] = "not_image"
    for i in range(3):
        key = f"images/huge/{i}.jpg"
        s3_client.put_object(Bucket=bucket, Key=key, Body=os.urandom(MAX_BYTES + 1 + i))
        expected[key] = "too_large"
    s3_client.put_object(Bucket=bucket, Key="images/README.txt", Body=b"excluded by the include patterns")
    return expected


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def read_output(s3_client, bucket: str, run_uri: str) -> tuple[list[dict], list[dict], dict[str, str]]:
    """(result lines, error lines, {shard: results key}) of one run folder."""
    prefix = run_uri.split("/", 3)[3]
    results, errors, shards = [], [], {}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", ()):
            key = obj["Key"]
            body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
            if "/results/" in key:
                shards[key.rsplit("/", 1)[1].split(".")[0]] = key
                if key.endswith(".parquet"):
                    results.extend(pq.read_table(io.BytesIO(body)).to_pylist())
                else:
                    results.extend(json.loads(line) for line in body.decode().splitlines() if line.strip())
            elif "/errors/" in key:
                errors.extend(json.loads(line) for line in body.decode().splitlines() if line.strip())
    return results, errors, shards


def test_every_good_image_is_tagged_once_every_bad_one_is_reported_and_a_rerun_skips_all(
    stack, ray_cluster, tiny_model_dir, s3_client, s3_bucket
):
    expected = upload_mixed(s3_client, s3_bucket)
    assert len(expected) == 500
    settings = backfill_settings(stack, tiny_model_dir, s3_bucket, include=["*.jpg", "*.png"], max_bytes=MAX_BYTES, shard_size=40)

    summary = run_backfill(settings, progress=False)

    good = {k for k, v in expected.items() if v == "ok"}
    assert summary.complete
    assert (summary.listed, summary.selected, summary.excluded) == (501, 500, 1)
    assert summary.images_tagged == len(good) == 472
    assert summary.errors == {"decode": 20, "not_image": 5, "too_large": 3}
    assert summary.shards_written == summary.shards >= 5
    results, errors, shards = read_output(s3_client, s3_bucket, summary.output)
    uris = [r["uri"] for r in results]
    assert sorted(uris) == sorted(f"s3://{s3_bucket}/{k}" for k in good)  # each exactly once
    assert all(r["id"] == r["uri"] and r["vocab"] == "tiny-vocab@1" and r["model"] == "tiny@64" for r in results)
    assert all(r["tags"] == sorted(r["tags"], key=lambda t: -t["score"]) for r in results)
    assert sum(1 for r in results if r["tags"]) > 400  # thresholds 0.3: the random model fires
    reported = {e["uri"].split("/", 3)[3]: e for e in errors}
    assert len(reported) == len(errors) == 28
    assert {k: e["kind"] for k, e in reported.items()} == {k: v for k, v in expected.items() if v != "ok"}
    assert all(e["message"] for e in errors)
    assert all("not read" in reported[f"images/huge/{i}.jpg"]["message"] for i in range(3))
    summary_object = json.loads(s3_client.get_object(Bucket=s3_bucket, Key=summary.output.split("/", 3)[3] + "summary.json")["Body"].read())
    assert summary_object["images_tagged"] == 472

    again = run_backfill(settings, progress=False)
    assert again.output == summary.output
    assert (again.images_tagged, again.shards_written, again.images_skipped) == (0, 0, 500)
    assert again.shards_skipped == summary.shards
    assert read_output(s3_client, s3_bucket, summary.output)[2] == shards  # nothing rewritten

    # Another vocabulary version is another run: nothing of the first counts as done for it.
    store = VocabStore(redis.Redis.from_url(stack.redis_url))
    name = f"bf-{uuid.uuid4().hex[:8]}"
    store.publish(make_vocab(name, "1", seed=3, n=6))
    store.activate(name, "1")
    other = run_backfill(settings.model_copy(update={"backfill": settings.backfill.model_copy(update={"vocab": name, "format": "parquet"})}), progress=False)
    assert other.vocab == f"{name}@1" and other.output != summary.output
    assert (other.images_tagged, other.images_skipped) == (472, 0)
    parquet_results = read_output(s3_client, s3_bucket, other.output)[0]
    assert sorted(r["uri"] for r in parquet_results) == sorted(uris)
    assert {r["vocab"] for r in parquet_results} == {f"{name}@1"}


def summary_line(stdout: str) -> dict:
    """The job's JSON summary: its last line of its own, though Ray may print after it while shutting down
    (CI saw a raylet line about the killed tagging actor come last)."""
    lines = [line for line in stdout.splitlines() if line.startswith('{"input"') and '"complete"' in line]
    assert lines, f"no summary line in:\n{stdout[-3000:]}"
    return json.loads(lines[-1])


def test_interrupted_job_resumes_without_tagging_again_what_was_written(stack, tiny_model_dir, s3_client, s3_bucket):
    keys = []
    for i, image in enumerate(random_images(400, seed=9, size=(640, 480))):  # big enough to take seconds
        keys.append(f"images/{i:04d}.jpg")
        s3_client.put_object(Bucket=s3_bucket, Key=keys[-1], Body=jpeg_bytes(image))
    env = {
        **os.environ, **stack.env, "RAMPLUS_S3__ENDPOINT_URL": stack.s3_endpoint, "RAMPLUS_MODEL__CHECKPOINT": str(tiny_model_dir),
        "RAMPLUS_MODEL__DEVICE": "cpu", "RAMPLUS_REDIS__URL": stack.redis_url, "RAMPLUS_LOG__FORMAT": "json",
    }
    env.pop("RAY_ADDRESS", None)  # its own local Ray, as `python jobs/backfill.py` on a laptop
    cmd = [sys.executable, str(ROOT / "jobs" / "backfill.py"), "--input", f"s3://{s3_bucket}/images/",
           "--output", f"s3://{s3_bucket}/out/", "--shard-size", "10", "--decode-tasks", "1", "--no-progress"]
    first = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def done_shards() -> int:
        pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix="out/")
        return sum(1 for page in pages for o in page.get("Contents", ()) if "/results/" in o["Key"])

    try:
        # Interrupt at the first finished shard, while the run is surely still going: the widest window, and
        # the check below tells a run that won the race apart from a signal the backfill failed to honour.
        assert wait_until(lambda: done_shards() >= 1 or first.poll() is not None, 300, interval_s=0.05)
        assert first.poll() is None, "the first run finished before it could be interrupted"
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err[-3000:]
    interrupted = summary_line(out)
    assert not interrupted["complete"]
    written = done_shards()
    assert 0 < interrupted["shards_written"] == written < interrupted["shards"], "interrupt it before the end"

    second = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = summary_line(second.stdout)
    assert summary["complete"] and summary["output"] == interrupted["output"]
    assert summary["shards_skipped"] == written
    assert summary["images_skipped"] == interrupted["images_written"] > 0  # what the first run wrote is not tagged again
    assert summary["images_tagged"] == 400 - interrupted["images_written"]
    assert summary["images_skipped"] + summary["images_tagged"] == 400
    results, errors, _ = read_output(s3_client, s3_bucket, summary["output"])
    assert sorted(r["uri"] for r in results) == sorted(f"s3://{s3_bucket}/{k}" for k in keys)  # each exactly once
    assert errors == []


def test_backfill_and_fleet_give_the_same_tags_and_scores(stack, ray_cluster, tiny_model_dir, s3_client, s3_bucket):
    store = VocabStore(redis.Redis.from_url(stack.redis_url))
    name = f"same-{uuid.uuid4().hex[:8]}"
    store.publish(make_vocab(name, "7", seed=4, n=10))
    keys = []
    # Large enough that the CPU path decodes them at half scale (draft) and the batched decoder does not.
    for i, image in enumerate(random_images(120, seed=21, size=(144, 192))):
        keys.append(f"images/{i:03d}.jpg")
        s3_client.put_object(Bucket=s3_bucket, Key=keys[-1], Body=jpeg_bytes(image))

    topic, _ = make_topics(stack.kafka_bootstrap, f"bf-{uuid.uuid4().hex[:8]}")
    publish(stack.kafka_bootstrap, topic, [
        (f"r{i}", json.dumps({"id": f"r{i}", "uri": f"s3://{s3_bucket}/{k}", "vocab": f"{name}@7"}).encode()) for i, k in enumerate(keys)
    ])
    fleet = Fleet(fleet_settings(stack, tiny_model_dir, s3_bucket, topic).model_copy(update={"redis": Settings(redis={"url": stack.redis_url}).redis}))
    fleet.start()
    try:
        assert wait_until(lambda: len(all_results(s3_client, s3_bucket)) >= len(keys), 240, interval_s=2)
    finally:
        fleet.stop()
    streamed = {r["uri"]: r for r in all_results(s3_client, s3_bucket)}

    summary = run_backfill(backfill_settings(stack, tiny_model_dir, s3_bucket, vocab=f"{name}@7", shard_size=30), progress=False)
    backfilled = {r["uri"]: r for r in read_output(s3_client, s3_bucket, summary.output)[0]}

    assert set(streamed) == set(backfilled) == {f"s3://{s3_bucket}/{k}" for k in keys}
    assert sum(1 for r in streamed.values() if r["tags"]) > 60
    for uri, s in streamed.items():
        b = backfilled[uri]
        assert (s["vocab"], s["model"]) == (b["vocab"], b["model"]) == (f"{name}@7", "tiny@64")
        assert [t["tag"] for t in s["tags"]] == [t["tag"] for t in b["tags"]], uri
        for ts, tb in zip(s["tags"], b["tags"]):
            assert abs(ts["score"] - tb["score"]) <= 1e-5, (uri, ts, tb)

    # JPEGs left to the replicas' batched decoder (what a GPU backfill does; torchvision's decoder on the CPU
    # here): the tasks ship the checked bytes, the replica decodes them with its batch at full size (no DCT
    # draft), so the scores agree within the device-decode tolerance (tests/unit/test_device_decode.py).
    settings = backfill_settings(stack, tiny_model_dir, s3_bucket, vocab=f"{name}@7", shard_size=30, output=f"s3://{s3_bucket}/out-batched/")
    batched_summary = run_backfill(settings.model_copy(update={"model": settings.model.model_copy(update={"decode": "gpu"})}), progress=False)
    batched = {r["uri"]: r for r in read_output(s3_client, s3_bucket, batched_summary.output)[0]}
    assert set(batched) == set(streamed) and batched_summary.images_tagged == len(keys)
    same_tags, moved = 0, 0.0
    for uri, s in streamed.items():
        scores = {t["tag"]: t["score"] for t in batched[uri]["tags"]}
        same_tags += set(scores) == {t["tag"] for t in s["tags"]}
        differences = [abs(scores[t["tag"]] - t["score"]) for t in s["tags"] if t["tag"] in scores]
        assert all(d < 0.05 for d in differences), uri
        moved = max([moved, *differences])
    assert same_tags >= 0.9 * len(keys)
    assert moved > 1e-4  # the batched decoder really ran: PIL's path would give the fleet's scores exactly


def test_bad_arguments_fail_fast_with_a_clear_error(stack, tiny_model_dir, s3_bucket, monkeypatch):
    import importlib.util

    import typer
    from typer.testing import CliRunner

    spec = importlib.util.spec_from_file_location("backfill_job", ROOT / "jobs" / "backfill.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    app = typer.Typer()
    app.command()(job.main)
    for key, value in {**stack.env, "RAMPLUS_S3__ENDPOINT_URL": stack.s3_endpoint, "RAMPLUS_MODEL__CHECKPOINT": str(tiny_model_dir),
                       "RAMPLUS_MODEL__DEVICE": "cpu"}.items():
        monkeypatch.setenv(key, value)
    cases = {
        ("--input", f"s3://no-such-{uuid.uuid4().hex[:6]}/x/", "--output", f"s3://{s3_bucket}/out/"): "--input: bucket",
        ("--input", f"s3://{s3_bucket}/", "--output", f"s3://{s3_bucket}/out/"): "inside --input",
        ("--input", f"{s3_bucket}/images", "--output", f"s3://{s3_bucket}/out/"): "expected s3://bucket/prefix",
        ("--input", f"s3://{s3_bucket}/images/", "--output", f"s3://{s3_bucket}/out/", "--format", "csv"): "format",
        ("--output", f"s3://{s3_bucket}/out/"): "needs --input",
    }
    for args, message in cases.items():
        done = CliRunner().invoke(app, [*args, "--no-progress"])
        assert done.exit_code == 2, (args, done.output[-2000:])
        assert message in done.output, (args, done.output[-2000:])


def test_backfills_of_other_inputs_into_one_output_keep_each_others_results(stack, ray_cluster, tiny_model_dir, s3_client, s3_bucket):
    """Issue 24: the output folder identifies the whole run, so a complete run deletes only what it superseded
    itself (a rerun with other shard boundaries), never another backfill's results."""
    for name, seed in (("set-a", 31), ("set-b", 32)):
        for i, image in enumerate(random_images(12, seed=seed, size=(64, 48))):
            s3_client.put_object(Bucket=s3_bucket, Key=f"{name}/{i:02d}.jpg", Body=jpeg_bytes(image))

    def backfill(name: str, **options):
        options = {"shard_size": 4, "input": f"s3://{s3_bucket}/{name}/", **options}
        return run_backfill(backfill_settings(stack, tiny_model_dir, s3_bucket, **options), progress=False)

    a, b = backfill("set-a"), backfill("set-b")
    assert a.complete and b.complete and a.output != b.output
    assert (a.images_tagged, b.images_tagged) == (12, 12)
    a_results, _, a_shards = read_output(s3_client, s3_bucket, a.output)
    assert sorted(r["uri"] for r in a_results) == [f"s3://{s3_bucket}/set-a/{i:02d}.jpg" for i in range(12)]  # intact after b
    assert b.shards_superseded == 0
    assert len(read_output(s3_client, s3_bucket, b.output)[0]) == 12

    # Parquet is another run (a jsonl folder's shards are not "done" for it), not a skip of everything.
    parquet = backfill("set-a", format="parquet")
    assert parquet.output != a.output and parquet.images_tagged == 12

    # The same backfill with other shard boundaries: its own old shards are superseded and removed.
    resharded = backfill("set-a", shard_size=50)
    assert resharded.output == a.output and resharded.images_tagged == 12 and resharded.shards_superseded == len(a_shards)
    results, _, shards = read_output(s3_client, s3_bucket, a.output)
    assert sorted(r["uri"] for r in results) == sorted(r["uri"] for r in a_results)  # each once, none lost
    assert not set(shards) & set(a_shards)


def test_a_rerun_redoes_the_shards_whose_errors_were_transient(stack, ray_cluster, tiny_model_dir, s3_client, s3_bucket):
    """--retry-transient on purpose (issue 24): a shard that reported a fetch error (S3 away for that image) is
    done again by the next run and then reports none; a shard with only final errors is not; without the
    option nothing is redone."""
    from workers.backfill.report import BackfillError

    for i, image in enumerate(random_images(12, seed=33, size=(64, 48))):
        s3_client.put_object(Bucket=s3_bucket, Key=f"set-c/{i:02d}.jpg", Body=jpeg_bytes(image))
    settings = backfill_settings(stack, tiny_model_dir, s3_bucket, shard_size=4, input=f"s3://{s3_bucket}/set-c/")
    first = run_backfill(settings, progress=False)
    results, errors, shards = read_output(s3_client, s3_bucket, first.output)
    assert first.complete and len(results) == 12 and not errors and len(shards) >= 2
    run = first.output.split("/", 3)[3]

    # As the first run would have left it had S3 failed one image of a shard: the result missing, a fetch error.
    name, key = sorted(shards.items())[0]
    body = s3_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read().decode().splitlines()
    lost = json.loads(body[0])
    s3_client.put_object(Bucket=s3_bucket, Key=key, Body=("\n".join(body[1:]) + "\n").encode())
    fetch_error = BackfillError(uri=lost["uri"], kind="fetch", message="S3 away", size=1, etag="x").model_dump_json()
    s3_client.put_object(Bucket=s3_bucket, Key=f"{run}errors/{name}.jsonl", Body=fetch_error.encode() + b"\n")

    without = run_backfill(settings.model_copy(update={"backfill": settings.backfill.model_copy(update={"retry_transient": False})}), progress=False)
    assert (without.shards_retried, without.images_tagged, without.images_skipped) == (0, 0, 12)

    again = run_backfill(settings, progress=False)
    assert again.shards_retried == 1 and again.images_tagged == len(body) and again.images_skipped == 12 - len(body)
    results, errors, _ = read_output(s3_client, s3_bucket, first.output)
    assert sorted(r["uri"] for r in results) == sorted(f"s3://{s3_bucket}/set-c/{i:02d}.jpg" for i in range(12)) and not errors

    assert run_backfill(settings, progress=False).shards_retried == 0  # nothing transient left
