"""`postback up`: the whole system on one machine — an embedded PostgreSQL and Kafka-compatible
broker (unless real ones are configured), topics, migrations, and every service as its own
process, restarted if it dies, all stopped in order on Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import functools
import http.client
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from postback_libs.db import migrate, schema_for
from postback_libs.settings import DEFAULT_PORTS, SERVICES, Settings
from postback_libs.topics import ensure_topics

PACKAGES = {s: f"postback_{schema_for(s)}" for s in SERVICES}
# The local stack's owners and webhook receivers run on this machine, so it lets outbound
# requests reach loopback; a deployment leaves POSTBACK_ALLOWED_NETWORKS empty.
LOCAL_NETWORKS = "127.0.0.0/8"


def _say(line: str) -> None:
    print(line, flush=True)


def _persistent_secret(path: Path) -> str:
    """A random secret kept in the data dir, so restarts keep derived secrets stable."""
    if path.exists():
        return path.read_text().strip()
    value = secrets.token_urlsafe(32)
    path.write_text(value)
    path.chmod(0o600)
    return value


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@dataclass
class Child:
    service: str
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    restarts: list[float] = field(default_factory=list)


class Stack:
    def __init__(self, data_dir: Path, base_port: int = 8080) -> None:
        self.data_dir = data_dir.absolute()
        self.base_port = base_port
        self.children: dict[str, Child] = {}
        self.pg: object | None = None
        self.kafka: object | None = None
        self.env: dict[str, str] = {}
        # The signal (Ctrl-C or SIGTERM) that asked it to stop: starting stops at the next step,
        # running at the next tick.
        self.stopped_by: int | None = None

    def port(self, service: str) -> int:
        return self.base_port + DEFAULT_PORTS[service] - DEFAULT_PORTS["ingress"]

    def start_infrastructure(self) -> None:
        from postback.embedded import (
            EMBEDDED_FETCH_MAX_WAIT_MS,
            EMBEDDED_TOPIC_PARTITIONS,
            EmbeddedKafka,
            EmbeddedPostgres,
            free_port,
        )

        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTBACK_")}
        env.update({k: v for k, v in os.environ.items() if k.startswith("POSTBACK_")})
        if "POSTBACK_KAFKA_BOOTSTRAP" not in os.environ:
            port = 9092 if _port_free(9092) else free_port()
            kafka = EmbeddedKafka(port, self.data_dir / "logs" / "broker.log")
            (self.data_dir / "logs").mkdir(exist_ok=True)
            kafka.start()
            self.kafka = kafka
            env["POSTBACK_KAFKA_BOOTSTRAP"] = kafka.bootstrap
            env.setdefault("POSTBACK_KAFKA_FETCH_MAX_WAIT_MS", str(EMBEDDED_FETCH_MAX_WAIT_MS))
            env.setdefault("POSTBACK_TOPIC_PARTITIONS", str(EMBEDDED_TOPIC_PARTITIONS))
            _say(f"  broker      embedded (in memory) at {kafka.bootstrap}")
        else:
            _say(f"  broker      {os.environ['POSTBACK_KAFKA_BOOTSTRAP']}")
        if "POSTBACK_DATABASE_URL" not in os.environ:
            port = 5432 if _port_free(5432) else free_port()
            pg = EmbeddedPostgres(self.data_dir / "pg", port)
            pg.start()
            pg.create_database("postback")
            self.pg = pg
            env["POSTBACK_DATABASE_URL"] = pg.dsn("postback")
            _say(f"  database    embedded at 127.0.0.1:{port}, data in {self.data_dir / 'pg'}")
        else:
            _say("  database    POSTBACK_DATABASE_URL")
        env.setdefault(
            "POSTBACK_OPERATOR_TOKEN", _persistent_secret(self.data_dir / "operator-token")
        )
        env.setdefault("POSTBACK_SECRET_KEY", _persistent_secret(self.data_dir / "secret-key"))
        env.setdefault("POSTBACK_ALLOWED_NETWORKS", LOCAL_NETWORKS)
        # One machine, processes that restart quickly: fast group joins and failover.
        env.setdefault("POSTBACK_KAFKA_SESSION_TIMEOUT_MS", "2000")
        env.setdefault("POSTBACK_PUBLIC_URL", f"http://127.0.0.1:{self.port('ingress')}")
        env.setdefault("POSTBACK_CALLBACK_URL", f"http://127.0.0.1:{self.port('owner-adapter')}")
        self.env = env

    def prepare(self) -> None:
        default_partitions = Settings.model_fields["topic_partitions"].default
        settings = Settings(
            kafka_bootstrap=self.env["POSTBACK_KAFKA_BOOTSTRAP"],
            database_url=self.env["POSTBACK_DATABASE_URL"],
            topic_prefix=self.env.get("POSTBACK_TOPIC_PREFIX", ""),
            topic_partitions=int(self.env.get("POSTBACK_TOPIC_PARTITIONS", default_partitions)),
        )

        async def run() -> None:
            await ensure_topics(settings)
            for service in SERVICES:
                await migrate(settings.database_url, schema_for(service), PACKAGES[service])

        asyncio.run(run())

    def spawn(self, service: str) -> None:
        child = self.children.setdefault(
            service,
            Child(service, self.port(service), self.data_dir / "logs" / f"{service}.log"),
        )
        child.log_path.parent.mkdir(parents=True, exist_ok=True)
        child.log = open(child.log_path, "ab")  # noqa: SIM115
        env = {
            **self.env,
            "POSTBACK_HTTP_PORT": str(child.port),
            "POSTBACK_MIGRATE_ON_START": "false",
        }
        child.proc = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "postback", "run", service],
            stdout=child.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        (self.data_dir / "pids").mkdir(exist_ok=True)
        (self.data_dir / "pids" / f"{service}.pid").write_text(str(child.proc.pid))

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        pending = set(self.children)
        while pending and self.stopped_by is None:
            for service in list(pending):
                child = self.children[service]
                assert child.proc is not None
                if child.proc.poll() is not None:
                    raise RuntimeError(
                        f"{service} exited with code {child.proc.returncode}; see {child.log_path}"
                    )
                try:
                    url = f"http://127.0.0.1:{child.port}/readyz"
                    with urllib.request.urlopen(url, timeout=1) as r:
                        if r.status == 200:
                            pending.discard(service)
                except (OSError, http.client.HTTPException):
                    pass  # not listening yet, or something else answered on the port
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {timeout:.0f}s: {', '.join(sorted(pending))}")
            time.sleep(0.2)

    def supervise_once(self) -> None:
        """Restart a service that died (a crash must not take the stack down)."""
        for child in self.children.values():
            if child.proc is not None and child.proc.poll() is not None:
                now = time.monotonic()
                child.restarts = [t for t in child.restarts if now - t < 60] + [now]
                _say(
                    f"{child.service} exited with code {child.proc.returncode}; restarting "
                    f"(see {child.log_path})"
                )
                if child.log:
                    child.log.close()
                if len(child.restarts) > 5:
                    time.sleep(5)  # crashing in a loop: slow down
                self.spawn(child.service)

    def stop(self) -> None:
        for child in self.children.values():
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        grace = time.monotonic() + 30
        for child in self.children.values():
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.1, grace - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc.wait()
            if child.log:
                child.log.close()
        for infra in (self.kafka, self.pg):
            if infra is not None:
                infra.stop()  # type: ignore[attr-defined]

    def urls(self) -> str:
        return " ".join(f"{s}=http://127.0.0.1:{self.port(s)}" for s in SERVICES)


def _unusable(stack: Stack) -> str | None:
    """Why the stack cannot start here, before anything starts: another stack on its ports
    would answer its readiness checks, and its services would restart for ever."""
    try:
        stack.data_dir.mkdir(parents=True, exist_ok=True)
        probe = stack.data_dir / ".writable"
        probe.touch()
        probe.unlink()
    except OSError as e:
        reason = e.strerror or e
        return f"cannot use {stack.data_dir} as data dir ({reason}): pick one with --data-dir"
    taken = [f"{s} {stack.port(s)}" for s in SERVICES if not _port_free(stack.port(s))]
    if taken:
        free = next(
            base
            for base in range(stack.base_port + 100, 65000, 100)
            if all(_port_free(base + stack.port(s) - stack.base_port) for s in SERVICES)
        )
        return (
            f"port in use: {', '.join(taken)}; start on other ports with "
            f"`postback up --base-port {free}` (or `make dev PORT={free}`)"
        )
    return None


def write_env(stack: Stack) -> Path:
    """The addresses the stack runs on, for the operator commands (`ledger check`, `dlq`,
    `projection rebuild`): `set -a; . <data dir>/env; set +a`."""
    path = stack.data_dir / "env"
    names = ("POSTBACK_DATABASE_URL", "POSTBACK_KAFKA_BOOTSTRAP", "POSTBACK_TOPIC_PREFIX")
    lines = [f"{n}={shlex.quote(stack.env[n])}" for n in names if stack.env.get(n)]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)  # a database URL may hold a password
    return path


def up(data_dir: Path, base_port: int, then: list[str] | None = None) -> int:
    stack = Stack(data_dir, base_port)
    problem = _unusable(stack)
    if problem is not None:
        _say(f"postback up: {problem}")
        return 2

    def on_signal(signum: int, _: object) -> None:
        stack.stopped_by = signum

    def stopped() -> int:  # 130 for Ctrl-C, 143 for SIGTERM, as shells report them
        return 128 + (stack.stopped_by or 0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    starting: list[Callable[[], None]] = [
        stack.start_infrastructure,
        stack.prepare,
        *(functools.partial(stack.spawn, service) for service in SERVICES),
        stack.wait_ready,
    ]
    try:
        _say("Starting Postback")
        for step in starting:
            step()
            if stack.stopped_by is not None:
                return stopped()
        _say(f"Postback is ready: {stack.urls()} logs={stack.data_dir / 'logs'}")
        _say(f"  operator token in {stack.data_dir / 'operator-token'}; Ctrl-C stops everything")
        _say(f"  operator commands on this stack: set -a; . {write_env(stack)}; set +a")
        if then:
            result = subprocess.run(then, env=stack.env, check=False)  # noqa: S603
            if result.returncode != 0:
                return result.returncode
        while stack.stopped_by is None:
            stack.supervise_once()
            time.sleep(0.5)
        return 0
    except RuntimeError as e:
        if stack.stopped_by is not None:  # a step the same Ctrl-C interrupted: no failure
            return stopped()
        _say(f"postback up failed: {e}")
        return 1
    finally:
        _say("Stopping Postback")
        stack.stop()
        _say("Stopped")
