"""OpenTelemetry tracing across Kafka hops: each event carries the W3C `traceparent` of the span
that produced it, so the handlers of one call, in every service, form one trace.

Spans are recorded only when they have somewhere to go (`POSTBACK_OTEL_EXPORTER_ENDPOINT`).
Without an exporter the trace context is still carried — every event, log line and emitted
event keeps its call's trace id — but by a context variable instead of the SDK, whose span
machinery costs more per event than applying the event does."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()
_carried: ContextVar[str | None] = ContextVar("traceparent", default=None)
_recording = False


def configure_tracing(service: str, otlp_endpoint: str = "") -> None:
    global _recording
    if not otlp_endpoint:
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": f"postback-{service}"}))
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{otlp_endpoint}/v1/traces"))
    )
    trace.set_tracer_provider(provider)
    _recording = True


def current_traceparent() -> str | None:
    if not _recording:
        return _carried.get()
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


def current_trace_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the work in progress, for log lines."""
    if not _recording:
        carried = _carried.get()
        return (carried[3:35], carried[36:52]) if carried else None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def _new_traceparent() -> str:
    # Trace ids need to be unique, not secret: the SDK draws them from `random` too.
    return f"00-{random.getrandbits(128):032x}-{random.getrandbits(64):016x}-00"


@contextmanager
def span_from(traceparent: str | None, name: str, kind: SpanKind) -> Iterator[None]:
    """Work that continues the trace of `traceparent` (or starts one)."""
    if not _recording:
        token = _carried.set(traceparent or _new_traceparent())
        try:
            yield
        finally:
            _carried.reset(token)
        return
    ctx = _propagator.extract({"traceparent": traceparent}) if traceparent else None
    attached = otel_context.attach(ctx) if ctx is not None else None
    try:
        with trace.get_tracer("postback").start_as_current_span(name, kind=kind):
            yield
    finally:
        if attached is not None:
            otel_context.detach(attached)


@contextmanager
def continuing(traceparent: str | None) -> Iterator[None]:
    """Work done later on behalf of the span `traceparent` names (gathered in a batch, queued
    in a table): what it emits, and the requests it makes, carry that trace. No new span."""
    if not traceparent:
        yield
        return
    if not _recording:
        token = _carried.set(traceparent)
        try:
            yield
        finally:
            _carried.reset(token)
        return
    attached = otel_context.attach(_propagator.extract({"traceparent": traceparent}))
    try:
        yield
    finally:
        otel_context.detach(attached)


class TraceRequests:
    """ASGI middleware: each HTTP request runs in a server span that continues the caller's
    `traceparent`, so the events a request emits (a call's `call.requested`) start or join
    the caller's trace."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        traceparent = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k == b"traceparent"), None
        )
        with span_from(traceparent, f"HTTP {scope['method']}", SpanKind.SERVER):
            await self.app(scope, receive, send)
