#!/usr/bin/env python3
"""The local real stack for RAMPlus: Kafka (KRaft), Redis and an S3 server (s3proxy), on 127.0.0.1 only.

Standard library only: runs with plain ``python3``; tests, the demo and the benches import it as
``infra.local.stack``.

    python3 infra/local/stack.py up     [kafka|redis|s3 ...]   # install (first time) + start, idempotent
    python3 infra/local/stack.py down   [SERVICE ...] [--wipe] # stop by our own PIDs; --wipe deletes data
    python3 infra/local/stack.py status [SERVICE ...]          # exit 0 only if all requested are up
    python3 infra/local/stack.py env                           # export lines for the fleet

Layout under ``--home`` (env RAMPLUS_STACK_HOME, default ``<repo>/var/stack``)::

    opt/kafka-<v>/libs/*.jar    opt/s3proxy-<v>/s3proxy-<v>-jar-with-dependencies.jar   (installs, reused)
    conf/kafka.properties conf/s3proxy.properties                  (written on every start)
    data/kafka/ (KRaft log dir)  data/redis/  data/s3/<bucket>/     (kept by `down`, deleted by `down --wipe`)
    logs/<service>.log           (plus logs/kafka.stdout.log, logs/redis.stdout.log: JVM/process output)
    run/<service>.pid            ("<pid>\\n<starttime>\\n", starttime from /proc/<pid>/stat)

Importable API: ``StackConfig``, ``up``, ``down``, ``status``, ``is_running``, ``is_ready``, ``start``,
``stop``, ``env``, ``install``, ``StackError``.

One file, past the house's 400 lines, on purpose: it must run by path with a bare ``python3`` before
anything is installed (CI's first step, a fresh machine), where it cannot import its siblings.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import http.client
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
HOST = "127.0.0.1"
SERVICES = ("kafka", "redis", "s3")

KAFKA_VERSION = "4.3.1"
KAFKA_POM = HERE / "kafka" / "pom.xml"
KAFKA_LOG4J = HERE / "kafka" / "log4j2.properties"
# Newest first; the first one Maven Central serves wins (all need Java 17+).
S3PROXY_VERSIONS = ("4.1.0", "4.0.0", "3.0.0", "2.9.0")
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"

READY_TIMEOUT = {"kafka": 90.0, "redis": 20.0, "s3": 60.0}
STOP_TIMEOUT = 20.0

# Children started by this interpreter, so that stopping them also reaps them (no zombies that look alive).
_CHILDREN: dict[int, subprocess.Popen] = {}


class StackError(RuntimeError):
    """A service could not be installed, started or stopped."""


def _say(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------- config


def _env_int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name)
    return int(raw) if raw not in (None, "") else default


@dataclasses.dataclass
class StackConfig:
    home: Path = REPO / "var" / "stack"
    kafka_port: int = 19092
    kafka_controller_port: int | None = None  # default: kafka_port + 1
    redis_port: int = 16379
    s3_port: int = 18080
    s3_access_key: str = "ramplus"
    s3_secret_key: str = "ramplus-secret"
    s3_auth: str = "aws-v2-or-v4"  # s3proxy.authorization: aws-v2-or-v4 | aws-v4 | aws-v2 | none
    s3proxy_version: str | None = None  # None: reuse an installed one, else the newest Maven Central serves
    kafka_heap_max: str = "512m"
    kafka_heap_min: str = "256m"
    region: str = "us-east-1"

    def __post_init__(self) -> None:
        self.home = Path(self.home).expanduser().resolve()
        if self.kafka_controller_port is None:
            self.kafka_controller_port = self.kafka_port + 1

    @classmethod
    def from_env(cls, **overrides) -> "StackConfig":
        """Defaults < RAMPLUS_STACK_* env vars < keyword overrides (None means 'not given')."""
        e = os.environ
        kw: dict = {
            "home": e.get("RAMPLUS_STACK_HOME") or REPO / "var" / "stack",
            "kafka_port": _env_int("RAMPLUS_STACK_KAFKA_PORT", 19092),
            "kafka_controller_port": _env_int("RAMPLUS_STACK_KAFKA_CONTROLLER_PORT", None),
            "redis_port": _env_int("RAMPLUS_STACK_REDIS_PORT", 16379),
            "s3_port": _env_int("RAMPLUS_STACK_S3_PORT", 18080),
            "s3_access_key": e.get("RAMPLUS_STACK_S3_ACCESS_KEY") or "ramplus",
            "s3_secret_key": e.get("RAMPLUS_STACK_S3_SECRET_KEY") or "ramplus-secret",
            "s3_auth": e.get("RAMPLUS_STACK_S3_AUTH") or "aws-v2-or-v4",
            "s3proxy_version": e.get("RAMPLUS_STACK_S3PROXY_VERSION") or None,
        }
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    # paths
    @property
    def opt(self) -> Path:
        return self.home / "opt"

    def data_dir(self, service: str) -> Path:
        return self.home / "data" / service

    def conf_file(self, service: str) -> Path:
        return self.home / "conf" / {"kafka": "kafka.properties", "redis": "redis.args", "s3": "s3proxy.properties"}[service]

    def log_file(self, service: str) -> Path:
        return self.home / "logs" / f"{service}.log"

    def stdout_file(self, service: str) -> Path:
        # s3proxy logs to stdout, so its stdout *is* its log
        return self.log_file(service) if service == "s3" else self.home / "logs" / f"{service}.stdout.log"

    def pid_file(self, service: str) -> Path:
        return self.home / "run" / f"{service}.pid"

    def port(self, service: str) -> int:
        return {"kafka": self.kafka_port, "redis": self.redis_port, "s3": self.s3_port}[service]

    # client-side addresses
    @property
    def kafka_bootstrap(self) -> str:
        return f"{HOST}:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://{HOST}:{self.redis_port}/0"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.s3_port}"


def env(config: StackConfig | None = None) -> dict[str, str]:
    """The environment the fleet (workers, jobs, tests) needs to talk to this stack."""
    c = config or StackConfig.from_env()
    return {
        "RAMPLUS_KAFKA__BOOTSTRAP_SERVERS": c.kafka_bootstrap,
        "RAMPLUS_REDIS__URL": c.redis_url,
        "RAMPLUS_S3__ENDPOINT_URL": c.s3_endpoint,
        "AWS_ACCESS_KEY_ID": c.s3_access_key,
        "AWS_SECRET_ACCESS_KEY": c.s3_secret_key,
        "AWS_DEFAULT_REGION": c.region,
    }


def _services(services) -> list[str]:
    if not services:
        return list(SERVICES)
    if isinstance(services, str):
        services = [services]
    out = []
    for s in services:
        if s not in SERVICES:
            raise StackError(f"unknown service {s!r}; choose from {', '.join(SERVICES)}")
        if s not in out:
            out.append(s)
    return out


# ------------------------------------------------------------------------------------------ processes


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, starttime) of a live pid, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[0], fields[19]


def _reap(pid: int) -> None:
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is not None:
            _CHILDREN.pop(pid, None)
        return
    try:  # a child of ours we did not keep a Popen for
        os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        pass


def _alive(pid: int) -> bool:
    _reap(pid)
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _markers(config: StackConfig, service: str) -> list[str]:
    """Substrings that /proc/<pid>/cmdline of *our* process for this service must contain."""
    if service == "kafka":
        return ["kafka.Kafka", str(config.conf_file("kafka"))]
    if service == "s3":
        return ["s3proxy", str(config.conf_file("s3"))]
    # redis rewrites its process title to "redis-server 127.0.0.1:<port>"
    return ["redis-server", str(config.redis_port)]


def _read_pid_file(config: StackConfig, service: str) -> tuple[int, str | None] | None:
    try:
        lines = config.pid_file(service).read_text().split()
        return int(lines[0]), (lines[1] if len(lines) > 1 else None)
    except (OSError, ValueError, IndexError):
        return None


def is_running(config: StackConfig | None, service: str) -> int | None:
    """The pid of our running process for the service (pid file, live, same start time, cmdline match)."""
    c = config or StackConfig.from_env()
    rec = _read_pid_file(c, service)
    if rec is None:
        return None
    pid, starttime = rec
    if not _alive(pid):
        return None
    st = _proc_stat(pid)
    if starttime and st and st[1] != starttime:
        return None  # pid reused by another process
    cmd = _cmdline(pid)
    if not all(m in cmd for m in _markers(c, service)):
        return None
    return pid


running_pid = is_running  # the older name


def _port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


# -------------------------------------------------------------------------------------------- probes


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf


def probe_kafka(port: int, timeout: float = 2.0) -> bool:
    """A raw ApiVersions v0 request; the broker answers only once its listener is serving requests."""
    client_id = b"ramplus-stack"
    body = struct.pack(">hhih", 18, 0, 7, len(client_id)) + client_id
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(struct.pack(">i", len(body)) + body)
            (size,) = struct.unpack(">i", _recv_exact(s, 4))
            resp = _recv_exact(s, size)
        corr, err = struct.unpack(">ih", resp[:6])
        return corr == 7 and err == 0
    except (OSError, struct.error, ConnectionError):
        return False


def probe_redis(port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def probe_s3(port: int, timeout: float = 3.0) -> bool:
    """Any well-formed HTTP answer (403 AccessDenied without credentials is fine: the server is up)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        resp.read()
        return 100 <= resp.status < 600
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _probe(config: StackConfig, service: str) -> bool:
    port = config.port(service)
    return {"kafka": probe_kafka, "redis": probe_redis, "s3": probe_s3}[service](port)


def is_ready(config: StackConfig | None, service: str) -> bool:
    """Our process for the service is running and answers its protocol."""
    c = config or StackConfig.from_env()
    return is_running(c, service) is not None and _probe(c, service)


# ------------------------------------------------------------------------------------------- install


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return str(Path(home) / "bin" / "java")
    java = shutil.which("java")
    if not java:
        raise StackError("java not found: install a JDK/JRE 17+ (e.g. apt-get install openjdk-17-jre-headless)")
    return java


def _check_java() -> str:
    java = _java()
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    major = int(m.group(1)) if m else 0
    if major == 1 and m and m.group(2):
        major = int(m.group(2))
    if major < 17:
        raise StackError(f"Java 17+ required (Kafka {KAFKA_VERSION}, s3proxy), found: {out.strip().splitlines()[:1]}")
    return java


def _mvn() -> str:
    mvn = shutil.which("mvn")
    if not mvn:
        raise StackError("mvn not found: install Maven 3.6.3+ (e.g. apt-get install maven)")
    return mvn


def _run_quiet(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
        raise StackError(f"{what} failed (exit {proc.returncode}): {shlex.join(cmd)}\n{tail}")


def _kafka_install_dir(config: StackConfig) -> Path:
    return config.opt / f"kafka-{KAFKA_VERSION}"


def _pom_stamp() -> str:
    return hashlib.sha256(KAFKA_POM.read_bytes()).hexdigest()


def _kafka_installed(config: StackConfig) -> bool:
    """The broker jar plus an SLF4J 2 + log4j2 binding (without it the broker runs but logs nothing)."""
    libs = _kafka_install_dir(config) / "libs"
    names = [p.name for p in libs.glob("*.jar")] if libs.is_dir() else []
    return (
        f"kafka_2.13-{KAFKA_VERSION}.jar" in names
        and any(n.startswith("log4j-slf4j2-impl-") for n in names)
        and any(n.startswith("log4j-core-") for n in names)
        and any(n.startswith("slf4j-api-2.") for n in names)
    )


def _install_kafka(config: StackConfig) -> None:
    if _kafka_installed(config):
        return
    if is_running(config, "kafka") is not None:
        raise StackError(f"kafka runs from an incomplete install in {_kafka_install_dir(config)}: stop it first")
    _check_java()
    mvn = _mvn()
    _say(f"installing kafka {KAFKA_VERSION} (first time, ~1 min)...")
    t0 = time.monotonic()
    final = _kafka_install_dir(config)
    tmp = final.with_name(final.name + ".tmp")
    build = config.opt / "kafka-build"
    for d in (tmp, build):
        shutil.rmtree(d, ignore_errors=True)
    build.mkdir(parents=True)
    shutil.copy2(KAFKA_POM, build / "pom.xml")  # keep Maven's scratch files out of the repo
    _run_quiet(
        [mvn, "-q", "-B", "-f", str(build / "pom.xml"), "dependency:copy-dependencies",
         f"-DoutputDirectory={tmp / 'libs'}", "-DincludeScope=runtime"],
        f"kafka {KAFKA_VERSION} download",
    )
    (tmp / "pom.xml.sha256").write_text(_pom_stamp() + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if not _kafka_installed(config):
        raise StackError(f"kafka install incomplete in {final / 'libs'} (no kafka_2.13 / log4j2 / slf4j 2 jars)")
    jars = list((final / "libs").glob("*.jar"))
    shutil.rmtree(build, ignore_errors=True)
    _say(f"kafka {KAFKA_VERSION} installed in {time.monotonic() - t0:.1f} s ({len(jars)} jars)")


def _s3proxy_jar(config: StackConfig) -> Path | None:
    versions = [config.s3proxy_version] if config.s3proxy_version else list(S3PROXY_VERSIONS)
    for v in versions:
        jars = sorted((config.opt / f"s3proxy-{v}").glob("s3proxy*.jar"))
        if jars:
            return jars[0]
    return None


def _install_s3(config: StackConfig) -> None:
    if _s3proxy_jar(config) is not None:
        return
    _check_java()
    mvn = _mvn()
    versions = [config.s3proxy_version] if config.s3proxy_version else list(S3PROXY_VERSIONS)
    _say(f"installing s3proxy (first time, ~30 s; trying {', '.join(versions)})...")
    t0 = time.monotonic()
    errors = []
    for v in versions:
        final = config.opt / f"s3proxy-{v}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            _run_quiet(
                [mvn, "-q", "-B", f"{DEPENDENCY_PLUGIN}:copy",
                 f"-Dartifact=org.gaul:s3proxy:{v}:jar:jar-with-dependencies", f"-DoutputDirectory={tmp}"],
                f"s3proxy {v} download",
                cwd=tmp,  # no pom here: the goal runs without a project
            )
        except StackError as exc:
            errors.append(str(exc).splitlines()[0])
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        jars = list(tmp.glob("s3proxy-*.jar"))
        if not jars:
            errors.append(f"s3proxy {v}: no jar in {tmp}")
            continue
        (tmp / "VERSION").write_text(v + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _say(f"s3proxy {v} installed in {time.monotonic() - t0:.1f} s")
        return
    raise StackError("could not fetch any s3proxy version:\n  " + "\n  ".join(errors))


def _install_redis(config: StackConfig) -> None:
    if _redis_server():
        return
    _say("installing redis-server (apt-get, first time, ~15 s)...")
    t0 = time.monotonic()
    prefix: list[str] = []
    if os.geteuid() != 0:
        if not shutil.which("sudo"):
            raise StackError("redis-server not found and not root: install it (apt-get install redis-server)")
        prefix = ["sudo", "-n"]
    envv = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (prefix + ["apt-get", "update", "-q"],
                prefix + ["apt-get", "install", "-y", "-q", "--no-install-recommends", "redis-server"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=envv)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
            raise StackError(f"{shlex.join(cmd)} failed (exit {proc.returncode})\n{tail}")
    if not _redis_server():
        raise StackError("apt-get installed redis-server but it is not on PATH")
    _say(f"redis-server installed in {time.monotonic() - t0:.1f} s")


def _redis_server() -> str | None:
    return os.environ.get("RAMPLUS_STACK_REDIS_SERVER") or shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )


def install(config: StackConfig | None = None, services=None) -> None:
    """Install what the services need (a no-op when already installed)."""
    c = config or StackConfig.from_env()
    for s in _services(services):
        {"kafka": _install_kafka, "redis": _install_redis, "s3": _install_s3}[s](c)


# --------------------------------------------------------------------------------- config + commands


def _kafka_cluster_id() -> str:
    while True:  # Kafka's Uuid.toString(): url-safe base64, no padding; never starting with '-'
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _prepare_kafka(config: StackConfig) -> list[str]:
    java = _java()
    data = config.data_dir("kafka")
    props = config.conf_file("kafka")
    props.parent.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    p, cp = config.kafka_port, config.kafka_controller_port
    props.write_text(
        "# generated by infra/local/stack.py on every start; edit the script, not this file\n"
        f"""process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers={HOST}:{cp}
listeners=PLAINTEXT://{HOST}:{p},CONTROLLER://{HOST}:{cp}
advertised.listeners=PLAINTEXT://{HOST}:{p}
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs={data}
num.partitions=4
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=true
delete.topic.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
share.coordinator.state.topic.num.partitions=4
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.hours=168
log.segment.bytes=268435456
"""
    )
    libs = _kafka_install_dir(config) / "libs"
    classpath = f"{libs}/*"
    stamp = data / "ramplus-stack.controller-port"
    if not (data / "meta.properties").exists():
        _run_quiet(
            [java, "-cp", classpath, f"-Dlog4j2.configurationFile={KAFKA_LOG4J}",
             f"-Dramplus.kafka.logfile={config.log_file('kafka')}",
             "kafka.tools.StorageTool", "format", "--standalone", "-t", _kafka_cluster_id(), "-c", str(props)],
            "kafka storage format",
        )
        stamp.write_text(f"{cp}\n")
    elif stamp.exists() and stamp.read_text().strip() != str(cp):
        raise StackError(
            f"kafka data in {data} was formatted for controller port {stamp.read_text().strip()}, not {cp}: "
            "use the old ports, or `stack.py down kafka --wipe` first"
        )
    return [
        java, f"-Xmx{config.kafka_heap_max}", f"-Xms{config.kafka_heap_min}",
        "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:+ExplicitGCInvokesConcurrent",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={KAFKA_LOG4J}",
        f"-Dramplus.kafka.logfile={config.log_file('kafka')}",
        f"-Dkafka.logs.dir={config.home / 'logs'}",
        "-cp", classpath, "kafka.Kafka", str(props),
    ]


def _prepare_redis(config: StackConfig) -> list[str]:
    data = config.data_dir("redis")
    data.mkdir(parents=True, exist_ok=True)
    return [
        _redis_server() or "redis-server",
        "--port", str(config.redis_port), "--bind", HOST, "--protected-mode", "yes",
        # Vocabulary versions are state ops rely on: an append-only file keeps them across a restart
        # (fsync once a second, the usual production trade-off); no RDB snapshots on top.
        "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no",
        "--dir", str(data), "--logfile", str(config.log_file("redis")),
    ]


def _prepare_s3(config: StackConfig) -> list[str]:
    jar = _s3proxy_jar(config)
    if jar is None:
        raise StackError("s3proxy is not installed")
    base = config.data_dir("s3")  # one folder per bucket
    props = config.conf_file("s3")
    props.parent.mkdir(parents=True, exist_ok=True)
    base.mkdir(parents=True, exist_ok=True)
    props.write_text(
        "# generated by infra/local/stack.py on every start\n"
        f"""s3proxy.endpoint=http://{HOST}:{config.s3_port}
s3proxy.authorization={config.s3_auth}
s3proxy.identity={config.s3_access_key}
s3proxy.credential={config.s3_secret_key}
jclouds.provider=filesystem
jclouds.filesystem.basedir={base}
jclouds.identity={config.s3_access_key}
jclouds.credential={config.s3_secret_key}
"""
    )
    props.chmod(0o600)  # it holds the credential
    return [_java(), "-Xmx256m", "-Xms64m", "-XX:+UseSerialGC", "-Djava.awt.headless=true",
            "-Dlogback.statusListenerClass=ch.qos.logback.core.status.NopStatusListener",  # no logback self-talk
            "-cp", str(jar), "org.gaul.s3proxy.Main", "--properties", str(props)]


_PREPARE = {"kafka": _prepare_kafka, "redis": _prepare_redis, "s3": _prepare_s3}


# ------------------------------------------------------------------------------------------- up/down


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no {path})"
    return "\n".join(lines[-n:])


def _failure_report(config: StackConfig, service: str) -> str:
    files = [config.log_file(service)]
    if config.stdout_file(service) != files[0]:
        files.append(config.stdout_file(service))
    return "\n".join(f"--- last lines of {f} ---\n{_tail(f)}" for f in files)


def _launch(config: StackConfig, service: str) -> tuple[int, int]:
    """Start the process in its own session; returns (pid, kafka log offset before start)."""
    cmd = _PREPARE[service](config)
    for d in (config.home / "logs", config.home / "run"):
        d.mkdir(parents=True, exist_ok=True)
    log = config.log_file(service)
    offset = log.stat().st_size if log.exists() else 0
    with open(config.stdout_file(service), "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} stack.py starting {service}: {shlex.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            cwd=config.data_dir(service), start_new_session=True, close_fds=True,
        )
    _CHILDREN[proc.pid] = proc
    st = _proc_stat(proc.pid)
    config.pid_file(service).write_text(f"{proc.pid}\n{st[1] if st else ''}\n")
    return proc.pid, offset


def _kafka_started_since(config: StackConfig, offset: int) -> bool:
    try:
        with open(config.log_file("kafka"), "rb") as f:
            f.seek(offset)
            return b"Kafka Server started" in f.read()
    except OSError:
        return False


def _check_ready(config: StackConfig, service: str, pid: int, offset: int | None, t0: float) -> bool:
    """True when ready, False while starting; StackError when it died or timed out."""
    if not _alive(pid):
        config.pid_file(service).unlink(missing_ok=True)
        raise StackError(f"{service} exited during startup\n{_failure_report(config, service)}")
    ok = _probe(config, service)
    if ok and service == "kafka" and offset is not None:
        ok = _kafka_started_since(config, offset)  # the listener can answer a moment before startup completes
    if ok:
        return True
    if time.monotonic() - t0 > READY_TIMEOUT[service]:
        raise StackError(
            f"{service} not ready after {READY_TIMEOUT[service]:.0f} s (pid {pid} left running; "
            f"`stack.py down {service}` stops it)\n{_failure_report(config, service)}"
        )
    return False


def up(config: StackConfig | None = None, services=None) -> dict[str, int]:
    """Install (first time) and start the services; idempotent. Returns {service: pid}. Raises StackError."""
    c = config or StackConfig.from_env()
    wanted = _services(services)
    install(c, wanted)
    result: dict[str, int] = {}
    pending: list[tuple[str, int, int | None, float]] = []
    failures: list[str] = []
    for s in wanted:
        pid = is_running(c, s)
        if pid is not None:
            if _probe(c, s):
                _say(f"{s} already running (pid {pid}) on {HOST}:{c.port(s)}")
                result[s] = pid
            else:  # ours, still starting (or hung): wait for it like a fresh start
                pending.append((s, pid, None, time.monotonic()))
            continue
        if c.pid_file(s).exists():
            _say(f"{s}: removing stale pid file {c.pid_file(s)}")
            c.pid_file(s).unlink(missing_ok=True)
        busy = [port for port in ([c.port(s)] + ([c.kafka_controller_port] if s == "kafka" else [])) if _port_open(port)]
        if busy:
            failures.append(f"{s}: port {HOST}:{busy[0]} is already in use by a process this stack did not start")
            continue
        t0 = time.monotonic()
        try:
            pid, offset = _launch(c, s)
        except StackError as exc:
            failures.append(f"{s}: {exc}")
            continue
        pending.append((s, pid, offset, t0))
    while pending:  # wait for all of them at once
        for item in list(pending):
            s, pid, offset, t0 = item
            try:
                ready = _check_ready(c, s, pid, offset, t0)
            except StackError as exc:
                failures.append(f"{s}: {exc}")
                pending.remove(item)
                continue
            if ready:
                _say(f"{s} ready on {HOST}:{c.port(s)} in {time.monotonic() - t0:.1f} s (pid {pid})")
                result[s] = pid
                pending.remove(item)
        if pending:
            time.sleep(0.1)
    if failures:
        raise StackError("\n".join(failures))
    return result


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def down(config: StackConfig | None = None, services=None, wipe: bool = False) -> None:
    """Stop the services by their own pids (SIGTERM, then SIGKILL after 20 s); --wipe deletes their data."""
    c = config or StackConfig.from_env()
    wanted = _services(services)
    stopping: dict[str, tuple[int, float]] = {}
    for s in wanted:
        pid = is_running(c, s)
        if pid is None:
            if c.pid_file(s).exists():
                _say(f"{s}: not running (removing stale pid file)")
                c.pid_file(s).unlink(missing_ok=True)
            else:
                _say(f"{s}: not running")
            continue
        _signal(pid, signal.SIGTERM)
        stopping[s] = (pid, time.monotonic())
    for s, (pid, t0) in stopping.items():
        while _alive(pid) and time.monotonic() - t0 < STOP_TIMEOUT:
            time.sleep(0.1)
        if _alive(pid):
            _say(f"{s}: still alive after {STOP_TIMEOUT:.0f} s, SIGKILL")
            _signal(pid, signal.SIGKILL)
            while _alive(pid) and time.monotonic() - t0 < STOP_TIMEOUT + 10:
                time.sleep(0.1)
        _reap(pid)
        c.pid_file(s).unlink(missing_ok=True)
        _say(f"{s} stopped (pid {pid}) in {time.monotonic() - t0:.1f} s")
    if wipe:
        for s in wanted:
            if c.data_dir(s).exists():
                shutil.rmtree(c.data_dir(s))
            _say(f"{s}: data wiped ({c.data_dir(s)})")


def _service_and_config(a, b) -> tuple[str, StackConfig | None]:
    return (b, a) if isinstance(a, StackConfig) else (a, b)


def start(service: str, config: StackConfig | None = None) -> int:
    """Start one service (fault-injection tests); returns its pid. ``start(config, service)`` works too."""
    service, config = _service_and_config(service, config)
    return up(config, [service])[service]


def stop(service: str, config: StackConfig | None = None) -> None:
    """Stop one service, keeping its data (Kafka keeps topics and committed offsets).

    ``stop(config, service)`` works too."""
    service, config = _service_and_config(service, config)
    down(config, [service])


def status(config: StackConfig | None = None, services=None) -> dict[str, dict]:
    c = config or StackConfig.from_env()
    out = {}
    for s in _services(services):
        pid = is_running(c, s)
        out[s] = {"running": pid is not None, "ready": pid is not None and _probe(c, s), "pid": pid,
                  "port": c.port(s)}
    return out


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stack.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("up", "down", "status", "env", "install"))
    ap.add_argument("services", nargs="*", metavar="SERVICE", help="kafka, redis, s3 (default: all)")
    ap.add_argument("--home", help="install + data root (env RAMPLUS_STACK_HOME; default <repo>/var/stack)")
    ap.add_argument("--kafka-port", type=int, help="env RAMPLUS_STACK_KAFKA_PORT (19092)")
    ap.add_argument("--kafka-controller-port", type=int, help="env RAMPLUS_STACK_KAFKA_CONTROLLER_PORT (kafka port + 1)")
    ap.add_argument("--redis-port", type=int, help="env RAMPLUS_STACK_REDIS_PORT (16379)")
    ap.add_argument("--s3-port", type=int, help="env RAMPLUS_STACK_S3_PORT (18080)")
    ap.add_argument("--s3-access-key", help="env RAMPLUS_STACK_S3_ACCESS_KEY (ramplus)")
    ap.add_argument("--s3-secret-key", help="env RAMPLUS_STACK_S3_SECRET_KEY (ramplus-secret)")
    ap.add_argument("--wipe", action="store_true", help="down: also delete the services' data")
    a = ap.parse_args(argv)
    try:
        config = StackConfig.from_env(
            home=a.home, kafka_port=a.kafka_port, kafka_controller_port=a.kafka_controller_port,
            redis_port=a.redis_port, s3_port=a.s3_port, s3_access_key=a.s3_access_key,
            s3_secret_key=a.s3_secret_key,
        )
        services = _services(a.services)
        if a.command == "up":
            up(config, services)
        elif a.command == "down":
            down(config, services, wipe=a.wipe)
        elif a.command == "install":
            install(config, services)
        elif a.command == "env":
            for k, v in env(config).items():
                print(f"export {k}={shlex.quote(v)}")
        else:
            st = status(config, services)
            for s, info in st.items():
                state = "running" if info["ready"] else ("starting/unhealthy" if info["running"] else "stopped")
                pid = info["pid"] if info["pid"] is not None else "-"
                print(f"{s:<6} {state:<18} pid={pid:<8} port={HOST}:{info['port']}")
            return 0 if all(i["ready"] for i in st.values()) else 1
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
