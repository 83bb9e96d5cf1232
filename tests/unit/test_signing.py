import base64
import time

import pytest
import standardwebhooks.webhooks as stdwh
import svix.webhooks as svixwh

from postback_libs.signing import (
    SignatureError,
    derive_secret,
    generate_api_key,
    generate_secret,
    hash_secret,
    parse_api_key,
    secret_matches,
    sign,
    signature_header,
    verify,
    webhook_headers,
)

pytestmark = pytest.mark.unit

# Known-answer vector published with the Standard Webhooks spec.
KAT_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
KAT_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
KAT_TIMESTAMP = 1614265330
KAT_BODY = b'{"test": 2432232314}'
KAT_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

BODY = b'{"type":"invoice.paid","data":{"id":"inv_1","amount":1200}}'


def _headers(secrets: list[str], ts: int | None = None) -> dict[str, str]:
    return webhook_headers(
        secrets, "msg_1", int(time.time()) if ts is None else ts, BODY, "Postback/test"
    )


def test_known_answer_vector() -> None:
    assert sign(KAT_SECRET, KAT_ID, KAT_TIMESTAMP, KAT_BODY) == KAT_SIGNATURE


def test_secret_without_prefix_signs_the_same() -> None:
    bare = KAT_SECRET.removeprefix("whsec_")
    assert sign(bare, KAT_ID, KAT_TIMESTAMP, KAT_BODY) == KAT_SIGNATURE


def test_known_answer_verifies() -> None:
    headers = {
        "webhook-id": KAT_ID,
        "webhook-timestamp": str(KAT_TIMESTAMP),
        "webhook-signature": KAT_SIGNATURE,
    }
    verify(KAT_SECRET, headers, KAT_BODY, now=KAT_TIMESTAMP)


def test_generated_secret_shape() -> None:
    secret = generate_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    assert generate_secret() != secret


def test_headers_shape() -> None:
    headers = _headers([generate_secret()], ts=1_700_000_000)
    assert headers["webhook-id"] == "msg_1"
    assert headers["webhook-timestamp"] == "1700000000"
    assert headers["webhook-signature"].startswith("v1,")
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == "Postback/test"


@pytest.mark.parametrize("verifier", [stdwh.Webhook, svixwh.Webhook])
def test_third_party_verifiers_accept_our_headers(verifier: type) -> None:
    secret = generate_secret()
    verifier(secret).verify(BODY, _headers([secret]))


@pytest.mark.parametrize("verifier", [stdwh.Webhook, svixwh.Webhook])
def test_third_party_verifiers_accept_derived_secret(verifier: type) -> None:
    secret = derive_secret(b"master-key-for-tests", "endpoint", "acct_1")
    verifier(secret).verify(BODY, _headers([secret]))


@pytest.mark.parametrize("verifier", [stdwh.Webhook, svixwh.Webhook])
def test_rotation_receiver_knows_only_the_new_secret(verifier: type) -> None:
    old, new = generate_secret(), generate_secret()
    headers = _headers([old, new])
    assert len(headers["webhook-signature"].split(" ")) == 2
    verifier(new).verify(BODY, headers)
    verify(new, headers, BODY)
    verify(old, headers, BODY)


@pytest.mark.parametrize(
    "verifier", [stdwh.Webhook, svixwh.Webhook], ids=["standardwebhooks", "svix"]
)
def test_third_party_verifiers_reject_wrong_secret(verifier: type) -> None:
    headers = _headers([generate_secret()])
    with pytest.raises(Exception, match="signature"):
        verifier(generate_secret()).verify(BODY, headers)


def test_duplicate_secrets_sign_once() -> None:
    secret = generate_secret()
    assert len(signature_header([secret, secret], "m", 1, b"{}").split(" ")) == 1


def test_signing_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="at least one"):
        signature_header([], "m", 1, b"{}")


def test_invalid_secret_rejected() -> None:
    with pytest.raises(ValueError, match="base64"):
        sign("whsec_not*base64", "m", 1, b"{}")


def test_tampered_body_rejected() -> None:
    secret = generate_secret()
    headers = _headers([secret])
    with pytest.raises(SignatureError, match="no matching signature"):
        verify(secret, headers, BODY.replace(b"1200", b"9999"))


def test_tampered_id_rejected() -> None:
    secret = generate_secret()
    headers = _headers([secret]) | {"webhook-id": "msg_2"}
    with pytest.raises(SignatureError, match="no matching signature"):
        verify(secret, headers, BODY)


def test_other_signature_versions_ignored() -> None:
    secret = generate_secret()
    headers = _headers([secret])
    headers["webhook-signature"] = headers["webhook-signature"].replace("v1,", "v1a,")
    with pytest.raises(SignatureError, match="no matching signature"):
        verify(secret, headers, BODY)


def test_old_timestamp_rejected() -> None:
    secret = generate_secret()
    now = 1_700_000_000
    headers = _headers([secret], ts=now - 301)
    with pytest.raises(SignatureError, match="too old"):
        verify(secret, headers, BODY, now=now)
    verify(secret, _headers([secret], ts=now - 300), BODY, now=now)


def test_future_timestamp_rejected() -> None:
    secret = generate_secret()
    now = 1_700_000_000
    with pytest.raises(SignatureError, match="too new"):
        verify(secret, _headers([secret], ts=now + 301), BODY, now=now)


def test_tolerance_is_configurable() -> None:
    secret = generate_secret()
    now = 1_700_000_000
    with pytest.raises(SignatureError, match="too old"):
        verify(secret, _headers([secret], ts=now - 61), BODY, now=now, tolerance_seconds=60)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header_rejected(missing: str) -> None:
    secret = generate_secret()
    headers = _headers([secret])
    del headers[missing]
    with pytest.raises(SignatureError, match=f"missing {missing} header"):
        verify(secret, headers, BODY)


def test_non_numeric_timestamp_rejected() -> None:
    secret = generate_secret()
    headers = _headers([secret]) | {"webhook-timestamp": "1700000000.5"}
    with pytest.raises(SignatureError, match="invalid webhook-timestamp"):
        verify(secret, headers, BODY)


def test_header_lookup_ignores_case() -> None:
    secret = generate_secret()
    headers = {k.title(): v for k, v in _headers([secret]).items()}
    assert "Webhook-Signature" in headers
    verify(secret, headers, BODY)


def test_signature_error_is_value_error() -> None:
    assert issubclass(SignatureError, ValueError)


def test_derive_secret_is_deterministic() -> None:
    key = b"master"
    assert derive_secret(key, "endpoint", "acct_1") == derive_secret(key, "endpoint", "acct_1")


def test_derive_secret_differs_per_input() -> None:
    key = b"master"
    derived = {
        derive_secret(key, "endpoint", "acct_1"),
        derive_secret(key, "endpoint", "acct_2"),
        derive_secret(key, "endpoint", "acct_1", version=2),
        derive_secret(key, "api", "acct_1"),
        derive_secret(b"other-master", "endpoint", "acct_1"),
    }
    assert len(derived) == 5


def test_derived_secret_has_spec_length() -> None:
    secret = derive_secret(b"master", "endpoint", "acct_1")
    assert secret.startswith("whsec_")
    assert 24 <= len(base64.b64decode(secret.removeprefix("whsec_"))) <= 64


@pytest.mark.parametrize(
    ("key", "purpose", "version"),
    [(b"", "endpoint", 1), (b"k", "", 1), (b"k", "a:b", 1), (b"k", "endpoint", 0)],
)
def test_derive_secret_rejects_ambiguous_input(key: bytes, purpose: str, version: int) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        derive_secret(key, purpose, "acct_1", version)


def test_api_key_round_trip() -> None:
    raw = generate_api_key("key_01HZX")
    assert raw.startswith("pbk_key_01HZX_")
    parsed = parse_api_key(raw)
    assert parsed is not None
    key_id, secret = parsed
    assert key_id == "key_01HZX"
    assert len(secret) == 43
    stored = hash_secret(secret)
    assert secret_matches(secret, stored)
    assert not secret_matches(secret[:-1] + ("A" if secret[-1] != "A" else "B"), stored)


def test_api_keys_are_unique() -> None:
    assert generate_api_key("k1") != generate_api_key("k1")


@pytest.mark.parametrize(
    "raw",
    ["", "pbk_", "pbk_k1", "sk_k1_" + "a" * 43, "pbk_k1_" + "a" * 42, "pbk__" + "a" * 43],
)
def test_parse_api_key_rejects_malformed(raw: str) -> None:
    assert parse_api_key(raw) is None


def test_generate_api_key_rejects_bad_key_id() -> None:
    with pytest.raises(ValueError, match="key_id"):
        generate_api_key("bad id")


def test_hash_secret_is_sha256_hex() -> None:
    assert hash_secret("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
