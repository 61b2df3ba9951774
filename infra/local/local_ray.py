"""A Ray head of one's own on this machine, started and stopped without touching any other Ray here."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from infra.local import kit


@dataclass
class LocalRay:
    """A Ray head of the demo's own (`ray start --head`), every port free-picked and a temp dir of its own, so
    that another Ray on the machine (a notebook's, a test session's) neither blocks it nor gets stopped by it:
    `ray stop` would stop them all, so `stop` ends only the processes of this head."""

    temp: Path
    gcs: str
    dashboard: str

    @classmethod
    def start(cls, num_cpus: int) -> LocalRay:
        temp = Path(f"/tmp/ray-demo-{uuid.uuid4().hex[:6]}")  # short: Ray's socket paths have a length limit
        ports = {flag: kit.free_port() for flag in (
            "--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")}
        # The job's `python` and the workers' are this environment's.
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("RAY_ADDRESS", None)
        done = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", *(f"{k}={v}" for k, v in ports.items()),
             "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--num-cpus={num_cpus}", "--disable-usage-stats",
             f"--temp-dir={temp}"],
            env=env, capture_output=True, text=True, timeout=180,
        )
        head = cls(temp, f"127.0.0.1:{ports['--port']}", f"http://127.0.0.1:{ports['--dashboard-port']}")
        if done.returncode != 0:
            head.stop()
            raise RuntimeError(f"ray start --head failed ({done.returncode}):\n{done.stderr[-2000:]}")
        return head

    def stop(self) -> None:
        import ray  # noqa: F401 - puts the psutil that Ray bundles on the path
        import psutil

        doomed: dict[int, psutil.Process] = {}
        port = ":" + self.gcs.rsplit(":", 1)[1]  # some daemons name the GCS address, not the temp dir
        for proc in psutil.process_iter(["cmdline"]):
            try:
                line = " ".join(proc.info["cmdline"] or ())
                if str(self.temp) in line or port in line:
                    doomed[proc.pid] = proc
                    doomed.update({child.pid: child for child in proc.children(recursive=True)})
            except psutil.Error:
                continue
        doomed.pop(os.getpid(), None)
        for proc in doomed.values():
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(list(doomed.values()), timeout=10)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        shutil.rmtree(self.temp, ignore_errors=True)
