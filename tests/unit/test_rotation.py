"""The one rotation rule for every derived signing secret."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from postback_libs.events import CloudEvent, RetiredSecret
from postback_libs.rotation import (
    SecretVersions,
    rotate,
    signing_secret_versions,
    valid_versions,
    webhook_secret_versions,
)

pytestmark = pytest.mark.unit
NOW = datetime(2026, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)


def test_a_rotation_keeps_the_replaced_version_for_the_overlap():
    version, retired = rotate(1, [], 3600, NOW)
    assert (version, retired) == (2, [RetiredSecret(version=1, valid_until=NOW + HOUR)])
    assert valid_versions(version, retired, NOW) == [2, 1]
    assert valid_versions(version, retired, NOW + 2 * HOUR) == [2]


def test_a_rotation_without_overlap_revokes_every_older_version():
    _, retired = rotate(2, [RetiredSecret(version=1, valid_until=NOW + 5 * HOUR)], 0, NOW)
    assert retired == []


def test_the_overlap_bounds_older_versions_and_drops_the_expired():
    older = [
        RetiredSecret(version=1, valid_until=NOW - HOUR),
        RetiredSecret(version=2, valid_until=NOW + 5 * HOUR),
    ]
    version, retired = rotate(3, older, 3600, NOW)
    assert version == 4
    assert retired == [
        RetiredSecret(version=2, valid_until=NOW + HOUR),
        RetiredSecret(version=3, valid_until=NOW + HOUR),
    ]


def envelope(type_: str, data: dict[str, object]) -> CloudEvent:
    return CloudEvent(id="e", source="t", type=type_, subject="s", time=NOW, data=data)


def account_event(version: int, retired: list[RetiredSecret]) -> CloudEvent:
    account = {
        "account_id": "acc_1",
        "webhook_secret_version": version,
        "retired_webhook_secrets": [r.model_dump(mode="json") for r in retired],
    }
    return envelope("account.webhook_secret_rotated", {"account": account})


def test_secret_versions_follow_the_newest_state_of_each_subject():
    book = SecretVersions(webhook_secret_versions)
    assert book.valid("acc_1", NOW) == [1]  # never rotated
    book.apply(account_event(3, [RetiredSecret(version=2, valid_until=NOW + HOUR)]))
    assert book.valid("acc_1", NOW) == [3, 2]
    book.apply(account_event(2, []))  # an older state read again changes nothing
    assert book.valid("acc_1", NOW) == [3, 2]
    assert book.valid("acc_2", NOW) == [1]


def test_an_api_state_without_rotation_fields_signs_with_version_1():
    event = envelope("api.registered", {"api": {"api_id": "api_1"}})
    assert signing_secret_versions(event) == ("api_1", 1, [])
    other = envelope("call.requested", {"request_id": "r"})
    assert signing_secret_versions(other) is None


def test_at_most_a_few_older_versions_sign_at_once():
    version, retired = 1, []
    for _ in range(10):  # rotating again and again within the overlap
        version, retired = rotate(version, retired, 3600, NOW)
    assert version == 11
    assert [r.version for r in retired] == [8, 9, 10]
    assert len(valid_versions(version, retired, NOW)) == 4
