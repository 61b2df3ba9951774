"""`ray job submit ... jobs/retrain.py` exactly as the README says, against a local `ray start --head`:
killed mid-training, submitted again, it resumes from its last checkpoint in S3 (the step count goes on)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from infra.local.kit import free_port
import redis

from integration.test_retrain import synthetic_vocabulary
from workers.train.artifacts import fetch_artifact
from workers.settings import S3Settings
from workers.train.synth_data import write_dataset
from workers.vocab.store import VocabStore

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head(stack, tmp_path_factory):
    """A separate Ray cluster started the way the README says; torn down by its own temp dir, never `ray stop`
    (which would stop every Ray on the machine, the test session's too)."""
    temp = Path(f"/tmp/ray-{uuid.uuid4().hex[:6]}")  # short: Ray's socket paths have a length limit
    dashboard = free_port()
    env = {**os.environ, **{k: v for k, v in stack.env.items() if k.startswith("AWS_")}}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this environment's
    env.pop("RAY_ADDRESS", None)
    # Token auth, as the README sets it up; a token of its own so that ~/.ray/auth_token is left alone.
    env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN"] = "token", uuid.uuid4().hex
    # Every port of its own: the defaults (10001, 52365, ...) may be taken by another Ray on this machine.
    ports = {flag: free_port() for flag in ("--port", "--ray-client-server-port", "--dashboard-agent-listen-port",
                                             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")}
    subprocess.run(
        [str(BIN / "ray"), "start", "--head", *(f"{k}={v}" for k, v in ports.items()), f"--dashboard-port={dashboard}",
         "--dashboard-host=127.0.0.1", "--num-cpus=3", "--include-dashboard=true", "--disable-usage-stats",
         f"--temp-dir={temp}"],
        env=env, check=True, capture_output=True, timeout=120,
    )
    yield f"http://127.0.0.1:{dashboard}", env
    # The cluster's daemons name the temp dir on their command lines; their children (agents, workers)
    # may not, so take whole process trees.
    import psutil

    doomed: dict[int, psutil.Process] = {}
    gcs = f":{ports['--port']}"  # the client server names the GCS address, not the temp dir
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or ())
        if str(temp) in line or gcs in line:
            doomed[proc.pid] = proc
            for child in proc.children(recursive=True):
                doomed[child.pid] = child
    for proc in doomed.values():
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


def submit(address: str, env: dict[str, str], config: Path, *, wait: bool) -> subprocess.CompletedProcess:
    command = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", "."]
    if not wait:
        command.append("--no-wait")
    command += ["--", "python", "jobs/retrain.py", "--config", str(config), "--version", "v1"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)


def test_a_killed_job_resumes_from_its_last_s3_checkpoint(stack, aws_env, ray_head, s3_client, tmp_path):
    address, env = ray_head
    bucket = f"job-{uuid.uuid4().hex[:8]}"
    s3_client.create_bucket(Bucket=bucket)
    s3 = S3Settings(endpoint_url=stack.s3_endpoint, region=stack.s3_credentials["region_name"])
    write_dataset(f"s3://{bucket}/synth", n=300, seed=1, size=96, s3=s3, progress=False)
    name = f"job-{uuid.uuid4().hex[:6]}"
    store = VocabStore(redis.Redis.from_url(stack.redis_url))
    ref = store.publish(synthetic_vocabulary(name))
    run_name = f"run-{uuid.uuid4().hex[:6]}"
    config = tmp_path / "retrain.toml"
    config.write_text(f"""
[s3]
endpoint_url = "{stack.s3_endpoint}"
region = "{s3.region}"

[redis]
url = "{stack.redis_url}"

[train]
run_name = "{run_name}"
manifest = "s3://{bucket}/synth/manifest.jsonl"
storage_path = "s3://{bucket}/runs"
output = "s3://{bucket}/models"
model = "tiny@64"
vocabulary = "redis:{ref}"
text_encoder = "ramplus-tiny-text"
text_weights = "none"
epochs = 12
batch_size = 16
lr = 5e-4
workers = 2
cpus_per_worker = 1
""")
    try:
        deadline = time.monotonic() + 90
        while True:  # the head's job agent takes a few seconds to come up after `ray start`
            first = submit(address, env, config, wait=False)
            if first.returncode == 0 or "No available agent" not in first.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert first.returncode == 0, first.stderr[-3000:]
        job_id = re.search(r"raysubmit_[A-Za-z0-9]+", first.stdout + first.stderr).group(0)

        def checkpoints() -> list[str]:
            pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"runs/{run_name}/")
            return [o["Key"] for p in pages for o in p.get("Contents", ()) if o["Key"].endswith("/state.json")]

        deadline = time.monotonic() + 240
        while not checkpoints() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert checkpoints(), "no checkpoint reached S3"
        stopped = subprocess.run([str(BIN / "ray"), "job", "stop", "--address", address, job_id], env=env,
                                 capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, job_id], env=env,
                                capture_output=True, text=True, timeout=60).stdout
        assert "was stopped" in status or "STOPPED" in status, status
        killed_at = max(json.loads(s3_client.get_object(Bucket=bucket, Key=k)["Body"].read())["step"] for k in checkpoints())

        second = submit(address, env, config, wait=True)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        logs = second.stdout + second.stderr
        assert "retrain.resumed" in logs
        summary = json.loads(next(line for line in reversed(logs.splitlines()) if line.startswith('{"artifact"')))
        metrics = json.loads((fetch_artifact(summary["artifact"], s3) / "metrics.json").read_text())
    finally:
        for key in store.redis.scan_iter(match=f"ramplus:vocab:{name}:*"):
            store.redis.delete(key)

    steps = [h["step"] for h in metrics["history"]]
    epochs = [h["epoch"] for h in metrics["history"]]
    assert epochs == list(range(1, 13))  # every epoch once: the first run's from its checkpoint, then the rest
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert killed_at in steps and steps[-1] > killed_at  # the step count went on from the killed run's
    assert metrics["steps"] == steps[-1]
