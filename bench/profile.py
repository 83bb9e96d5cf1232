"""Where a service process spends its CPU under load: py-spy samples its stacks from outside
(no change to the service), and the collapsed stacks are folded into the functions that cost the
most, by their own time and by the time spent under them.

py-spy is installed by hand (`uv pip install py-spy`), not by the project: without it the
profile is skipped with a note."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

RATE_HZ = 100
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
# Frames that every sample of an asyncio service passes through: they say nothing about cost.
_PLUMBING = (
    "asyncio/",
    "<module>",
    "runpy",
    "threading.py",
    "uvloop/",
    "typer/",
    "click/",
    "postback/cli.py",
)


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _short(path: str) -> str:
    for marker in ("site-packages/", "lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return path.removeprefix(".11/").removeprefix(".12/").removeprefix(".13/")


def _frame(raw: str) -> str:
    m = _FRAME.match(raw.strip())
    if not m:
        return raw.strip()
    return f"{_short(m['file'])}:{m['func']}"


def _package(frame: str) -> str:
    path = frame.split(":", 1)[0]
    head = path.split("/", 1)[0]
    return head.removesuffix(".py") if "/" in path or path.endswith(".py") else path


def fold(collapsed: str, top: int = 25) -> dict[str, Any]:
    """The functions with the most samples, on their own (self) and with their callees
    (inclusive), as shares of all samples."""
    own: Counter[str] = Counter()
    under: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = [_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        own[frames[-1]] += count
        for f in set(frames):
            under[f] += count
    if not total:
        return {"samples": 0, "self": [], "inclusive": []}

    def rows(counter: Counter[str], skip_plumbing: bool) -> list[dict[str, Any]]:
        out = []
        for name, n in counter.most_common():
            if skip_plumbing and (any(p in name for p in _PLUMBING) or n == total):
                continue
            out.append({"function": name, "share": round(n / total, 3), "samples": n})
            if len(out) == top:
                break
        return out

    packages: Counter[str] = Counter()
    for name, n in own.items():
        packages[_package(name)] += n
    return {
        "samples": total,
        "cpu_seconds_sampled": round(total / RATE_HZ, 1),
        "self": rows(own, skip_plumbing=False)[:15],
        "inclusive": rows(under, skip_plumbing=True),
        "self_by_package": {k: round(n / total, 3) for k, n in packages.most_common(12)},
    }


async def record(pid: int, seconds: float, out: Path) -> dict[str, Any]:
    """Sample `pid` for `seconds` into `out` (collapsed stacks) and fold it."""
    binary = py_spy()
    if binary is None:
        return {"skipped": "py-spy is not installed (uv pip install py-spy)"}
    proc = await asyncio.create_subprocess_exec(
        binary,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(RATE_HZ),
        "--format",
        "raw",
        # Only the thread holding the GIL: the CPU the service's Python spends, not its idle
        # worker threads waiting on a condition.
        "--gil",
        "--output",
        str(out),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return {"skipped": "py-spy did not finish in time"}
    collapsed = await asyncio.to_thread(lambda: out.read_text() if out.exists() else None)
    if proc.returncode != 0 or collapsed is None:
        return {"skipped": f"py-spy failed: {output.decode(errors='replace')[-500:]}"}
    return {"file": out.name, **fold(collapsed)}
