"""The HTTP face every service shares: RFC 9457 problem details with stable types, and
`/healthz`, `/readyz`, `/metrics`."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar
from urllib.parse import unquote_to_bytes

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.telemetry import TelemetryConfig
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from postback_libs.db import UNREACHABLE

PROBLEM_JSON = "application/problem+json"


def problem_type(slug: str) -> str:
    return f"urn:postback:problem:{slug}"


class Problem(Exception):
    """An error answered as problem+json. `slug` is the stable, documented part of `type`."""

    def __init__(self, status: int, slug: str, title: str, detail: str = "", **extra: Any) -> None:
        super().__init__(detail or title)
        self.status, self.slug, self.title, self.detail, self.extra = (
            status,
            slug,
            title,
            detail,
            extra,
        )
        self.headers: dict[str, str] = {}

    def response(self, instance: str | None = None) -> JSONResponse:
        body: dict[str, Any] = {
            "type": problem_type(self.slug),
            "title": self.title,
            "status": self.status,
            **({"detail": self.detail} if self.detail else {}),
            **({"instance": instance} if instance else {}),
            **self.extra,
        }
        return JSONResponse(body, self.status, headers=self.headers, media_type=PROBLEM_JSON)


_STATUS_SLUGS = {
    401: ("unauthorized", "Authentication required"),
    403: ("forbidden", "Not allowed"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    409: ("conflict", "Conflict"),
    413: ("payload-too-large", "Payload too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
}


class GuardRequests:
    """ASGI middleware for a public API. A path or query that holds a NUL or bytes that are not
    UTF-8 is answered 400 `invalid-characters` here: PostgreSQL would refuse it deep inside a
    handler, a 500. A body past `max_bytes` is answered 413, and read no further."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not _clean_url(scope):
            problem = Problem(
                400,
                "invalid-characters",
                "Invalid characters",
                "the path or query holds a NUL or bytes that are not UTF-8",
            )
            await problem.response()(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit():
            problem = Problem(
                400, "invalid-content-length", "Invalid Content-Length", "send a number of bytes"
            )
            await problem.response(scope["path"])(scope, receive, send)
            return
        if int(length) > self.max_bytes:
            await self._too_large().response(scope["path"])(scope, receive, send)
            return
        read = 0

        async def counted() -> Any:
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if read > self.max_bytes:
                raise self._too_large()
            return message

        await self.app(scope, counted, send)

    def _too_large(self) -> Problem:
        return Problem(
            413, "payload-too-large", "Payload too large", f"at most {self.max_bytes} bytes"
        )


def _clean_url(scope: Scope) -> bool:
    raw = unquote_to_bytes(scope.get("raw_path") or scope["path"].encode())
    query = unquote_to_bytes(scope.get("query_string", b"").replace(b"+", b" "))
    for part in (raw, query):
        if b"\x00" in part:
            return False
        try:
            part.decode()
        except UnicodeDecodeError:
            return False
    return True


class FieldError(BaseModel):
    location: str = Field(description="Where in the request, e.g. `body.webhook_url`.")
    message: str


class ProblemDetails(BaseModel):
    """Every error answer (RFC 9457, `application/problem+json`)."""

    type: str = Field(description="Stable: `urn:postback:problem:<slug>`; branch on this.")
    title: str
    status: int
    detail: str | None = Field(None, description="What went wrong with this request.")
    instance: str | None = Field(None, description="The path of the request.")
    errors: list[FieldError] | None = Field(None, description="Each invalid field (422).")


# Declared on every route: an error is always a problem, whatever the route documents itself
# (FastAPI would otherwise document its own 422 shape, which is never sent).
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {
        "model": ProblemDetails,
        "content": {"application/problem+json": {}},
        "description": description,
    }
    for status, description in (
        ("4XX", "A problem with the request; `type` says which."),
        (422, "The request is not valid; `errors` lists each field."),
        ("5XX", "A problem on Postback's side; try again later."),
    )
}


def _query_carries_token(scope: MutableMapping[str, Any]) -> bool:
    return b"token=" in scope.get("query_string", b"")


class App(FastAPI):
    """FastAPI, plus routes answered in plain ASGI ahead of its middleware stack.

    A hot route (accepting a call) is registered with `direct`: its requests skip the error,
    telemetry and body-limit middleware, the router and the route's wrappers, a third of the
    CPU of accepting a call in-process. Its handler then does what they did: the trace span, a
    body limit, and every exception answered through `answer_exception`. The route stays
    registered the usual way too, for the OpenAPI document."""

    def __init__(self, **kwargs: Any) -> None:
        # FastAPI's own spans record the query string, redacting only cloud storage signatures:
        # an owner's callback may carry its token there (`?token=`), and the trace store is no
        # place for it. Such requests keep the span of `TraceRequests`, which records no URL.
        telemetry: TelemetryConfig = {"exclude": _query_carries_token}
        telemetry.update(kwargs.pop("telemetry", {}))
        responses = {**PROBLEM_RESPONSES, **kwargs.pop("responses", {})}
        super().__init__(telemetry=telemetry, responses=responses, **kwargs)
        self.direct_routes: dict[tuple[str, str], ASGIApp] = {}
        # What routes name in their `security` (OpenAPI security scheme objects by name).
        self.security_schemes: dict[str, Any] = {}

    def openapi(self) -> dict[str, Any]:
        """FastAPI's document, with each problem described under the media type it is sent
        as (`application/problem+json`), not `application/json`, and the security schemes
        its routes name."""
        schema = self.openapi_schema
        if schema is None:
            schema = super().openapi()
            if self.security_schemes:
                schema.setdefault("components", {})["securitySchemes"] = self.security_schemes
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    for response in operation.get("responses", {}).values():
                        content = response.get("content", {})
                        if "application/problem+json" in content and "application/json" in content:
                            content["application/problem+json"] = content.pop("application/json")
        return schema

    def direct(self, method: str, path: str, handler: ASGIApp) -> None:
        self.direct_routes[(method, path)] = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            handler = self.direct_routes.get((scope["method"], scope["path"]))
            if handler is not None:
                await handler(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def answer_exception(
        self, scope: Scope, receive: Receive, send: Send, exc: Exception
    ) -> None:
        """Answer `exc` as the app's exception handlers would (problem+json; a 500 for the
        unexpected, its stack trace logged)."""
        response = await _handled(self.exception_handlers, Request(scope, receive), exc)
        await response(scope, receive, send)


async def _handled(handlers: dict[Any, Any], request: Request, exc: Exception) -> Response:
    """The response the app's exception `handlers` give `exc`."""
    handler = next(handlers[c] for c in type(exc).__mro__ if c in handlers)
    answer = handler(request, exc)
    response: Response = await answer if inspect.isawaitable(answer) else answer
    return response


Dependency = TypeVar("Dependency", bound=Callable[..., Any])


def authenticates(dependency: Dependency) -> Dependency:
    """Mark a route dependency that says who is calling; it takes the request alone.

    FastAPI reads a JSON body before it solves a route's dependencies, so a body it cannot
    read is refused before anyone is authenticated. The problem handlers run the marked
    dependencies first in that case: a request without valid credentials is answered 401,
    never told what was wrong with its body."""
    dependency.authenticates = True  # type: ignore[attr-defined]
    return dependency


async def _refusal(request: Request) -> Response | None:
    """The answer of the first of the matched route's authenticating dependencies that
    refuses `request`, if one does."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    for dependency in dependant.dependencies if dependant is not None else ():
        if getattr(dependency.call, "authenticates", False):
            try:
                checked = dependency.call(request)
                if inspect.isawaitable(checked):
                    await checked
            except Exception as e:
                return await _handled(request.app.exception_handlers, request, e)
    return None


def install_problem_handlers(app: FastAPI) -> None:
    async def on_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Problem)
        return exc.response(request.url.path)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        unread = any(e.get("type") == "json_invalid" for e in exc.errors())
        refusal = await _refusal(request) if unread else None
        if refusal is not None:
            return refusal
        errors = [
            {"location": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
            for e in exc.errors()
        ]
        first = errors[0] if errors else {"location": "body", "message": "invalid"}
        return Problem(
            422,
            "validation-error",
            "The request is not valid",
            f"{first['location']}: {first['message']}",
            errors=errors,
        ).response(request.url.path)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI's answer to a body its parser failed on (JSON nested past the parser's
            # recursion limit, say): no dependency has run yet.
            refusal = await _refusal(request)
            if refusal is not None:
                return refusal
            return Problem(
                400,
                "unreadable-body",
                "The body could not be read",
                "send a JSON object (nested at most 64 levels deep)",
            ).response(request.url.path)
        slug, title = _STATUS_SLUGS.get(exc.status_code, ("http-error", "Request failed"))
        detail = exc.detail if isinstance(exc.detail, str) and exc.detail != title else ""
        return Problem(exc.status_code, slug, title, detail).response(request.url.path)

    async def on_unavailable(request: Request, exc: Exception) -> Response:
        # The database away for a moment (a restart, a failover, no connection to spare): the
        # client may try again, and is told so, rather than getting a 500.
        from postback_libs.logging import get_logger

        get_logger(__name__).warning("database unavailable", path=request.url.path, error=repr(exc))
        problem = Problem(
            503,
            "service-unavailable",
            "Service unavailable",
            "the database is unavailable for a moment; try again shortly",
        )
        problem.headers["Retry-After"] = "1"
        return problem.response(request.url.path)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # The stack trace goes to the log, never to the client.
        from postback_libs.logging import get_logger

        get_logger(__name__).exception("unhandled error", path=request.url.path)
        return Problem(500, "internal-error", "Internal error").response(request.url.path)

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for unavailable in UNREACHABLE:
        app.add_exception_handler(unavailable, on_unavailable)
    app.add_exception_handler(Exception, on_unexpected)


ReadinessCheck = Callable[[], Awaitable[str | None]]  # None when ready, else why not


def install_health_routes(app: FastAPI, checks: list[ReadinessCheck]) -> None:
    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        problems = [p for p in [await check() for check in checks] if p]
        if problems:
            return JSONResponse({"status": "not ready", "reasons": problems}, 503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
