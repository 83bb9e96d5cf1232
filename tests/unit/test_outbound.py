import ipaddress
import socket
import ssl

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_reqrep import ConnectionKey

from postback_libs.outbound import (
    AddressPolicy,
    BlockedAddressError,
    GuardedResolver,
    classify_error,
    is_public_address,
)

pytestmark = pytest.mark.unit

NON_PUBLIC = [
    # IPv4
    "0.0.0.0",
    "0.1.2.3",
    "10.0.0.1",
    "100.64.0.1",
    "100.127.255.254",
    "127.0.0.1",
    "127.255.255.254",
    "169.254.169.254",
    "169.254.0.1",
    "172.16.0.1",
    "172.31.255.255",
    "192.0.0.170",
    "192.0.2.1",
    "192.88.99.1",
    "192.168.1.1",
    "198.18.0.1",
    "198.19.255.255",
    "198.51.100.7",
    "203.0.113.9",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    # IPv6
    "::",
    "::1",
    "fc00::1",
    "fd12:3456::1",
    "fd00:ec2::254",
    "fe80::1",
    "fe80::1%eth0",
    "febf::1",
    "fec0::1",
    "ff02::1",
    "ff0e::1",
    "100::1",
    "2001:db8::1",
    "3fff::1",
    "2001:2::1",
    "2001:10::1",
    "64:ff9b:1::1",
    # IPv6 forms embedding a non-public IPv4 address
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "::ffff:0.0.0.0",
    "::127.0.0.1",
    "::10.0.0.1",
    "64:ff9b::127.0.0.1",
    "64:ff9b::a9fe:a9fe",
    "64:ff9b::192.168.0.1",
    "2002:7f00:1::1",
    "2002:a00:1::1",
    "2002:a9fe:a9fe::1",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "2001:0:7f00:1:0:0:80ff:fffe",  # Teredo, server 127.0.0.1, client 127.0.0.1
]

PUBLIC = [
    "1.1.1.1",
    "8.8.8.8",
    "93.184.215.14",
    "100.63.255.255",
    "100.128.0.0",
    "172.15.255.255",
    "172.32.0.0",
    "169.253.255.255",
    "198.17.255.255",
    "198.20.0.0",
    "223.255.255.255",
    "2606:4700:4700::1111",
    "2a00:1450:4001:80b::200e",
    "2001:4860:4860::8888",
    "::ffff:8.8.8.8",
    "64:ff9b::8.8.8.8",
    "2002:808:808::1",
]


@pytest.mark.parametrize("address", NON_PUBLIC)
def test_non_public_addresses(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


def test_policy_without_allowlist_allows_only_public() -> None:
    policy = AddressPolicy()
    assert policy.allows(ipaddress.ip_address("8.8.8.8"))
    assert not policy.allows(ipaddress.ip_address("127.0.0.1"))
    assert not policy.allows(ipaddress.ip_address("::1"))


def test_policy_allowlist() -> None:
    policy = AddressPolicy([ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("fd00::/8")])
    assert policy.allows(ipaddress.ip_address("127.0.0.1"))
    assert policy.allows(ipaddress.ip_address("127.9.9.9"))
    assert policy.allows(ipaddress.ip_address("fd00::5"))
    assert policy.allows(ipaddress.ip_address("1.1.1.1"))
    assert not policy.allows(ipaddress.ip_address("10.0.0.1"))
    assert not policy.allows(ipaddress.ip_address("::1"))
    assert not policy.allows(ipaddress.ip_address("169.254.169.254"))


def test_policy_allowlist_matches_ipv4_mapped() -> None:
    policy = AddressPolicy([ipaddress.ip_network("127.0.0.0/8")])
    assert policy.allows(ipaddress.ip_address("::ffff:127.0.0.1"))
    assert not policy.allows(ipaddress.ip_address("::ffff:10.0.0.1"))


@pytest.mark.parametrize("host", ["localhost", "", "127.1", "not an ip", "10.0.0.1"])
def test_policy_refuses_non_numeric_or_private_host_strings(host: str) -> None:
    assert not AddressPolicy().allows_host(host)


def test_policy_host_string_with_zone() -> None:
    policy = AddressPolicy([ipaddress.ip_network("fe80::/10")])
    assert policy.allows_host("fe80::1%eth0")
    assert not AddressPolicy().allows_host("fe80::1%eth0")


class _FixedResolver(AbstractResolver):
    def __init__(self, *hosts: str) -> None:
        self.hosts = hosts

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=h,
                port=port,
                family=socket.AF_INET6 if ":" in h else socket.AF_INET,
                proto=0,
                flags=0,
            )
            for h in self.hosts
        ]

    async def close(self) -> None:
        pass


async def test_resolver_drops_refused_addresses() -> None:
    resolver = GuardedResolver(AddressPolicy(), _FixedResolver("10.0.0.1", "8.8.8.8", "::1"))
    results = await resolver.resolve("mixed.example", 443)
    assert [r["host"] for r in results] == ["8.8.8.8"]


async def test_resolver_raises_when_nothing_is_allowed() -> None:
    resolver = GuardedResolver(AddressPolicy(), _FixedResolver("127.0.0.1", "::ffff:10.0.0.1"))
    with pytest.raises(BlockedAddressError, match=r"rebind\.example"):
        await resolver.resolve("rebind.example", 80)


def test_blocked_address_error_is_os_error() -> None:
    err = BlockedAddressError("10.0.0.1")
    assert isinstance(err, OSError)
    assert err.errno is None
    assert "10.0.0.1" in str(err)


def _key() -> ConnectionKey:
    return ConnectionKey("h.example", 443, True, True, None, None, None)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (BlockedAddressError("10.0.0.1"), "blocked_address"),
        (aiohttp.ClientConnectorDNSError(_key(), BlockedAddressError("x")), "blocked_address"),
        (aiohttp.ClientConnectorError(_key(), BlockedAddressError("x")), "blocked_address"),
        (aiohttp.ClientConnectorDNSError(_key(), socket.gaierror(-2, "unknown")), "dns"),
        (socket.gaierror(-2, "Name or service not known"), "dns"),
        (aiohttp.ClientConnectorError(_key(), ConnectionRefusedError(111, "refused")), "connect"),
        (aiohttp.ServerDisconnectedError(), "connect"),
        (ConnectionResetError(104, "reset"), "connect"),
        (
            aiohttp.ClientConnectorCertificateError(
                _key(), ssl.SSLCertVerificationError("bad cert")
            ),
            "tls",
        ),
        (aiohttp.ClientConnectorSSLError(_key(), ssl.SSLError(1, "handshake")), "tls"),
        (ssl.SSLError(1, "handshake"), "tls"),
        (aiohttp.ConnectionTimeoutError("connect timeout"), "timeout"),
        (aiohttp.SocketTimeoutError("read timeout"), "timeout"),
        (TimeoutError(), "timeout"),
        (aiohttp.ClientPayloadError("truncated"), "other"),
        (ValueError("x"), "other"),
    ],
)
def test_classify_error(exc: BaseException, kind: str) -> None:
    assert classify_error(exc) == kind


def test_classify_error_follows_cause() -> None:
    outer = aiohttp.ClientOSError("wrapped")
    outer.__cause__ = BlockedAddressError("10.0.0.1")
    assert classify_error(outer) == "blocked_address"
