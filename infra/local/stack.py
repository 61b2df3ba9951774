#!/usr/bin/env python3
"""The local real stack on loopback: Apache Kafka (KRaft), redis-server and s3proxy. Standard library only.

    python3 infra/local/stack.py up   [kafka|redis|s3 ...]   install (first time) and start; idempotent
    python3 infra/local/stack.py down [--wipe] [SERVICE ...] stop by our own PIDs (and delete data with --wipe)
    python3 infra/local/stack.py status                      one line per service; exit 0 when all are up
    python3 infra/local/stack.py env                         `export RAMPLUS_...` lines for the fleet

Layout under --home (RAMPLUS_STACK_HOME, default <repo>/var/stack): opt/ (installs, reused), data/<service>/,
logs/<service>.log, run/<service>.pid. Ports: RAMPLUS_STACK_KAFKA_PORT (19092; the KRaft controller
listens on the next port), RAMPLUS_STACK_REDIS_PORT (16379), RAMPLUS_STACK_S3_PORT (18080).
Kafka and s3proxy come from Maven Central (Java 17), redis-server from Debian (apt-get when missing).
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

KAFKA_VERSION = "4.3.1"
LOG4J_VERSION = "2.24.3"
S3PROXY_VERSION = "4.0.0"
SERVICES = ("kafka", "redis", "s3")
REPO = Path(__file__).resolve().parents[2]


@dataclass
class StackConfig:
    home: Path = REPO / "var" / "stack"
    kafka_port: int = 19092
    controller_port: int = 0  # 0: kafka_port + 1
    redis_port: int = 16379
    s3_port: int = 18080
    s3_identity: str = "ramplus"
    s3_credential: str = "ramplus-secret"
    kafka_heap: str = "512m"
    timeout_s: float = 120.0
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.home = Path(self.home).resolve()
        if not self.controller_port:
            self.controller_port = self.kafka_port + 1

    @classmethod
    def from_env(cls, **overrides: object) -> StackConfig:
        env = os.environ
        values: dict[str, object] = {}
        for name, key, kind in (
            ("home", "RAMPLUS_STACK_HOME", Path), ("kafka_port", "RAMPLUS_STACK_KAFKA_PORT", int),
            ("controller_port", "RAMPLUS_STACK_CONTROLLER_PORT", int), ("redis_port", "RAMPLUS_STACK_REDIS_PORT", int),
            ("s3_port", "RAMPLUS_STACK_S3_PORT", int), ("s3_identity", "RAMPLUS_STACK_S3_ACCESS_KEY", str),
            ("s3_credential", "RAMPLUS_STACK_S3_SECRET_KEY", str),
        ):
            if env.get(key):
                values[name] = kind(env[key])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    def port(self, service: str) -> int:
        return {"kafka": self.kafka_port, "redis": self.redis_port, "s3": self.s3_port}[service]

    def path(self, *parts: str) -> Path:
        return self.home.joinpath(*parts)


def say(message: str) -> None:
    print(f"[stack] {message}", file=sys.stderr, flush=True)


# -- install -------------------------------------------------------------------------------------------------

KAFKA_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>ramplus.local</groupId><artifactId>kafka-broker</artifactId><version>1</version><packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{kafka}</version></dependency>
    <!-- pinned: a transitive slf4j-api 1.7 would win otherwise, and the broker would log nothing -->
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>2.0.17</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>{log4j}</version></dependency>
  </dependencies>
</project>
"""

LOG4J2_PROPERTIES = """status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.apache.name = org.apache
logger.apache.level = WARN
"""


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def install_kafka(cfg: StackConfig) -> Path:
    libs = cfg.path("opt", f"kafka-{KAFKA_VERSION}", "libs")
    if libs.is_dir() and any(libs.glob("kafka_2.13-*.jar")):
        return libs
    if shutil.which("mvn") is None or shutil.which("java") is None:
        raise RuntimeError("installing Kafka needs Java 17+ and Maven (mvn) on PATH")
    say(f"installing kafka {KAFKA_VERSION} from Maven Central (first time, about a minute)...")
    started = time.monotonic()
    work = libs.parent
    work.mkdir(parents=True, exist_ok=True)
    (work / "pom.xml").write_text(KAFKA_POM.format(kafka=KAFKA_VERSION, log4j=LOG4J_VERSION))
    tmp = work / "libs.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    _run(["mvn", "-q", "-B", "-f", str(work / "pom.xml"), "dependency:copy-dependencies",
          f"-DoutputDirectory={tmp}", "-DincludeScope=runtime"], "mvn dependency:copy-dependencies (kafka)")
    tmp.rename(libs)  # only a complete download counts as installed
    say(f"kafka installed in {time.monotonic() - started:.1f} s")
    return libs


def install_s3proxy(cfg: StackConfig) -> Path:
    jar = cfg.path("opt", f"s3proxy-{S3PROXY_VERSION}", f"s3proxy-{S3PROXY_VERSION}-jar-with-dependencies.jar")
    if jar.is_file():
        return jar
    if shutil.which("mvn") is None or shutil.which("java") is None:
        raise RuntimeError("installing s3proxy needs Java 17+ and Maven (mvn) on PATH")
    say(f"installing s3proxy {S3PROXY_VERSION} from Maven Central (first time)...")
    started = time.monotonic()
    tmp = jar.parent / "partial"
    shutil.rmtree(tmp, ignore_errors=True)
    _run(["mvn", "-q", "-B", "dependency:copy", f"-Dartifact=org.gaul:s3proxy:{S3PROXY_VERSION}:jar:jar-with-dependencies",
          f"-DoutputDirectory={tmp}"], "mvn dependency:copy (s3proxy)")
    (tmp / jar.name).rename(jar)
    shutil.rmtree(tmp, ignore_errors=True)
    say(f"s3proxy installed in {time.monotonic() - started:.1f} s")
    return jar


def install_redis() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError("redis-server is missing: install it (apt-get install redis-server) or run this as root")
    say("installing redis-server with apt-get (first time)...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "redis-server"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    # Debian starts its own service on 6379; we run ours by hand on our port and leave theirs alone.
    return shutil.which("redis-server") or "/usr/bin/redis-server"


# -- commands per service ------------------------------------------------------------------------------------

def kafka_command(cfg: StackConfig) -> list[str]:
    libs = install_kafka(cfg)
    data, conf = cfg.path("data", "kafka"), cfg.path("conf")
    conf.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"127.0.0.1:{cfg.controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{cfg.kafka_port},CONTROLLER://127.0.0.1:{cfg.controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{cfg.kafka_port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(data),
        "num.partitions": "4",
        "auto.create.topics.enable": "true",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "group.min.session.timeout.ms": "6000",
        "log.retention.hours": "24",
        **cfg.extra,
    }
    server = conf / "kafka.properties"
    server.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    log4j = conf / "kafka-log4j2.properties"
    log4j.write_text(LOG4J2_PROPERTIES.format(log=cfg.path("logs", "kafka-server.log")))
    java = ["java", f"-Xmx{cfg.kafka_heap}", "-Xms128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
            f"-Dlog4j2.configurationFile={log4j}", "-cp", f"{libs}/*"]
    if not (data / "meta.properties").exists():  # format once: later starts keep topics and committed offsets
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        _run(java + ["kafka.tools.StorageTool", "format", "--standalone", "-t", cluster_id, "-c", str(server)],
             "kafka storage format")
    return java + ["kafka.Kafka", str(server)]


def redis_command(cfg: StackConfig) -> list[str]:
    binary = install_redis()
    data = cfg.path("data", "redis")
    data.mkdir(parents=True, exist_ok=True)
    return [binary, "--port", str(cfg.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(data), "--daemonize", "no", "--protected-mode", "yes"]


def s3_command(cfg: StackConfig) -> list[str]:
    jar = install_s3proxy(cfg)
    data = cfg.path("data", "s3")
    data.mkdir(parents=True, exist_ok=True)
    conf = cfg.path("conf")
    conf.mkdir(parents=True, exist_ok=True)
    props = conf / "s3proxy.properties"
    props.write_text(
        "s3proxy.authorization=aws-v2-or-v4\n"
        f"s3proxy.identity={cfg.s3_identity}\n"
        f"s3proxy.credential={cfg.s3_credential}\n"
        f"s3proxy.endpoint=http://127.0.0.1:{cfg.s3_port}\n"
        "jclouds.provider=filesystem\n"
        f"jclouds.filesystem.basedir={data}\n"
    )
    props.chmod(0o600)  # it holds the credential
    return ["java", "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-jar", str(jar), "--properties", str(props)]


COMMANDS = {"kafka": kafka_command, "redis": redis_command, "s3": s3_command}
MARKERS = {"kafka": "kafka.Kafka", "redis": "redis-server", "s3": "s3proxy"}


# -- readiness -----------------------------------------------------------------------------------------------

def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _kafka_ready(cfg: StackConfig) -> bool:
    # An ApiVersions request (v0) answered means the broker serves requests, not just that the port is bound.
    try:
        with socket.create_connection(("127.0.0.1", cfg.kafka_port), timeout=2) as s:
            client = b"stack"
            body = (18).to_bytes(2, "big") + (0).to_bytes(2, "big") + (1).to_bytes(4, "big") + len(client).to_bytes(2, "big") + client
            s.sendall(len(body).to_bytes(4, "big") + body)
            size = int.from_bytes(s.recv(4), "big")
            reply = b""
            while len(reply) < size:
                chunk = s.recv(size - len(reply))
                if not chunk:
                    return False
                reply += chunk
            return reply[:4] == (1).to_bytes(4, "big") and reply[4:6] == b"\x00\x00"
    except OSError:
        return False


def _redis_ready(cfg: StackConfig) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", cfg.redis_port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _s3_ready(cfg: StackConfig) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{cfg.s3_port}/", timeout=2)
        return True
    except urllib.error.HTTPError:
        return True  # 403 without credentials: the server answers
    except OSError:
        return False


PROBES = {"kafka": _kafka_ready, "redis": _redis_ready, "s3": _s3_ready}


# -- process management --------------------------------------------------------------------------------------

def _pid_file(cfg: StackConfig, service: str) -> Path:
    return cfg.path("run", f"{service}.pid")


def running_pid(cfg: StackConfig, service: str) -> int | None:
    """Our process for `service`, or None. A pid file whose process is gone or is something else is stale."""
    pid_file = _pid_file(cfg, service)
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        pid_file.unlink(missing_ok=True)
        return None
    # Java commands name paths under home; redis-server rewrites its title to "redis-server 127.0.0.1:PORT".
    owned = f"127.0.0.1:{cfg.redis_port}" in cmdline if service == "redis" else str(cfg.home) in cmdline
    if MARKERS[service] not in cmdline or not owned:
        pid_file.unlink(missing_ok=True)
        return None
    return pid


def is_ready(cfg: StackConfig, service: str) -> bool:
    return PROBES[service](cfg)


def start(cfg: StackConfig, service: str) -> float:
    """Start one service unless it already runs; returns the seconds it took to be ready."""
    if running_pid(cfg, service) is not None and is_ready(cfg, service):
        return 0.0
    if running_pid(cfg, service) is None and _port_open(cfg.port(service)):
        raise RuntimeError(f"port {cfg.port(service)} for {service} is taken by another process: choose another port")
    command = COMMANDS[service](cfg)
    for folder in ("logs", "run"):
        cfg.path(folder).mkdir(parents=True, exist_ok=True)
    log_path = cfg.path("logs", f"{service}.log")
    started = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"\n--- start {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=cfg.home)
    _pid_file(cfg, service).write_text(str(proc.pid))
    while time.monotonic() - started < cfg.timeout_s:
        if proc.poll() is not None:
            break
        if is_ready(cfg, service):
            elapsed = time.monotonic() - started
            say(f"{service} ready on 127.0.0.1:{cfg.port(service)} in {elapsed:.1f} s (pid {proc.pid})")
            return elapsed
        time.sleep(0.2)
    tail = log_path.read_text(errors="replace")[-3000:]
    stop(cfg, service)
    raise RuntimeError(f"{service} did not become ready (exit code {proc.poll()}); last lines of {log_path}:\n{tail}")


def stop(cfg: StackConfig, service: str, *, timeout_s: float = 20.0) -> bool:
    """SIGTERM our own process (never a reused pid), SIGKILL after `timeout_s`. True if something was stopped."""
    pid = running_pid(cfg, service)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        try:  # reap it if it is our child (tests start and stop in one process)
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                break
        except ChildProcessError:
            pass
        time.sleep(0.1)
    if Path(f"/proc/{pid}").exists() and running_pid(cfg, service) == pid:
        os.kill(pid, signal.SIGKILL)
        say(f"{service} did not stop in {timeout_s:.0f} s: killed")
    _pid_file(cfg, service).unlink(missing_ok=True)
    say(f"{service} stopped (pid {pid})")
    return True


def up(cfg: StackConfig, services: tuple[str, ...] | list[str] = SERVICES) -> dict[str, float]:
    return {service: start(cfg, service) for service in services}


def down(cfg: StackConfig, services: tuple[str, ...] | list[str] = SERVICES, *, wipe: bool = False) -> None:
    for service in services:
        stop(cfg, service)
        if wipe:
            shutil.rmtree(cfg.path("data", service), ignore_errors=True)


def env(cfg: StackConfig) -> dict[str, str]:
    return {
        "RAMPLUS_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{cfg.kafka_port}",
        "RAMPLUS_REDIS__URL": f"redis://127.0.0.1:{cfg.redis_port}/0",
        "RAMPLUS_S3__ENDPOINT_URL": f"http://127.0.0.1:{cfg.s3_port}",
        "AWS_ACCESS_KEY_ID": cfg.s3_identity,
        "AWS_SECRET_ACCESS_KEY": cfg.s3_credential,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("up", "down", "status", "env"))
    parser.add_argument("services", nargs="*", default=[], help="kafka, redis, s3 (default: all)")
    parser.add_argument("--home", type=Path)
    parser.add_argument("--kafka-port", type=int)
    parser.add_argument("--redis-port", type=int)
    parser.add_argument("--s3-port", type=int)
    parser.add_argument("--wipe", action="store_true", help="down: also delete the services' data")
    args = parser.parse_args(argv)
    cfg = StackConfig.from_env(home=args.home, kafka_port=args.kafka_port, redis_port=args.redis_port, s3_port=args.s3_port)
    services = tuple(args.services) or SERVICES
    unknown = [s for s in services if s not in SERVICES]
    if unknown:
        parser.error(f"unknown service(s) {', '.join(unknown)}; choose from {', '.join(SERVICES)}")
    try:
        if args.command == "up":
            up(cfg, services)
        elif args.command == "down":
            down(cfg, services, wipe=args.wipe)
        elif args.command == "env":
            for key, value in env(cfg).items():
                print(f"export {key}={value}")
        else:
            ok = True
            for service in services:
                pid, ready = running_pid(cfg, service), is_ready(cfg, service)
                ok &= pid is not None and ready
                print(f"{service}\t{'running' if pid and ready else 'stopped'}\tpid={pid or '-'}\t127.0.0.1:{cfg.port(service)}")
            return 0 if ok else 1
    except RuntimeError as exc:
        say(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
