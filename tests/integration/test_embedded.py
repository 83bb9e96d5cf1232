"""The embedded Postgres and Tansu really serve clients over TCP and leave nothing behind."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from postback.embedded import EmbeddedKafka, EmbeddedPostgres, free_port

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _assert_gone(pid: int, port: int) -> None:
    assert not _alive(pid)
    assert not _group_alive(pid), "a child of the server outlived stop()"
    assert not _port_open(port)


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres(tmp_path / "pg", free_port(), durable=False)
    yield pg
    pg.stop()


@pytest.fixture
def kafka(tmp_path: Path) -> Iterator[EmbeddedKafka]:
    broker = EmbeddedKafka(free_port(), log_path=tmp_path / "tansu.log")
    yield broker
    broker.stop()


async def test_postgres_serves_tcp_and_stops_cleanly(postgres: EmbeddedPostgres) -> None:
    began = time.monotonic()
    postgres.start()
    print(f"postgres cold start (initdb + boot): {time.monotonic() - began:.2f}s")
    pid = postgres.pid
    assert pid is not None

    postgres.create_database("postback_test")
    postgres.create_database("postback_test")  # idempotent

    conn = await asyncpg.connect(postgres.dsn("postback_test"))
    try:
        assert await conn.fetchval("select 1") == 1
        assert await conn.fetchval("show fsync") == "off"
        assert await conn.fetchval("select current_database()") == "postback_test"
    finally:
        await conn.close()

    postgres.stop()
    postgres.stop()  # idempotent
    assert postgres.pid is None
    _assert_gone(pid, postgres.port)

    # A second start reuses the initialised data dir.
    began = time.monotonic()
    postgres.start()
    print(f"postgres warm start: {time.monotonic() - began:.2f}s")
    conn = await asyncpg.connect(postgres.dsn("postback_test"))
    await conn.close()


def test_postgres_start_failure_reports_the_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        pg = EmbeddedPostgres(tmp_path / "pg", taken.getsockname()[1], durable=False)
        with pytest.raises(RuntimeError, match="could not bind"):
            pg.start()
    assert pg.pid is None


async def test_kafka_round_trip_and_stops_cleanly(kafka: EmbeddedKafka) -> None:
    began = time.monotonic()
    kafka.start()
    print(f"tansu start: {time.monotonic() - began:.2f}s")
    pid = kafka.pid
    assert pid is not None
    assert kafka.bootstrap == f"127.0.0.1:{kafka.port}"

    topic = f"embedded-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
        assert topic in await admin.list_topics()
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"hello", key=b"k")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=15)
    finally:
        await consumer.stop()
    assert (record.key, record.value) == (b"k", b"hello")

    kafka.stop()
    kafka.stop()  # idempotent
    assert kafka.pid is None
    _assert_gone(pid, kafka.port)


def test_kafka_refuses_a_taken_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        broker = EmbeddedKafka(taken.getsockname()[1])
        with pytest.raises(RuntimeError, match="already in use"):
            broker.start()
    assert broker.pid is None


def test_postback_up_says_which_port_is_taken_before_starting_anything(tmp_path: Path) -> None:
    """Another stack on its ports would answer its readiness checks, and its own services
    would restart for ever: it refuses at once and names a base port that is free."""
    import subprocess
    import sys

    base = free_port(6)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 4))  # delivery's
        taken.listen()
        result = subprocess.run(
            [sys.executable, "-m", "postback", "up", "--base-port", str(base)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    assert f"port in use: delivery {base + 4}" in result.stdout + result.stderr
    assert "--base-port" in result.stdout + result.stderr
    assert not (tmp_path / ".postback" / "pg").exists()  # nothing was started
    unwritable = tmp_path / "file"
    unwritable.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "postback", "up", "--data-dir", str(unwritable / "data")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "pick one with --data-dir" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_ctrl_c_while_postback_up_starts_stops_everything_it_started(tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches the whole process group: `postback up` stops what it has
    started and exits 130, without a traceback and without reporting a failure, whether it
    comes while the command imports its modules or once the database runs."""
    import re
    import signal
    import subprocess
    import sys

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "postback", "up", "--base-port", str(base)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own group, as a shell's foreground job
            # A shell's background job ignores SIGINT; the test runner may be one.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )

    base = free_port(6)
    early = start()
    time.sleep(0.2)
    os.killpg(early.pid, signal.SIGINT)
    out, _ = early.communicate(timeout=60)
    assert early.returncode == 130, out
    assert "Traceback" not in out

    proc = start()
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "database    embedded at" in line:
            break
    printed = "".join(seen)
    broker = int(re.search(r"broker .* at 127\.0\.0\.1:(\d+)", printed)[1])  # type: ignore[index]
    database = int(re.search(r"database .* at 127\.0\.0\.1:(\d+)", printed)[1])  # type: ignore[index]
    os.killpg(proc.pid, signal.SIGINT)
    out = printed + proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, out
    assert "failed" not in out and "Traceback" not in out
    assert "Stopped" in out
    for port in (broker, database, *range(base, base + 6)):
        assert not _port_open(port), f"port {port} still served after Ctrl-C:\n{out}"
