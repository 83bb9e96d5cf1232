"""One service process at a time: delivery and settlement through their own benchmark modules
(`bench/delivery.py`, `bench/settlement.py`), projection through `bench/projection.py`.
A module that is missing or fails is skipped with a note, never taken down with the run."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from bench import projection as projection_bench
from bench.infra import BenchStack, Place


async def _external(module: str, place: Place, count: int, note: Callable[[str], None]) -> Any:
    try:
        mod = importlib.import_module(f"bench.{module}")
        run = mod.run
    except (ImportError, AttributeError) as e:
        note(f"bench/{module}.py is not available ({e.__class__.__name__}: {e}); skipped")
        return {"skipped": f"bench/{module}.py not available"}
    if not inspect.iscoroutinefunction(run):
        note(f"bench/{module}.py has no `async def run`; skipped")
        return {"skipped": f"bench/{module}.py has no async run()"}
    try:
        result = await run(place.settings(), count)
    except Exception as e:
        note(f"bench/{module}.py failed: {e.__class__.__name__}: {e}; skipped")
        return {"skipped": f"bench/{module}.py failed: {e.__class__.__name__}: {e}"}
    if not isinstance(result, dict):
        return {"skipped": f"bench/{module}.py returned {type(result).__name__}, not a dict"}
    return result


async def delivery(place: Place, messages: int, note: Callable[[str], None]) -> dict[str, Any]:
    result: dict[str, Any] = await _external("delivery", place, messages, note)
    return result


async def settlement(place: Place, calls: int, note: Callable[[str], None]) -> dict[str, Any]:
    result: dict[str, Any] = await _external("settlement", place, calls, note)
    return result


async def projection(stack: BenchStack, calls: int) -> dict[str, Any]:
    return await projection_bench.run(stack, calls)
