"""The run's report: JSON (everything), Markdown (the tables, printed too) and a PNG plot of
latency against offered load, side by side under one timestamp."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.figures import targets
from bench.markdown import markdown
from bench.plot import plot


def write(r: dict[str, Any], out: Path, stamp: str) -> tuple[Path, Path, Path | None]:
    out.mkdir(parents=True, exist_ok=True)
    png: Path | None = out / f"{stamp}.png"
    assert png is not None
    try:
        if not plot(r, png):
            png = None
    except Exception as e:  # a plot must never cost the figures
        r.setdefault("notes", []).append(f"plot failed: {e.__class__.__name__}: {e}")
        png = None
    r["targets"] = targets(r)
    json_path = out / f"{stamp}.json"
    json_path.write_text(json.dumps(r, indent=2, default=str))
    md_path = out / f"{stamp}.md"
    md_path.write_text(markdown(r, png.name if png else None))
    return json_path, md_path, png
