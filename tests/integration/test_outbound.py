import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from postback_libs.outbound import (
    AddressPolicy,
    BlockedAddressError,
    classify_error,
    guarded_session,
    read_capped,
)

pytestmark = pytest.mark.integration

LOOPBACK = AddressPolicy([ipaddress.ip_network("127.0.0.0/8")])
BIG_BODY = b"x" * (1024 * 1024)


@dataclass
class Server:
    port: int
    hits: list[str] = field(default_factory=list)

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    state = Server(port=0)

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        state.hits.append(request.path)
        response: web.StreamResponse = await handler(request)
        return response

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/")

    async def redirect_elsewhere(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://127.0.0.2:{state.port}/")

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=BIG_BODY)

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1.5)
        return web.Response(text="late")

    app = web.Application(middlewares=[record])
    app.router.add_get("/", ok)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/redirect-elsewhere", redirect_elsewhere)
    app.router.add_get("/big", big)
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.port = runner.addresses[0][1]
    try:
        yield state
    finally:
        await runner.cleanup()


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    """`rebind.example` resolves to 127.0.0.1 and `nx.example` does not exist.

    Patches the system lookup underneath aiohttp's own resolver, so the real resolver path runs.
    """
    real = socket.getaddrinfo

    def fake(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "rebind.example":
            return real("127.0.0.1", port, *args, **kwargs)
        if host == "nx.example":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)


def _session(policy: AddressPolicy, total_timeout: float = 5.0) -> aiohttp.ClientSession:
    return guarded_session(
        policy, connect_timeout=2.0, total_timeout=total_timeout, user_agent="Postback/test"
    )


async def _failure(policy: AddressPolicy, url: str, **kwargs: Any) -> BaseException:
    async with _session(policy) as session:
        with pytest.raises(Exception) as info:  # noqa: PT011
            async with session.get(url, **kwargs):
                pass
    return info.value


async def test_loopback_blocked_without_allowlist(server: Server) -> None:
    exc = await _failure(AddressPolicy(), server.url())
    assert isinstance(exc, aiohttp.ClientConnectorError)
    assert isinstance(exc.os_error, BlockedAddressError)
    assert classify_error(exc) == "blocked_address"
    assert server.hits == []


async def test_loopback_allowed_by_allowlist(server: Server) -> None:
    async with _session(LOOPBACK) as session, session.get(server.url()) as response:
        assert response.status == 200
        assert await response.text() == "ok"
        assert response.request_info.headers["User-Agent"] == "Postback/test"
    assert server.hits == ["/"]


async def test_localhost_name_blocked_without_allowlist(server: Server) -> None:
    exc = await _failure(AddressPolicy(), server.url(host="localhost"))
    # Refused at resolution, which aiohttp reports as a DNS failure.
    assert isinstance(exc, aiohttp.ClientConnectorDNSError)
    assert classify_error(exc) == "blocked_address"
    assert server.hits == []


@pytest.mark.usefixtures("fake_dns")
async def test_name_resolving_to_loopback_blocked(server: Server) -> None:
    exc = await _failure(AddressPolicy(), server.url(host="rebind.example"))
    assert classify_error(exc) == "blocked_address"
    assert server.hits == []


@pytest.mark.usefixtures("fake_dns")
async def test_name_resolving_to_allowed_address_connects(server: Server) -> None:
    async with (
        _session(LOOPBACK) as session,
        session.get(server.url(host="rebind.example")) as response,
    ):
        assert response.status == 200
    assert server.hits == ["/"]


async def test_ipv4_mapped_literal_blocked(server: Server) -> None:
    exc = await _failure(AddressPolicy(), server.url(host="[::ffff:127.0.0.1]"))
    assert classify_error(exc) == "blocked_address"
    assert server.hits == []


async def test_ipv6_loopback_literal_blocked(server: Server) -> None:
    exc = await _failure(AddressPolicy(), server.url(host="[::1]"))
    assert classify_error(exc) == "blocked_address"


async def test_hex_ipv4_host_blocked(server: Server) -> None:
    # Not an IP literal to aiohttp, so it goes to getaddrinfo, which reads it as 127.0.0.1.
    exc = await _failure(AddressPolicy(), server.url(host="0x7f000001"))
    assert classify_error(exc) == "blocked_address"
    assert server.hits == []


@pytest.mark.parametrize("host", ["2130706433", "127.1"])
async def test_legacy_numeric_ipv4_refused_by_aiohttp(server: Server, host: str) -> None:
    exc = await _failure(LOOPBACK, server.url(host=host))
    assert isinstance(exc, aiohttp.InvalidUrlClientError)
    assert server.hits == []


async def test_redirect_not_followed(server: Server) -> None:
    async with (
        _session(LOOPBACK) as session,
        session.get(server.url("/redirect"), allow_redirects=False) as response,
    ):
        assert response.status == 302
        assert response.headers["Location"] == "/"
    assert server.hits == ["/redirect"]


async def test_followed_redirect_still_guarded(server: Server) -> None:
    policy = AddressPolicy([ipaddress.ip_network("127.0.0.1/32")])
    exc = await _failure(policy, server.url("/redirect-elsewhere"))
    assert classify_error(exc) == "blocked_address"
    assert server.hits == ["/redirect-elsewhere"]


async def test_read_capped_stops_at_cap(server: Server) -> None:
    async with _session(LOOPBACK) as session:
        async with session.get(server.url("/big")) as response:
            assert await read_capped(response, 1000) == b"x" * 1000
        async with session.get(server.url("/big")) as response:
            assert await read_capped(response, 0) == b""
        async with session.get(server.url("/big")) as response:
            assert await read_capped(response, 2 * len(BIG_BODY)) == BIG_BODY


async def test_connection_refused_is_connect(server: Server) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    exc = await _failure(LOOPBACK, f"http://127.0.0.1:{closed_port}/")
    assert classify_error(exc) == "connect"


@pytest.mark.usefixtures("fake_dns")
async def test_unknown_name_is_dns() -> None:
    exc = await _failure(AddressPolicy(), "http://nx.example/")
    assert isinstance(exc, aiohttp.ClientConnectorDNSError)
    assert classify_error(exc) == "dns"


async def test_slow_response_is_timeout(server: Server) -> None:
    async with _session(LOOPBACK, total_timeout=0.2) as session:
        with pytest.raises(asyncio.TimeoutError) as info:
            async with session.get(server.url("/slow")):
                pass
    assert classify_error(info.value) == "timeout"
