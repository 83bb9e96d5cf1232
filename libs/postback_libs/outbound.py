"""Outbound HTTP to customer-chosen URLs that cannot reach Postback's own network (SSRF guard).

Webhook endpoints and owner APIs are URLs customers type in, so a request to one must never
reach loopback, the private network or a cloud metadata service. `guarded_session` checks the
address at the two places that see exactly what will be connected to:

* `GuardedResolver` filters what DNS returns. aiohttp connects only to the addresses its
  resolver returned, so the check is pinned to the connection: a name cannot resolve to a
  public address for the check and to a private one for the connect (DNS rebinding).
* the connector's socket factory checks each address just before the socket connects. This
  catches IP-literal URLs such as `http://127.0.0.1/` or `http://[::ffff:127.0.0.1]/`, which
  aiohttp never hands to the resolver.

Requests must not set `proxy=`: through a proxy the guard would only see the proxy's address.
"""

from __future__ import annotations

import ipaddress
import math
import socket
import ssl
from collections.abc import Callable, Iterable
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
ErrorKind = Literal["dns", "connect", "tls", "timeout", "blocked_address", "other"]

# Socket address info as aiohttp passes it to a socket factory: (family, type, proto,
# canonname, sockaddr).
_AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

_IPV4_NON_PUBLIC = tuple(
    _V4(n)
    for n in (
        "0.0.0.0/8",  # "this network"; 0.0.0.0 reaches the local host on Linux
        "10.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, includes the 169.254.169.254 metadata service
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation
        "192.88.99.0/24",  # deprecated 6to4 relay anycast
        "192.168.0.0/16",
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation
        "203.0.113.0/24",  # documentation
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, includes broadcast 255.255.255.255
    )
)

# Only 2000::/3 is allocated as global unicast; everything outside it (loopback, ULA fc00::/7,
# link-local fe80::/10, site-local fec0::/10, multicast, IPv4-compatible ::/96, discard 100::/64,
# local NAT64 64:ff9b:1::/48, ...) is refused wholesale, after the embedded-IPv4 forms below.
_IPV6_GLOBAL_UNICAST = _V6("2000::/3")
_IPV6_NON_PUBLIC = tuple(
    _V6(n)
    for n in (
        # IETF protocol assignments: Teredo, benchmarking, ORCHID and anycast services.
        # None is a webhook endpoint, and Teredo could tunnel to any IPv4 address.
        "2001::/23",
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
    )
)
_IPV6_METADATA = ipaddress.IPv6Address("fd00:ec2::254")  # AWS metadata service over IPv6
_NAT64 = _V6("64:ff9b::/96")
_SIXTOFOUR = _V6("2002::/16")


def is_public_address(ip: IPAddress) -> bool:
    """Whether `ip` is a globally routable unicast address, safe to send a request to.

    IPv6 forms that carry an IPv4 address (mapped ::ffff:a.b.c.d, NAT64 64:ff9b::/96, 6to4
    2002::/16) are judged by the IPv4 address inside, since that is where packets end up.
    """
    if isinstance(ip, ipaddress.IPv4Address):
        return not any(ip in net for net in _IPV4_NON_PUBLIC)
    if ip == _IPV6_METADATA:
        return False
    if ip.ipv4_mapped is not None:
        return is_public_address(ip.ipv4_mapped)
    if ip in _NAT64:
        return is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None and not is_public_address(ip.sixtofour):
        return False
    if ip not in _IPV6_GLOBAL_UNICAST:
        return False
    return not any(ip in net for net in _IPV6_NON_PUBLIC)


class AddressPolicy:
    """Which addresses outbound requests may reach: public ones, plus an operator allowlist.

    The allowlist exists for deployments whose receivers live on a private network, and for
    tests that serve on 127.0.0.1. An IPv4-mapped IPv6 address matches IPv4 allowlist entries,
    since it reaches the same host.
    """

    def __init__(self, allowed: Iterable[IPNetwork] = ()) -> None:
        self._allowed = tuple(allowed)

    @property
    def allowed(self) -> tuple[IPNetwork, ...]:
        return self._allowed

    def allows(self, ip: IPAddress) -> bool:
        if is_public_address(ip):
            return True
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        return any(c in net for net in self._allowed for c in candidates)

    def refuses_host(self, host: str) -> bool:
        """Whether `host` is a literal IP address (IPv6 with or without brackets) this policy
        refuses. Names pass: they are checked on the address they resolve to at each request;
        and are not parsed as addresses, so the usual case costs no exception."""
        host = host.strip("[]")
        if not host or not (host[0].isdigit() or ":" in host):
            return False
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return not self.allows(ip)

    def allows_host(self, host: str) -> bool:
        """`allows` for a numeric host string as sockets report it; anything else is refused."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return self.allows(ip)


class BlockedAddressError(OSError):
    """The destination resolved only to addresses the `AddressPolicy` refuses.

    An OSError so that aiohttp wraps it like any other failure to connect (in a
    ClientConnectorError or ClientConnectorDNSError) instead of letting it escape raw;
    `classify_error` looks through that wrapping.
    """

    def __init__(self, host: str) -> None:
        # errno None: no system call failed, so no errno would be truthful.
        super().__init__(None, f"{host} is not a permitted destination (non-public address)")
        self.host = host

    def __str__(self) -> str:
        return str(self.strerror)


class GuardedResolver(AbstractResolver):
    """A resolver that returns only the addresses `policy` allows."""

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner if inner is not None else aiohttp.DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if self._policy.allows_host(r["host"])]
        if results and not allowed:
            raise BlockedAddressError(host)
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def _guarded_socket_factory(policy: AddressPolicy) -> Callable[[_AddrInfo], socket.socket]:
    def create(addr_info: _AddrInfo) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        host = str(sockaddr[0])
        if not policy.allows_host(host):
            raise BlockedAddressError(host)
        return socket.socket(family=family, type=type_, proto=proto)

    return create


def guarded_session(
    policy: AddressPolicy,
    *,
    connect_timeout: float,
    total_timeout: float | None,
    limit: int = 100,
    user_agent: str,
) -> aiohttp.ClientSession:
    """A ClientSession whose every connection passes `policy`; call inside the event loop.

    aiohttp has no session-wide switch for redirects, so callers pass `allow_redirects=False`
    on each request: a webhook receiver answering 3xx has not accepted the delivery. Should a
    caller forget, each redirect hop still goes through the same guarded connector.

    `connect_timeout` bounds each TCP/TLS connect attempt; `total_timeout` the whole request
    including DNS, waiting for a pooled connection and reading the response (None: each
    request sets its own). Cookies are
    never stored, so nothing one endpoint sets is sent back to it later.
    """
    connector = aiohttp.TCPConnector(
        limit=limit,
        resolver=GuardedResolver(policy),
        socket_factory=_guarded_socket_factory(policy),
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=total_timeout, sock_connect=connect_timeout),
        headers={"User-Agent": user_agent},
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )


async def read_capped(response: aiohttp.ClientResponse, cap_bytes: int) -> bytes:
    """Up to `cap_bytes` of the (decompressed) body; the rest is never read into memory.

    A truncated body leaves the connection unfinished, so aiohttp closes it on release
    instead of returning it to the pool.
    """
    if cap_bytes < 0:
        raise ValueError("cap_bytes must not be negative")
    chunks: list[bytes] = []
    remaining = cap_bytes
    while remaining > 0:
        chunk = await response.content.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _is_blocked(exc: BaseException) -> bool:
    # aiohttp wraps the resolver's and the socket factory's exceptions, sometimes twice.
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, BlockedAddressError):
            return True
        if isinstance(current, aiohttp.ClientConnectorError):
            pending.append(current.os_error)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return False


# What each kind of failure means, for people who must not see the address it concerned.
FAILURES: dict[str, str] = {
    "blocked_address": "the address is not one Postback may reach",
    "tls": "the TLS handshake failed",
    "dns": "the host name did not resolve",
    "timeout": "no answer in time",
    "connect": "the connection failed or was closed",
    "other": "the request failed",
}


def describe_failure(exc: BaseException) -> str:
    """`kind: meaning`, without the exception's text: that names hosts, ports and addresses."""
    kind = classify_error(exc)
    return f"{kind}: {FAILURES[kind]}"


def classify_error(exc: BaseException) -> ErrorKind:
    """A coarse, stable label for a failed outbound request, for attempt records and metrics."""
    if _is_blocked(exc):
        return "blocked_address"
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError | aiohttp.ServerFingerprintMismatch):
        return "tls"
    if isinstance(exc, aiohttp.ClientConnectorDNSError | socket.gaierror):
        return "dns"
    # Before the connect check: TimeoutError is an OSError, and asyncio.TimeoutError and
    # aiohttp's ServerTimeoutError are both TimeoutErrors.
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientOSError | aiohttp.ServerDisconnectedError | ConnectionError):
        return "connect"
    return "other"


# The longest `Retry-After` honoured: a receiver may not park a request for longer.
MAX_RETRY_AFTER = 24 * 3600.0


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """`Retry-After` as seconds (either form), bounded; None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (parsedate_to_datetime(value) - now).total_seconds()
        except (TypeError, ValueError):
            return None
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)
