"""One service process: its Postgres pool and migrations, its outbox relay, its Kafka consumer
groups, its background workers and its HTTP server, started in that order and stopped in the
reverse order on SIGTERM so that in-flight work finishes, is committed and is published."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import uvicorn
from aiokafka import AIOKafkaProducer

from postback_libs.consumer import BatchApplier, Handlers, purge_inbox
from postback_libs.db import DATABASE_ERRORS, create_pool, migrate, schema_for
from postback_libs.events import CloudEvent, Topic
from postback_libs.follower import TopicFollower
from postback_libs.http import (
    App,
    ReadinessCheck,
    install_health_routes,
    install_problem_handlers,
)
from postback_libs.logging import configure_logging, get_logger
from postback_libs.outbox import OutboxRelay, new_producer, unit_of_work
from postback_libs.settings import ServiceName, Settings
from postback_libs.subscription import Subscription
from postback_libs.telemetry import TraceRequests, configure_tracing

log = get_logger(__name__)

Worker = Callable[[], Coroutine[Any, Any, None]]
T = TypeVar("T")


def tune_gc() -> None:
    """Once started: what the process built to run (modules, models, pools) moves out of the
    collector's way, and young collections come every 50,000 allocations instead of 700 (a
    consumed batch makes thousands of short-lived objects at once). Collector pauses were a
    fifth of routing's CPU under load; settlement settles ~15 % more calls per CPU second."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run a process's main coroutine on uvloop where it is installed (the asyncio loop's
    socket and timer handling is a large share of a service's CPU), else on asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Signals belong to the service, which stops the HTTP server as one step of its drain.
        yield


class Service:
    def __init__(self, name: ServiceName, package: str, settings: Settings) -> None:
        self.name, self.package, self.settings = name, package, settings
        self.schema = schema_for(name)
        self.app = App(title=f"Postback {name}", version="0.1.0")
        install_problem_handlers(self.app)
        self.app.add_middleware(TraceRequests)
        self.pool: Any = None
        self.producer: AIOKafkaProducer | None = None
        self.subscriptions: list[Subscription] = []
        self.relay: OutboxRelay | None = None
        self.appliers: list[BatchApplier] = []
        self._handlers: list[Handlers] = []
        self._workers: list[Worker] = []
        self.purges: list[Worker] = []
        self.followers: list[TopicFollower] = []
        self._on_start: list[Worker] = []
        self._on_stop: list[Worker] = []
        self._stop_requested = asyncio.Event()
        self.crash: BaseException | None = None
        self.starting = ""  # the step `start` is at, for the line that says why it failed
        self._tasks: list[asyncio.Task[None]] = []
        self._checks: list[ReadinessCheck] = [self._db_ready, self._relay_ready]
        self._started = False
        self._drain_deadline = 0.0
        self._server: _Server | None = None
        install_health_routes(self.app, self._checks)

    # --- what a service declares -------------------------------------------------------------

    def consume(self, handlers: Handlers) -> None:
        self._handlers.append(handlers)

    def follow(self, topic: Topic, apply: Callable[[CloudEvent], None]) -> TopicFollower:
        """Follow a compacted topic into memory from its start, in every replica, while the
        service runs (no consumer group: each replica needs all of it)."""
        follower = TopicFollower(
            self.settings.kafka_bootstrap, self.settings.topic(topic.name), apply, self.crashed
        )
        self.followers.append(follower)
        self.on_start(follower.start)
        self.on_stop(follower.stop)
        return follower

    def worker(self, fn: Worker) -> Worker:
        """A long-running coroutine that stops when the service is stopping."""
        self._workers.append(fn)
        return fn

    def purge(self, fn: Worker) -> Worker:
        """An hourly job that forgets what is past its retention, beside the inbox's."""
        self.purges.append(fn)
        return fn

    def on_start(self, fn: Worker) -> Worker:
        self._on_start.append(fn)
        return fn

    def on_stop(self, fn: Worker) -> Worker:
        self._on_stop.append(fn)
        return fn

    def readiness(self, check: ReadinessCheck) -> ReadinessCheck:
        self._checks.append(check)
        return check

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def unit_of_work(self) -> Any:
        """A transaction whose events the relay publishes as soon as it commits."""
        return unit_of_work(self.pool, self.name, self.settings, self._wake_relay)

    def _wake_relay(self) -> None:
        if self.relay is not None:
            self.relay.wake()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._stopping = asyncio.Event()
        s = self.settings
        self.starting = "migrating the database (POSTBACK_DATABASE_URL)"
        if s.migrate_on_start:
            await migrate(s.database_url, self.schema, self.package)
        self.starting = "connecting to the database (POSTBACK_DATABASE_URL)"
        self.pool = await create_pool(
            s.database_url, self.schema, min_size=s.db_pool_min, max_size=s.db_pool_max
        )
        self.starting = "connecting to the broker (POSTBACK_KAFKA_BOOTSTRAP)"
        self.producer = new_producer(s)
        await self.producer.start()
        self.relay = OutboxRelay(s.database_url, self.schema, self.producer)
        relay = asyncio.create_task(self.relay.run(), name="outbox-relay")
        relay.add_done_callback(self._worker_ended)
        self._tasks.append(relay)
        self.starting = "starting the service's own parts"
        for fn in self._on_start:
            await fn()
        for handlers in self._handlers:
            self._subscribe(handlers)
        self.starting = "joining consumer groups (POSTBACK_KAFKA_BOOTSTRAP)"
        # Groups join in parallel: each join waits on the broker's rebalance delay.
        await asyncio.gather(*(sub.start() for sub in self.subscriptions))
        for fn in (*self._workers, self._housekeeping):
            task = asyncio.create_task(fn(), name=fn.__name__)
            task.add_done_callback(self._worker_ended)
            self._tasks.append(task)
        self._started = True
        log.info("service started", port=s.port_for(self.name))

    def _subscribe(self, handlers: Handlers) -> None:
        relay, producer = self.relay, self.producer
        assert relay is not None
        assert producer is not None
        applier = BatchApplier(handlers, self.pool, self.settings, self.name, producer, relay.wake)
        self.appliers.append(applier)
        self.subscriptions.append(
            Subscription(applier, self.settings, f"postback-{self.name}", self.crashed)
        )

    def drain_time_left(self, at_least: float = 0.5) -> float:
        """Seconds left of the drain (`stop`), for an `on_stop` step that waits on work."""
        return max(at_least, self._drain_deadline - asyncio.get_running_loop().time())

    def crashed(self, error: BaseException) -> None:
        """Something the service runs on died (a consumer loop, a worker, a follower): stop,
        and exit non-zero so the supervisor starts this again."""
        self.crash = error
        self._stop_requested.set()

    def _worker_ended(self, task: asyncio.Task[None]) -> None:
        """A worker that dies of an error would leave its work undone while the service looks
        alive: crash as a consumer loop does."""
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        assert error is not None
        log.critical("worker died", worker=task.get_name(), error=repr(error))
        self.crashed(error)

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self._stopping.set()
        # Half the grace is the HTTP server's (serve); this is the other half, shared by every
        # step below, so the whole drain ends within the grace the platform gives it.
        self._drain_deadline = (
            asyncio.get_running_loop().time() + self.settings.shutdown_grace_seconds / 2
        )

        for applier in self.appliers:
            applier.stopping = True
        # Each group finishes the batch in hand and commits it before it leaves.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(sub.stop() for sub in self.subscriptions)), self.drain_time_left()
            )
        for fn in self._on_stop:
            await fn()
        workers = [t for t in self._tasks if t.get_name() != "outbox-relay"]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*workers, return_exceptions=True), self.drain_time_left()
            )
        for t in workers:
            t.cancel()
        if self.relay is not None:
            await self.relay.stop()  # publishes what is pending, then returns
            relay_task = [t for t in self._tasks if t.get_name() == "outbox-relay"]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*relay_task, return_exceptions=True),
                    self.drain_time_left(at_least=2.0),
                )
        self._tasks.clear()
        if self.producer is not None:
            await self.producer.stop()
        await self.pool.close()
        log.info("service stopped")

    async def serve(self) -> None:
        """Run until SIGTERM or SIGINT, then drain."""
        configure_logging(self.name, self.settings.log_level)
        configure_tracing(self.name, self.settings.otel_exporter_endpoint)
        stop = self._stop_requested
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
        except Exception as e:
            # One line that says what could not be reached, not a traceback on stderr; the
            # supervisor starts the process again.
            log.critical("could not start", step=self.starting, error=repr(e))
            raise SystemExit(1) from None
        tune_gc()
        config = uvicorn.Config(
            self.app,
            host=self.settings.http_host,
            port=self.settings.port_for(self.name),
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=int(self.settings.shutdown_grace_seconds / 2),
        )
        self._server = _Server(config)
        http = asyncio.create_task(self._server.serve())
        await stop.wait()
        log.info("stopping")
        self._server.should_exit = True
        await http
        await self.stop()
        if self.crash is not None:
            raise SystemExit(1)

    async def _housekeeping(self) -> None:
        """Hourly: the inbox, and whatever else the service keeps, would otherwise grow with
        every event handled, for ever."""

        async def forget_old_inbox() -> None:
            keep = [h.group for h in self._handlers if h.remember_forever]
            await purge_inbox(self.pool, self.settings.inbox_retention_days, keep=keep)

        while not self.stopping:
            for purge in (forget_old_inbox, *self.purges):
                try:
                    await purge()
                except DATABASE_ERRORS as e:
                    log.warning("purge failed", purge=purge.__name__, error=repr(e))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 3600)

    # --- readiness ---------------------------------------------------------------------------

    async def _db_ready(self) -> str | None:
        if self.pool is None:
            return "database pool not open"
        try:
            async with self.pool.acquire(timeout=2) as conn:
                await conn.fetchval("SELECT 1", timeout=2)  # a stalled database: not ready
        except Exception as e:
            return f"database unavailable: {e.__class__.__name__}"
        return None

    async def _relay_ready(self) -> str | None:
        task = next((t for t in self._tasks if t.get_name() == "outbox-relay"), None)
        if task is None or task.done():
            return "outbox relay not running"
        return None
