"""Writes `schemas/`: the JSON Schema of every event type, an AsyncAPI document of the topics,
and the OpenAPI documents of the HTTP APIs — all generated from the code, never edited."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from postback_libs.events import EVENT_TYPES, TOPICS, envelope_model
from postback_libs.settings import Settings


def _dump(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def event_schemas() -> dict[str, dict[str, Any]]:
    out = {}
    for type_ in sorted(EVENT_TYPES):
        schema = envelope_model(type_).model_json_schema()
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"urn:postback:event:{type_}"
        out[type_] = schema
    return out


def asyncapi() -> dict[str, Any]:
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for topic in TOPICS:
        types = sorted(t for t, m in EVENT_TYPES.items() if m.topic is topic)
        channel_id = topic.name.replace(".", "_")
        channels[channel_id] = {
            "address": topic.name,
            "description": f"{topic.description} Key: {topic.key}. Cleanup: {topic.cleanup}"
            + (", kept forever." if topic.retention_ms < 0 else f", {topic.retention_ms} ms."),
            "messages": {
                t.replace(".", "_"): {"$ref": f"#/components/messages/{t.replace('.', '_')}"}
                for t in types
            },
        }
        operations[f"consume_{channel_id}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{channel_id}"},
        }
        for t in types:
            messages[t.replace(".", "_")] = {
                "name": t,
                "contentType": "application/cloudevents+json",
                "summary": (EVENT_TYPES[t].__doc__ or t).strip().splitlines()[0],
                "payload": {"$ref": f"events/{t}.json"},
            }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Postback events",
            "version": "1.0.0",
            "description": "Every message is a CloudEvents 1.0 structured-mode JSON object. "
            "Compatibility: new optional fields may appear in any event; a changed meaning is "
            "always a new event type. Consumers must ignore fields they do not know.",
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def openapi_documents() -> dict[str, dict[str, Any]]:
    docs = {}
    for service, name in (("ingress", "openapi.json"), ("owner_adapter", "openapi-callbacks.json")):
        module = importlib.import_module(f"postback_{service}.app")
        docs[name] = module.build(Settings()).app.openapi()
    return docs


def render() -> dict[str, str]:
    """Every file of `schemas/`, by relative path."""
    files = {f"events/{t}.json": _dump(s) for t, s in event_schemas().items()}
    files["asyncapi.json"] = _dump(asyncapi())
    files.update({name: _dump(doc) for name, doc in openapi_documents().items()})
    return files


def write(root: Path) -> list[str]:
    """Write `schemas/` under root, removing stale files; returns the paths changed."""
    files = render()
    changed = []
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            changed.append(rel)
    for path in root.rglob("*.json"):
        if str(path.relative_to(root)) not in files:
            path.unlink()
            changed.append(str(path.relative_to(root)))
    return changed
