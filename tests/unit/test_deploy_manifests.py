"""The KubeRay manifests, the Prometheus scrape configuration and the Grafana dashboard, checked against the code.

No cluster here: the checks are what a reviewer would do by hand, done by machine: every manifest parses,
every image is pinned, every container asks for resources, the settings they set exist and validate, the
jobs they run exist with the options they pass, and the dashboard graphs metrics the fleet exports.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

import pytest
import yaml

from workers.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
NON_SETTINGS = {"RAMPLUS_LOG__FORMAT", "RAMPLUS_LOG__LEVEL", "RAMPLUS_CONFIG"}


def documents() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend({**d, "_file": path.name} for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def by_kind(kind: str) -> list[dict]:
    return [d for d in documents() if d["kind"] == kind]


def pod_specs(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        return [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]
    if doc["kind"] == "RayJob":
        return [spec["submitterPodTemplate"]["spec"]]
    if doc["kind"] == "Deployment":
        return [spec["template"]["spec"]]
    return []


def containers() -> list[tuple[str, dict]]:
    return [(d["_file"], c) for d in documents() for pod in pod_specs(d) for c in pod["containers"]]


def test_every_manifest_parses_into_known_kinds_in_one_namespace():
    docs = documents()
    assert {d["kind"] for d in docs} == {"RayCluster", "RayJob", "ConfigMap", "Deployment", "Service"}
    for d in docs:
        assert d["apiVersion"] == {"RayCluster": "ray.io/v1", "RayJob": "ray.io/v1", "Deployment": "apps/v1"}.get(d["kind"], "v1")
        assert d["metadata"]["name"] and d["metadata"]["namespace"] == "ramplus", d["_file"]


def test_every_image_is_pinned_to_a_version():
    assert containers()
    for file, c in containers():
        name, _, tag = c["image"].rpartition(":")
        assert name and re.fullmatch(r"\d+\.\d+\.\d+", tag), f"{file}: {c['image']} is not pinned"


def test_every_container_requests_and_limits_cpu_and_memory():
    for file, c in containers():
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][part]), f"{file}/{c['name']}: {part}"


def test_the_gpu_worker_group_asks_for_one_gpu_per_pod_and_tells_ray():
    (cluster,) = by_kind("RayCluster")
    (gpu,) = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    (worker,) = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["rayStartParams"]["num-gpus"] == "1"
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    assert "gpu" in worker["image"] and "cpu" in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


def test_the_cluster_runs_the_ray_version_we_pin():
    (cluster,) = by_kind("RayCluster")
    assert cluster["spec"]["rayVersion"] == importlib.metadata.version("ray")


def _env_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def test_the_settings_the_manifests_set_exist_and_validate(monkeypatch):
    (config,) = [d for d in by_kind("ConfigMap") if d["metadata"]["name"] == "ramplus-settings"]
    (fleet,) = by_kind("Deployment")
    env = dict(config["data"])
    env |= {e["name"]: e["value"] for e in fleet["spec"]["template"]["spec"]["containers"][0]["env"]}
    for job in by_kind("RayJob"):
        env |= yaml.safe_load(job["spec"].get("runtimeEnvYAML", "{}") or "{}").get("env_vars", {})
    fields = {f"RAMPLUS_{s.upper()}__{f.upper()}" for s, info in Settings.model_fields.items() for f in info.annotation.model_fields}
    unknown = {k for k in env if k.startswith("RAMPLUS_")} - fields - NON_SETTINGS
    assert not unknown, f"not settings: {unknown}"
    settings = _env_settings(env, monkeypatch)
    assert settings.fetch.s3_buckets and settings.model.precision == "bf16"
    assert settings.fleet.gpus_per_replica == 1 and settings.fleet.metrics_host == "0.0.0.0"
    assert settings.train.use_gpu and settings.train.vocabulary.startswith("redis:")


def test_no_credentials_in_plain_manifests():
    text = "\n".join(p.read_text() for p in K8S.glob("*.yaml"))
    assert not re.search(r"(?i)(aws_secret_access_key|aws_access_key_id|password)\s*:", text)
    for file, c in containers():
        assert any("secretRef" in e for e in c.get("envFrom", [])) or file.startswith("rayjob"), f"{file}: no secret"


def test_jobs_use_the_fleets_cluster_and_scripts_and_options_that_exist():
    (cluster,) = by_kind("RayCluster")
    jobs = {d["metadata"]["name"]: d for d in by_kind("RayJob")}
    assert set(jobs) == {"ramplus-retrain", "ramplus-backfill"}
    for job in jobs.values():
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        words = job["spec"]["entrypoint"].split()
        assert words[0] == "python" and (ROOT / words[1]).is_file(), words
        options = _options_of(ROOT / words[1])
        for option in (w for w in words if w.startswith("--")):
            assert option in options, f"{words[1]} has no {option}"


def _options_of(script: Path) -> set[str]:
    """Every --option the job script's typer command accepts."""
    import importlib.util

    import typer

    spec = importlib.util.spec_from_file_location(f"job_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app = typer.Typer()
    app.command()(module.main)
    command = typer.main.get_command(app)
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)}


def test_the_fleet_exposes_its_metrics_where_prometheus_scrapes_them():
    (fleet,) = by_kind("Deployment")
    (container,) = fleet["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    (port,) = [p for p in container["ports"] if p["name"] == "metrics"]
    assert int(env["RAMPLUS_FLEET__METRICS_PORT"]) == port["containerPort"]
    assert container["command"] == ["ramplus", "serve"] and env["RAMPLUS_FLEET__RAY_ADDRESS"].startswith("ray://")
    assert fleet["spec"]["replicas"] == 1 and fleet["spec"]["strategy"]["type"] == "Recreate"
    (service,) = by_kind("Service")
    assert service["spec"]["selector"] == fleet["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    (scrape_map,) = [d for d in by_kind("ConfigMap") if d["metadata"]["name"] == "ramplus-prometheus-scrape"]
    (job,) = yaml.safe_load(scrape_map["data"]["scrape.yaml"])["scrape_configs"]
    keep = {r["regex"] for r in job["relabel_configs"] if r["action"] == "keep"}
    assert keep == {service["metadata"]["name"], "metrics"}


def test_the_dashboard_graphs_only_metrics_the_fleet_exports():
    from workers.metrics import ReplicaMetrics

    exported = {m.name for m in ReplicaMetrics().registry.collect()}
    dashboard = json.loads((ROOT / "infra" / "grafana" / "ramplus-fleet.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(dashboard["panels"]) >= 6 and len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    used = {re.sub(r"_(total|bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"ramplus_[a-z_]+", e)}
    assert used and used <= exported, used - exported
    assert {"ramplus_images_tagged", "ramplus_dead_letters", "ramplus_end_to_end_seconds", "ramplus_partition_lag"} <= used


def test_the_fleet_has_time_to_drain_before_kubernetes_kills_it(monkeypatch):
    """SIGTERM drains for up to drain_timeout_s, then stops replicas and leaves the group (STOP_MARGIN_S);
    kubelet sends SIGKILL terminationGracePeriodSeconds after SIGTERM."""
    from workers.stream.fleet import STOP_MARGIN_S

    (config,) = [d for d in by_kind("ConfigMap") if d["metadata"]["name"] == "ramplus-settings"]
    (fleet,) = by_kind("Deployment")
    pod = fleet["spec"]["template"]["spec"]
    env = dict(config["data"]) | {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    settings = _env_settings(env, monkeypatch)
    assert pod["terminationGracePeriodSeconds"] >= settings.fleet.drain_timeout_s + STOP_MARGIN_S + 10
