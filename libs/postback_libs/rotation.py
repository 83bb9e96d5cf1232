"""Rotating derived signing secrets (decisions 3 and 10), one rule for all three kinds: an
endpoint's secret, a consumer's webhook secret (its calls' own `webhook_url` messages) and an
API's signing secret (forwarded calls).

A rotation bumps the secret's version. The version it replaces keeps signing until the overlap
ends, and every message carries one signature per valid version, so the receiver may switch at
any moment within it. The overlap bounds every older version too: rotating with 0 after a leak
leaves only the new secret, not a version from an earlier rotation still within its own."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from postback_libs.events import CloudEvent, RetiredSecret

MAX_RETIRED = 3  # older versions still signing at once, at most


def rotate(
    version: int, retired: Sequence[RetiredSecret], overlap_seconds: int, now: datetime
) -> tuple[int, list[RetiredSecret]]:
    """The new version and the versions that still sign after a rotation at `now`."""
    until = now + timedelta(seconds=overlap_seconds)
    kept = [
        r.model_copy(update={"valid_until": min(r.valid_until, until)})
        for r in retired
        if min(r.valid_until, until) > now
    ]
    if overlap_seconds > 0:
        kept.append(RetiredSecret(version=version, valid_until=until))
    # Bounded: each signs every message, and rotating again and again within an overlap would
    # grow the signature header past what receivers accept.
    return version + 1, kept[-MAX_RETIRED:]


def valid_versions(version: int, retired: Sequence[RetiredSecret], now: datetime) -> list[int]:
    """The current version first, then rotated-out versions still within their overlap."""
    if not retired:
        return [version]
    return list(dict.fromkeys([version, *(r.version for r in retired if r.valid_until > now)]))


Versions = tuple[str, int, list[RetiredSecret]]  # (subject, current version, retired versions)


class SecretVersions:
    """Which secret versions of many subjects sign now, as their state events say. Built by
    following a compacted topic into memory (`TopicFollower`), in every replica, so each signs
    alike. A subject never rotated is absent and signs with version 1."""

    def __init__(self, read: Callable[[CloudEvent], Versions | None]) -> None:
        self.read = read
        self._rotated: dict[str, tuple[int, list[RetiredSecret]]] = {}

    def apply(self, event: CloudEvent) -> None:
        found = self.read(event)
        if found is None:
            return
        subject, version, retired = found
        known = self._rotated.get(subject)
        if known is not None and known[0] > version:
            return  # an older state, read again
        if version == 1 and not retired:
            self._rotated.pop(subject, None)
        else:
            self._rotated[subject] = (version, retired)

    def valid(self, subject: str, now: datetime) -> list[int]:
        version, retired = self._rotated.get(subject, (1, []))
        return valid_versions(version, retired, now)


def _versions(state: dict[str, Any], id_field: str, version: str, retired: str) -> Versions:
    return (
        state[id_field],
        state.get(version, 1),
        [RetiredSecret.model_validate(r) for r in state.get(retired, ())],
    )


def webhook_secret_versions(event: CloudEvent) -> Versions | None:
    """A consumer's webhook secret versions, from an event of `postback.accounts`."""
    account = event.data.get("account")
    if account is None:
        return None
    return _versions(account, "account_id", "webhook_secret_version", "retired_webhook_secrets")


def signing_secret_versions(event: CloudEvent) -> Versions | None:
    """An API's signing secret versions, from an event of `postback.catalog`."""
    api = event.data.get("api")
    if api is None:
        return None
    return _versions(api, "api_id", "signing_secret_version", "retired_signing_secrets")
