"""Ingress: the public HTTP API. It accepts calls (a call is accepted once its event is in the
outbox, committed), owns accounts and the catalog, and answers reads from the read model."""

from __future__ import annotations

from postback_ingress import accounts, calls, catalog, deliveries, queries, statements, webhooks
from postback_ingress.auth import SECURITY_SCHEMES
from postback_libs.http import GuardRequests
from postback_libs.runtime import Service
from postback_libs.settings import Settings


def build(settings: Settings) -> Service:
    service = Service("ingress", "postback_ingress", settings)
    service.app.title = "Postback"
    service.app.description = (
        "Call slow APIs asynchronously: get 202 and a request id at once, receive the signed "
        "result on your webhook."
    )
    service.app.security_schemes = SECURITY_SCHEMES
    # Every route but `POST /v1/calls` (answered ahead of the middleware, with its own limit).
    service.app.add_middleware(GuardRequests, max_bytes=settings.max_call_bytes)
    calls.install(service)
    service.app.include_router(queries.router(service))
    service.app.include_router(accounts.router(service))
    service.app.include_router(catalog.router(service))
    service.app.include_router(webhooks.router(service))
    service.app.include_router(deliveries.router(service))
    service.app.include_router(statements.router(service))
    return service
