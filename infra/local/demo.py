"""The whole RAMPlus lifecycle on one machine, in minutes: `make run` runs this.

    python infra/local/demo.py [--quick] [--checkpoint ram_plus_swin_large_14m.pth --tag-list ram_tag_list.txt]

1. the local real stack (Kafka in KRaft mode, redis-server, s3proxy; installed the first time) and a Ray
   head of its own (`ray start --head` on free ports, token auth; another Ray on the machine is left alone);
2. a synthetic image-tag-text dataset in S3, and a tiny RAM++ trained on it by `jobs/retrain.py` submitted
   to that cluster through Ray's job API (Ray Train, 2 CPU workers, checkpoints in S3); a model trained by
   an earlier run with the same recipe is reused (`--retrain` trains again);
3. its vocabulary in Redis (`demo@1`: every trained tag with its calibrated threshold) and a second
   version (`demo@2`: the object tags only, no backgrounds);
4. the fleet (2 replicas as Ray actors) reading a fresh Kafka topic; a few hundred image URIs (synthetic
   scenes plus scikit-image's real photos, all in S3, plus three bad requests) published to it; `demo@2`
   activated in the middle of the stream;
5. a backfill of an S3 prefix with the same model;
6. a summary table and `var/demo/report.html` (each image with its tags, scores and vocabulary version);
   with `--checkpoint`, the real photos tagged by the official RAM++ as well.

It stops what it started (servers that were already running stay up) and prints where everything is.

A little past the house's 400 lines: the script is the product's tour and reads top to bottom, one function
per step above. What it reports and the Ray head it starts are beside it (demo_report.py, local_ray.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Optional

import typer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `infra.local` (the stack and its kit) lives in the repository, not the wheel

from infra.local import kit  # noqa: E402
from infra.local.local_ray import LocalRay  # noqa: E402
from infra.local.demo_report import DemoResult, DemoSummary, Timings, print_summary, say, what_next, write_report  # noqa: E402

BUCKET = "ramplus-demo"
VOCAB = "demo"  # the demo owns this vocabulary name in Redis and recreates it on every run
OBJECT_GROUPS = ("colour", "shape")  # demo@2 keeps these tag groups
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class Recipe:
    """How big the demo is. The model part is the reuse key: same recipe, same trained model."""

    images: int  # synthetic dataset (80% train, 20% held out)
    epochs: int
    max_minutes: float
    stream: int  # synthetic scenes published to the fleet (plus the photos and 3 bad requests)
    backfill: int  # synthetic scenes in the backfilled prefix (plus the photos)

    def model_key(self) -> str:
        from ramplus_core.synthetic import GENERATOR_VERSION

        text = json.dumps({"g": GENERATOR_VERSION, "n": self.images, "e": self.epochs, "m": self.max_minutes, "model": "tiny@64"})
        return hashlib.sha256(text.encode()).hexdigest()[:10]


FULL = Recipe(images=2000, epochs=50, max_minutes=5.0, stream=240, backfill=120)
QUICK = Recipe(images=1000, epochs=30, max_minutes=3.0, stream=60, backfill=30)


# --------------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------------


def start_stack(stack: ModuleType, config: Any) -> list[str]:
    """Bring every service up; returns the ones this run started (and so must stop)."""
    before = {s for s, st in stack.status(config).items() if st["ready"]}
    stack.up(config)
    return [s for s in ("kafka", "redis", "s3") if s not in before]


def exists(client: Any, key: str) -> bool:
    return bool(client.list_objects_v2(Bucket=BUCKET, Prefix=key, MaxKeys=1).get("KeyCount", 0))


def write_photos(client: Any, prefix: str) -> dict[str, bytes]:
    """scikit-image's bundled photos as JPEGs in S3; returns {uri: bytes}."""
    from workers.io.samples import sample_photos

    out = {}
    for name, data in sample_photos(quality=90).items():
        key = f"{prefix}{name}.jpg"
        client.put_object(Bucket=BUCKET, Key=key, Body=data, ContentType="image/jpeg")
        out[f"s3://{BUCKET}/{key}"] = data
    return out


def train_vocabulary() -> Any:
    from ramplus_core import Vocabulary
    from ramplus_core.synthetic import TAGS, describe_tags
    from ramplus_core.text_encoder import TextEncoder

    encoder = TextEncoder("ramplus-tiny-text", None)  # random weights, seed 0: what the job embeds captions with
    descriptions = describe_tags()
    return Vocabulary.from_descriptions(
        [{t: descriptions[t]} for t in TAGS], encoder.encode, text_encoder=encoder.id, name=VOCAB, version="train", thresholds=0.5,
    )


def train_or_reuse(
    settings: Any, client: Any, recipe: Recipe, work: Path, dashboard: str, *, retrain: bool = False
) -> tuple[str, dict[str, Any], bool]:
    """The artifact URI, its final metrics, and whether it was trained now (False: reused)."""
    from workers.train.synth_data import write_dataset

    run_name = f"synth-{recipe.model_key()}"
    artifact = f"s3://{BUCKET}/models/{run_name}/v1"
    if retrain:  # the model and the run's checkpoints (else the job would resume the finished run)
        for prefix in (f"models/{run_name}/", f"runs/{run_name}/"):
            delete_prefix(client, prefix)
    if exists(client, f"models/{run_name}/v1/"):
        say(f"   reusing {artifact} (trained by an earlier run with the same recipe; delete it to retrain)")
        return artifact, artifact_metrics(artifact, settings), False
    from ramplus_core.synthetic import GENERATOR_VERSION

    dataset = f"synth-v{GENERATOR_VERSION}-{recipe.images}"  # a dataset of another generator is another dataset
    data = f"s3://{BUCKET}/{dataset}/"
    if not exists(client, f"{dataset}/manifest.jsonl"):
        summary = write_dataset(data, n=recipe.images, seed=0, size=96, s3=settings.s3, progress=False)
        say(f"   dataset: {summary.train} train + {summary.val} held-out scenes in {summary.seconds:.0f} s ({data})")
    vocab_file = train_vocabulary().save(work / "train-vocab.safetensors")
    config = work / "retrain.toml"
    config.write_text(RETRAIN_CONFIG.format(
        s3=settings.s3.endpoint_url, region=settings.s3.region, run_name=run_name, bucket=BUCKET, data=data,
        vocab=vocab_file.resolve(), epochs=recipe.epochs, minutes=recipe.max_minutes,
    ))
    say(f"   ray job submit ... jobs/retrain.py --config {config}: tiny@64 from scratch, 2 Ray Train workers, "
        f"{recipe.epochs} epochs or {recipe.max_minutes:g} min, checkpoints in s3://{BUCKET}/runs/")
    artifact = submit_retrain(dashboard, config)
    return artifact, artifact_metrics(artifact, settings), True


# What `ray job submit` gets (README "Retraining"): the stack's addresses and the demo's recipe.
RETRAIN_CONFIG = """
[s3]
endpoint_url = "{s3}"
region = "{region}"

[train]
run_name = "{run_name}"
manifest = "{data}manifest.jsonl"
storage_path = "s3://{bucket}/runs"
output = "s3://{bucket}/models"
model = "tiny@64"
vocabulary = "{vocab}"
text_encoder = "ramplus-tiny-text"
text_weights = "none"
epochs = {epochs}
max_minutes = {minutes}
batch_size = 16
lr = 5e-4
warmup_steps = 20
workers = 2
cpus_per_worker = 1
"""


def submit_retrain(dashboard: str, config: Path, timeout_s: float = 900) -> str:
    """jobs/retrain.py through Ray's job API (what `ray job submit --working-dir .` does); its artifact URI."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(dashboard)
    agent_deadline = time.monotonic() + 90
    while True:  # the head's job agent comes up a few seconds after `ray start`
        try:
            job = jobs.submit_job(
                entrypoint=f"{sys.executable} jobs/retrain.py --config {config.resolve()} --version v1",
                # .gitignore'd paths (var/, .venv/) stay out of the upload; no log dedup (it merges the ranks' lines)
                runtime_env={"working_dir": str(ROOT), "env_vars": {"RAY_DEDUP_LOGS": "0"}},
            )
            break
        except RuntimeError as exc:
            if "agent" not in str(exc).lower() or time.monotonic() > agent_deadline:
                raise
            time.sleep(2)
    deadline, shown = time.monotonic() + timeout_s, set()
    while True:
        status = jobs.get_job_status(job)
        lines = jobs.get_job_logs(job).splitlines()
        for line in lines:  # rank 0's epoch lines (it evaluates), as they come
            fields = dict(re.findall(r"(\w+)=(\S+)", ANSI.sub("", line)))
            if "retrain.epoch" in line and fields.get("rank") == "0" and fields.get("epoch") not in shown:
                shown.add(fields.get("epoch"))
                say(f"   | retrain.epoch {fields.get('epoch')}: {float(fields.get('elapsed_s', 'nan')):.0f} s, "
                    f"loss {float(fields.get('train_loss', 'nan')):.2f}, held-out mAP {float(fields.get('val_map', 'nan')):.3f}")
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        if time.monotonic() > deadline:
            jobs.stop_job(job)
            raise RuntimeError(f"the retrain job {job} did not finish in {timeout_s:.0f} s")
        time.sleep(2)
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"the retrain job {job} ended {status}:\n" + "\n".join(lines[-40:]))
    summary = next((line for line in reversed(lines) if line.startswith('{"artifact"')), None)
    if summary is None:
        raise RuntimeError(f"the retrain job {job} printed no artifact:\n" + "\n".join(lines[-40:]))
    return json.loads(summary)["artifact"]


def delete_prefix(client: Any, prefix: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
        if keys:
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})


def artifact_metrics(artifact: str, settings: Any) -> dict[str, Any]:
    """metrics.json of a published model: `final` (calibrated thresholds, held-out split) and `history`."""
    from workers.train.artifacts import fetch_artifact

    return json.loads((fetch_artifact(artifact, settings.s3) / "metrics.json").read_text())


def publish_vocabularies(redis_url: str, artifact_vocab: Any) -> tuple[str, str]:
    """demo@1: the trained vocabulary with its calibrated thresholds; demo@2: its object tags only."""
    import redis

    from ramplus_core.synthetic import TAG_GROUPS
    from workers.vocab.store import VocabStore

    store = VocabStore(redis.Redis.from_url(redis_url))
    for key in store.redis.scan_iter(match=f"ramplus:vocab:{VOCAB}:*"):  # the demo's own name: start clean
        store.redis.delete(key)
    objects = [t for g in OBJECT_GROUPS for t in TAG_GROUPS[g]]
    first = store.publish(artifact_vocab, name=VOCAB, version="1")
    second = store.publish(artifact_vocab.select(objects, name=VOCAB, version="2"), name=VOCAB, version="2")
    store.activate(VOCAB, "1")
    return first, second


def read_jsonl(client: Any, prefix: str) -> list[dict[str, Any]]:
    """Every JSON line of the .jsonl objects under `prefix` (result objects and shards)."""
    rows = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", ()):
            if not obj["Key"].endswith(".jsonl"):
                continue
            body = client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read().decode()
            rows.extend(json.loads(line) for line in body.splitlines() if line.strip())
    return rows


def stream(settings: Any, uris: list[str], bad: list[str], second_version: str) -> bool:
    """Fleet up, first half published and tagged, `demo@2` activated, the rest published; all accounted for.
    Returns whether every replica ended on `demo@<second_version>`."""
    import redis
    from kafka import KafkaProducer

    from infra.local.kit import wait_until

    from workers.stream.fleet import Fleet, ensure_topics
    from workers.stream.producer import publish
    from workers.vocab.store import VocabStore

    ensure_topics(settings, partitions=4)
    fleet = Fleet(settings)
    fleet.start()
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")

    def done() -> int:
        return sum(s.get("tagged", 0) + s.get("dead_letters", 0) for s in fleet.stats())

    try:
        half = len(uris) // 2
        first = publish(producer, settings.kafka.topic, uris[:half] + bad)
        if not wait_until(lambda: done() >= first, 300):
            raise RuntimeError(f"the fleet tagged {done()} of the first {first} requests in 5 minutes")
        VocabStore(redis.Redis.from_url(settings.redis.url)).activate(VOCAB, second_version)
        publish(producer, settings.kafka.topic, uris[half:])  # the swap lands while these are in flight
        total = len(uris) + len(bad)
        if not wait_until(lambda: done() >= total, 300):
            raise RuntimeError(f"the fleet answered {done()} of {total} requests in 5 minutes")
        return wait_until(lambda: all(s.get("vocab") == f"{VOCAB}@{second_version}" for s in fleet.stats()), 30)
    finally:
        producer.close()
        fleet.stop()


def official_tags(checkpoint: str, tag_list: Optional[Path], thresholds: Optional[Path], photos: dict[str, bytes], work: Path) -> list[dict[str, Any]]:
    """The photos tagged through `ramplus tag --json` (the CLI a user would run) with the official RAM++ (or
    any checkpoint `ramplus tag` loads)."""
    folder = work / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    by_path = {}
    for uri, data in photos.items():
        path = folder / uri.rsplit("/", 1)[1]
        path.write_bytes(data)
        by_path[str(path)] = uri
    command = [str(Path(sys.executable).parent / "ramplus"), "tag", "--json", "--checkpoint", checkpoint, "--top-k", "12"]
    if tag_list:
        command += ["--tag-list", str(tag_list)]
    if thresholds:
        command += ["--thresholds", str(thresholds)]
    done = subprocess.run([*command, *by_path], capture_output=True, text=True, timeout=900)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"ramplus tag --checkpoint {checkpoint} failed:\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return [r | {"uri": by_path[r["path"]]} for r in rows if "tags" in r]


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------


def main(
    quick: Annotated[bool, typer.Option(help="A smaller demo (the test's): fewer images, a shorter training.")] = False,
    retrain: Annotated[bool, typer.Option(help="Train again even if an earlier run left a model with this recipe.")] = False,
    checkpoint: Annotated[Optional[str], typer.Option(envvar="RAMPLUS_MODEL__CHECKPOINT", help="Official RAM++ .pth (or our artifact): also tag the real photos with it.")] = None,
    tag_list: Annotated[Optional[Path], typer.Option(envvar="RAMPLUS_MODEL__TAG_LIST", help="Official tag list for an official checkpoint.")] = None,
    thresholds: Annotated[Optional[Path], typer.Option(envvar="RAMPLUS_MODEL__THRESHOLDS", help="Official per-tag thresholds.")] = None,
    out: Annotated[Path, typer.Option(help="Where the report and summary go.")] = ROOT / "var" / "demo",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs, Ray Data's execution plans included.")] = False,
) -> None:
    """Run the whole lifecycle on the local real stack and a local Ray; write a summary and an HTML report."""
    if verbose:
        os.environ["RAMPLUS_LOG__LEVEL"] = "DEBUG"  # read by the settings of every step and by the jobs it submits
    # Before anything starts: a wrong path should cost a second, not the five minutes before the photos' turn.
    local = [("--checkpoint", checkpoint if checkpoint and not checkpoint.startswith("s3://") else None),
             ("--tag-list", tag_list), ("--thresholds", thresholds)]
    for flag, path in local:
        if path is not None and not Path(path).exists():
            raise typer.BadParameter(f"{path} does not exist", param_hint=flag)
    try:
        run_demo(QUICK if quick else FULL, retrain=retrain, checkpoint=checkpoint, tag_list=tag_list, thresholds=thresholds, out=out)
    except Exception as exc:  # noqa: BLE001 - any step's error: its message, after what was started is stopped
        typer.echo(f"demo failed: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None


def run_demo(
    recipe: Recipe, *, retrain: bool, checkpoint: str | None, tag_list: Path | None, thresholds: Path | None, out: Path
) -> None:
    started = time.monotonic()
    timings = Timings()
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]
    from infra.local import stack
    config = stack.StackConfig.from_env()
    ours: list[str] = []
    head: LocalRay | None = None
    # Token auth (Ray's default) with a token of the demo's own, set before Ray is imported (it reads the mode
    # then): the head, the driver and the job client all find it in the environment.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", uuid.uuid4().hex)
    ctx: DemoResult | None = None
    try:
        with timings.phase("stack"):
            ours = start_stack(stack, config)
            os.environ.update(stack.env(config))  # credentials and endpoints for boto3, Kafka, Redis and Ray's workers
        from workers.logs import configure_logging
        from workers.settings import FetchSettings, FleetSettings, KafkaSettings, ModelSettings, RedisSettings, S3Settings, Settings

        configure_logging(level="DEBUG" if os.environ.get("RAMPLUS_LOG__LEVEL", "").upper() == "DEBUG" else "WARNING")
        topic = f"demo.requests.{stamp}"
        settings = Settings(
            kafka=KafkaSettings(bootstrap_servers=config.kafka_bootstrap, topic=topic, group_id=f"demo-{stamp}",
                                dead_letter_topic=topic + ".dlq"),
            s3=S3Settings(endpoint_url=config.s3_endpoint, region=config.region, bucket=BUCKET, prefix=f"runs/{stamp}/stream/"),
            redis=RedisSettings(url=config.redis_url, vocabulary=VOCAB, poll_interval_s=0.5),
            fetch=FetchSettings(s3_buckets=[BUCKET], http_hosts=[], timeout_s=5, attempts=2),
            fleet=FleetSettings(replicas=2, cpus_per_replica=0.5, batch_size=16, max_batch_wait_s=0.05, metrics_port=0),
        )
        from workers.io.s3 import ensure_bucket, s3_client

        client = s3_client(settings.s3)
        ensure_bucket(client, BUCKET)

        with timings.phase("ray"):
            head = LocalRay.start(num_cpus=4)
            import ray

            ray.init(address=head.gcs, log_to_driver=False, configure_logging=False)
            dashboard = head.dashboard
            say(f"   Ray head at {head.gcs}, dashboard {head.dashboard}")

        with timings.phase("train"):
            artifact, metrics, trained = train_or_reuse(settings, client, recipe, out, dashboard, retrain=retrain)
            final = metrics.get("final", {})
            say(f"   {artifact}: held-out mAP {final.get('val_map', float('nan')):.3f} (label prior {final.get('prior_map', float('nan')):.3f})")

        with timings.phase("vocabulary"):
            from ramplus_core import load_checkpoint
            from workers.train.artifacts import fetch_artifact

            trained_vocab = load_checkpoint(fetch_artifact(artifact, settings.s3)).vocabulary
            first_ref, second_ref = publish_vocabularies(config.redis_url, trained_vocab)
            say(f"   published {first_ref} ({len(trained_vocab)} tags, active) and {second_ref} (objects only)")

        with timings.phase("stream"):
            from workers.train.synth_data import write_dataset

            photos = write_photos(client, f"runs/{stamp}/photos/")
            write_dataset(f"s3://{BUCKET}/runs/{stamp}/scenes/", n=recipe.stream + recipe.backfill, seed=7, size=96,
                          s3=settings.s3, progress=False)
            scene_uris = [f"s3://{BUCKET}/runs/{stamp}/scenes/images/{i:08d}.jpg" for i in range(recipe.stream)]
            uris = list(scene_uris)
            for k, photo in enumerate(photos):  # the photos spread over the stream, before and after the swap
                uris.insert(k * (len(uris) // len(photos)), photo)
            client.put_object(Bucket=BUCKET, Key=f"runs/{stamp}/bad/not-an-image.jpg", Body=b"this is not a JPEG")
            bad = [f"s3://{BUCKET}/runs/{stamp}/bad/not-an-image.jpg", f"s3://{BUCKET}/runs/{stamp}/bad/missing.jpg",
                   "https://example.com/not-allowlisted.jpg"]
            settings.model = ModelSettings(checkpoint=artifact, device="cpu")
            switched = stream(settings, uris, bad, "2")
            results = read_jsonl(client, f"runs/{stamp}/stream/")
            dlq = kit.dead_letters(config.kafka_bootstrap, topic + ".dlq", len(bad), timeout_s=30, unique=True)

        with timings.phase("backfill"):
            from workers.backfill.run import run_backfill

            for i in range(recipe.stream, recipe.stream + recipe.backfill):  # a bucket prefix to catch up on
                key = f"runs/{stamp}/scenes/images/{i:08d}.jpg"
                client.copy_object(Bucket=BUCKET, Key=f"runs/{stamp}/backfill-in/{i:08d}.jpg", CopySource={"Bucket": BUCKET, "Key": key})
            for uri, data in photos.items():
                client.put_object(Bucket=BUCKET, Key=f"runs/{stamp}/backfill-in/{uri.rsplit('/', 1)[1]}", Body=data)
            bf = settings.model_copy(deep=True)
            bf.backfill = bf.backfill.model_copy(update={
                "input": f"s3://{BUCKET}/runs/{stamp}/backfill-in/", "output": f"s3://{BUCKET}/runs/{stamp}/backfill/",
                "vocab": f"{VOCAB}@1", "replicas": 1, "cpus_per_replica": 1, "decode_cpus": 0.5, "batch_size": 32,
            })
            summary = run_backfill(bf, progress=False)
            backfilled = read_jsonl(client, summary.output.split(f"s3://{BUCKET}/", 1)[1] + "results/")

        official = []
        if checkpoint:
            with timings.phase("checkpoint"):
                official = official_tags(checkpoint, tag_list, thresholds, photos, out)

        with timings.phase("report"):
            images = dict(photos)
            for row in results + backfilled:  # the scenes' bytes, for the thumbnails (before the stack goes)
                if row["uri"] not in images:
                    images[row["uri"]] = client.get_object(Bucket=BUCKET, Key=row["uri"].split("/", 3)[3])["Body"].read()
            ctx = DemoResult(stamp=stamp, artifact=artifact, metrics=metrics, trained=trained, results=results,
                             backfilled=backfilled, official=official, checkpoint=checkpoint, dead_letters=dlq, switched=switched,
                             backfill=summary.model_dump(), requests=len(uris) + len(bad))
            report = write_report(out, ctx, images, timings)
    finally:
        if head is not None:
            import ray

            ray.shutdown()
            head.stop()
        if ours:
            say(f"== stopping what the demo started: {', '.join(ours)}")
            stack.down(config, ours)

    total = time.monotonic() - started
    summary = DemoSummary.of(ctx, timings, total)
    print_summary(summary)
    (out / "summary.json").write_text(summary.model_dump_json(indent=2))
    say(what_next(report, out / "summary.json", artifact=artifact, stack_stopped=bool(ours)))
    say(f"done in {total:.0f} s")


if __name__ == "__main__":
    typer.run(main)
