"""Text every part of the system can store and pass on: UTF-8, JSON, PostgreSQL's text and
jsonb. PostgreSQL refuses NUL in both; a lone surrogate (which JSON can spell, `"\\ud800"`) is
not UTF-8; and JSON nested deeper than a few hundred levels stops parsers downstream. What a
client sends is refused for these (`unstorable`); what a receiver answers is recorded with
them replaced (`recordable`)."""

from __future__ import annotations

from typing import Any

# Deeper JSON than this is refused from clients and carried as text from owners.
MAX_JSON_DEPTH = 64


def recordable(text: str) -> str:
    """`text` as JSON and PostgreSQL take it: bytes that were not UTF-8 (which the HTTP parser
    keeps as lone surrogates) and NULs become U+FFFD."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that stands for no byte: each becomes U+FFFD
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace").replace("\x00", "\ufffd")


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "holds a NUL character"
    try:
        text.encode()
    except UnicodeEncodeError:
        return "holds a lone surrogate (not UTF-8)"
    return None


def unstorable(value: Any) -> str | None:
    """Why a JSON-like value (strings, numbers, lists, dicts) could not be stored and passed on,
    or None: a string or key with a NUL or a lone surrogate, or nesting past MAX_JSON_DEPTH."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            problem = _text_problem(item)
            if problem is not None:
                return f"a string {problem}"
        elif isinstance(item, dict | list | tuple):
            if depth >= MAX_JSON_DEPTH:
                return f"nested deeper than {MAX_JSON_DEPTH} levels"
            if isinstance(item, dict):
                stack.extend((k, depth) for k in item)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)
    return None
