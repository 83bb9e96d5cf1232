"""Rotating the secrets Postback signs with, through every service over the real broker and
database: a consumer's webhook secret (its calls' own webhook_url messages) and an API's signing
secret (forwarded calls). During the overlap both secrets sign; an overlap of 0 revokes at once."""

from __future__ import annotations

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from postback_ingress.app import build as ingress
from tests.helpers import (
    EVERY_SERVICE,
    OPERATOR,
    TopicReader,
    bearer,
    client,
    create_account,
    eventually,
    owner_server,
    receiver,
    running,
)


async def caught_up(services) -> None:
    """Every service has read every rotation made so far."""
    for s in services:
        for follower in s.followers:
            assert await follower.caught_up(timeout=10)


def verifies(secret: str, body: bytes, headers: dict[str, str]) -> bool:
    try:
        Webhook(secret).verify(body, headers)  # a verifier nobody here wrote
    except WebhookVerificationError:
        return False
    return True


async def test_rotated_secrets_sign_beside_the_old_ones_until_revoked(settings):
    async with (
        owner_server() as owner_http,
        receiver() as hooks,
        TopicReader(settings, "postback.accounts") as accounts_topic,
        TopicReader(settings, "postback.catalog") as catalog_topic,
        running(settings, *EVERY_SERVICE) as svcs,
    ):
        http = client(svcs[0])
        owner = await create_account(http, ["owner"], "owner")
        consumer = await create_account(http, ["consumer"], "consumer")
        r = await http.post(
            "/v1/apis",
            headers=bearer(owner),
            json={"slug": "rot", "name": "rot", "endpoint": f"{owner_http.url}/sync"},
        )
        assert r.status_code == 201, r.text
        api_secrets = [r.json()["signing_secret"]]
        webhook_secrets = [consumer["webhook_secret"]]

        async def rotate(overlap: int | None = None) -> None:
            body = {} if overlap is None else {"overlap_seconds": overlap}
            r = await http.post(
                "/v1/accounts/me/webhook-secret/rotate", headers=bearer(consumer), json=body
            )
            assert r.status_code == 200, r.text
            rotated = r.json()
            assert rotated["webhook_secret_version"] == len(webhook_secrets) + 1
            assert (rotated["previous_secret_valid_until"] is None) == (overlap == 0)
            webhook_secrets.append(rotated["webhook_secret"])
            r = await http.post(
                "/v1/apis/rot/signing-secret/rotate", headers=bearer(owner), json=body
            )
            assert r.status_code == 200, r.text
            assert r.json()["signing_secret_version"] == len(api_secrets) + 1
            api_secrets.append(r.json()["signing_secret"])
            await caught_up(svcs)

        async def call() -> tuple[tuple[dict[str, str], bytes], tuple[dict[str, str], bytes]]:
            """One call; the webhook it got and the request its owner got."""
            seen = len(hooks.received), len(owner_http.received)
            r = await http.post(
                "/v1/calls",
                headers=bearer(consumer),
                json={"api": "rot", "params": {"q": 1}, "webhook_url": f"{hooks.url}/hook"},
            )
            assert r.status_code == 202, r.text
            await eventually(lambda: len(hooks.received) > seen[0], timeout=30, what="webhook")
            [(_, hook_headers, hook_body)] = hooks.received[seen[0] :]
            [(_, owner_headers, owner_body)] = owner_http.received[seen[1] :]
            return (hook_headers, hook_body), (owner_headers, owner_body)

        await rotate()
        (hook_headers, hook_body), (owner_headers, owner_body) = await call()
        # Both secrets sign during the overlap: either side may switch at any moment.
        assert len(hook_headers["webhook-signature"].split()) == 2
        assert all(verifies(s, hook_body, hook_headers) for s in webhook_secrets)
        assert len(owner_headers["webhook-signature"].split()) == 2
        assert all(verifies(s, owner_body, owner_headers) for s in api_secrets)

        # A leaked secret: rotated with no overlap, no older secret signs any more.
        await rotate(overlap=0)
        (hook_headers, hook_body), (owner_headers, owner_body) = await call()
        assert [verifies(s, hook_body, hook_headers) for s in webhook_secrets] == [
            False,
            False,
            True,
        ]
        assert [verifies(s, owner_body, owner_headers) for s in api_secrets] == [
            False,
            False,
            True,
        ]
        # The topics say which versions sign, never a secret.
        await eventually(
            lambda: len(accounts_topic.of_type("account.webhook_secret_rotated")) == 2,
            what="rotation events",
        )
        await eventually(
            lambda: len(catalog_topic.of_type("api.signing_secret_rotated")) == 2,
            what="API rotation events",
        )
        raw = b"".join(r.value for r in accounts_topic.raw + catalog_topic.raw)
        assert not any(s.encode() in raw for s in webhook_secrets + api_secrets)


async def test_only_the_owner_rotates_an_apis_signing_secret(settings):
    async with running(settings, ingress) as (svc,):
        http = client(svc)
        owner = await create_account(http, ["owner"], "owner")
        other = await create_account(http, ["owner", "consumer"], "other")
        r = await http.post(
            "/v1/apis",
            headers=bearer(owner),
            json={"slug": "mine", "name": "mine", "endpoint": "https://o.example/x"},
        )
        assert r.status_code == 201, r.text
        r = await http.post("/v1/apis/mine/signing-secret/rotate", headers=bearer(other))
        assert r.status_code == 403
        assert r.json()["type"] == "urn:postback:problem:not-api-owner"
        r = await http.post("/v1/apis/mine/signing-secret/rotate", headers=OPERATOR)
        assert r.status_code == 401
        for bad in ({"overlap_seconds": -1}, {"overlap_seconds": 8 * 86400}, {"overlap": 5}):
            r = await http.post(
                "/v1/accounts/me/webhook-secret/rotate", headers=bearer(other), json=bad
            )
            assert r.status_code == 422, bad
            assert r.headers["content-type"] == "application/problem+json"
        state = (await http.get("/v1/apis/mine", headers=bearer(owner))).json()
        assert state["signing_secret_version"] == 1
        public = (await http.get("/v1/apis/mine")).json()
        assert "signing_secret_version" not in public  # when an owner rotated is its own

        # A leaked previous API key, still honoured for its overlap, gets no new secret.
        r = await http.post("/v1/accounts/me/keys/rotate", headers=bearer(owner))
        assert r.status_code == 200, r.text
        for url in ("/v1/apis/mine/signing-secret/rotate", "/v1/accounts/me/webhook-secret/rotate"):
            r = await http.post(url, headers=bearer(owner))
            assert r.status_code == 403, (url, r.text)
            assert r.json()["type"] == "urn:postback:problem:current-key-required"
