"""OpenTelemetry tracing across Kafka hops: each event carries the W3C `traceparent` of the span
that produced it, so the handlers of one call, in every service, form one trace."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()


def configure_tracing(service: str, otlp_endpoint: str = "") -> None:
    """Spans are recorded only when they have somewhere to go. Without an exporter every span
    is a non-recording one: trace and span ids still flow through every event's `traceparent`
    (and into the logs), at a fraction of the cost of building spans nobody reads."""
    resource = Resource.create({"service.name": f"postback-{service}"})
    if not otlp_endpoint:
        trace.set_tracer_provider(TracerProvider(resource=resource, sampler=ALWAYS_OFF))
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=resource)
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{otlp_endpoint}/v1/traces"))
    )
    trace.set_tracer_provider(provider)


def tracer() -> trace.Tracer:
    return trace.get_tracer("postback")


def current_traceparent() -> str | None:
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


@contextmanager
def span_from(traceparent: str | None, name: str, kind: SpanKind) -> Iterator[Span]:
    """A span that continues the trace of `traceparent` (or starts one)."""
    ctx = _propagator.extract({"traceparent": traceparent}) if traceparent else None
    token = otel_context.attach(ctx) if ctx is not None else None
    try:
        with tracer().start_as_current_span(name, kind=kind) as span:
            yield span
    finally:
        if token is not None:
            otel_context.detach(token)


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
        traceparent = next((v.decode() for k, v in scope["headers"] if k == b"traceparent"), None)
        with span_from(traceparent, f"HTTP {scope['method']}", SpanKind.SERVER):
            await self.app(scope, receive, send)
