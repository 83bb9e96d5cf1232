"""`schemas/` is generated from the code; it must never drift from it."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from postback.schemas import render
from postback_libs.events import EVENT_TYPES, CallRequested, new_event

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def test_schemas_folder_is_up_to_date():
    expected = render()
    stale = [
        rel
        for rel, text in expected.items()
        if not (SCHEMAS / rel).exists() or (SCHEMAS / rel).read_text() != text
    ]
    extra = [
        str(p.relative_to(SCHEMAS))
        for p in SCHEMAS.rglob("*.json")
        if str(p.relative_to(SCHEMAS)) not in expected
    ]
    assert not stale and not extra, (
        f"schemas/ is stale (run `make schemas`): changed {stale}, no longer generated {extra}"
    )


def test_every_event_type_has_a_schema_and_a_channel():
    asyncapi = json.loads((SCHEMAS / "asyncapi.json").read_text())
    names = {m["name"] for m in asyncapi["components"]["messages"].values()}
    assert names == set(EVENT_TYPES)
    for type_ in EVENT_TYPES:
        assert (SCHEMAS / "events" / f"{type_}.json").exists()


def test_a_real_event_validates_against_its_published_schema():
    event = new_event(
        CallRequested(
            request_id="req_1",
            consumer_id="acc_1",
            api="weather",
            webhook_url="https://example.com/hook",
        ),
        source="ingress",
    )
    schema = json.loads((SCHEMAS / "events" / "call.requested.json").read_text())
    jsonschema.validate(json.loads(event.to_bytes()), schema)
    wrong = {**json.loads(event.to_bytes()), "type": "call.routed"}
    try:
        jsonschema.validate(wrong, schema)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("a call.routed envelope passed the call.requested schema")


def test_openapi_documents_the_public_calls():
    doc = json.loads((SCHEMAS / "openapi.json").read_text())
    for path in (
        "/v1/calls",
        "/v1/calls/{request_id}",
        "/internal/call",
        "/api/{mode}/api/{slug}",
        "/v1/accounts",
        "/v1/apis",
    ):
        assert path in doc["paths"], path
    callbacks = json.loads((SCHEMAS / "openapi-callbacks.json").read_text())
    assert "/v1/callbacks/{request_id}" in callbacks["paths"]


def test_the_openapi_document_describes_errors_as_they_are_sent() -> None:
    """Every error is application/problem+json with a stable type; FastAPI's own 422 shape
    (`detail: [{loc, msg}]`) is never sent, so it is never documented."""
    from postback.schemas import openapi_documents

    for name, doc in openapi_documents().items():
        assert "HTTPValidationError" not in json.dumps(doc), name
        for path, operations in doc["paths"].items():
            for method, operation in operations.items():
                for status in ("4XX", "422"):
                    response = operation["responses"].get(status)
                    if response is None:
                        assert status == "422", (name, path, method)
                        continue
                    assert list(response["content"]) == ["application/problem+json"]
        problem = doc["components"]["schemas"]["ProblemDetails"]
        assert {"type", "title", "status"} <= set(problem["required"])
