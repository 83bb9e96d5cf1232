"""The addresses callers name for Postback to reach (a call's `webhook_url`, an endpoint's URL,
an API's upstreams), refused when they are written if no attempt could ever reach them."""

from __future__ import annotations

from urllib.parse import urlsplit

from postback_libs.http import Problem
from postback_libs.outbound import AddressPolicy


def check_host(host: str, policy: AddressPolicy) -> None:
    """Refuse an IP-literal host the guard would refuse at every attempt anyway. A name passes:
    what it resolves to is checked at each attempt."""
    if policy.refuses_host(host):
        raise Problem(422, "url-not-allowed", "URL not allowed", f"{host} is not a public address")


def check_url(url: str, policy: AddressPolicy) -> None:
    check_host(urlsplit(url).hostname or "", policy)
