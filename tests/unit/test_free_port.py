"""Ports for servers the stack and the tests start: free, and never a client's source port."""

from __future__ import annotations

import socket

import pytest

from postback.embedded import _ephemeral_low, free_port

pytestmark = pytest.mark.unit


def test_a_block_of_free_ports_lies_below_the_range_clients_connect_from() -> None:
    base = free_port(6)
    assert base >= 10_000 and base + 6 <= _ephemeral_low()
    socks = [socket.socket() for _ in range(6)]
    try:
        for i, s in enumerate(socks):
            s.bind(("127.0.0.1", base + i))  # raises if any of them was taken
    finally:
        for s in socks:
            s.close()
