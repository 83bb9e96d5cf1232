"""Peak RSS and CPU seconds of each process, sampled every half second in a thread of its own
(so sampling goes on whatever the event loop is doing), and read back for any time window."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psutil

MB = 1024 * 1024


@dataclass
class Series:
    label: str
    pid: int
    tree: bool
    # (monotonic time, rss bytes or None, cumulative cpu seconds)
    points: list[tuple[float, int | None, float]] = field(default_factory=list)
    started: float = 0.0


@dataclass
class Window:
    name: str
    start: float
    end: float = 0.0


def _cpu_of(proc: psutil.Process, tree: bool) -> tuple[int | None, float]:
    t = proc.cpu_times()
    cpu = t.user + t.system
    if not tree:
        return proc.memory_info().rss, cpu
    # A server of many processes (PostgreSQL): the leader, its live children and the children it
    # has reaped. RSS is left out: every backend counts the shared buffers again.
    cpu += t.children_user + t.children_system
    for child in proc.children(recursive=True):
        try:
            ct = child.cpu_times()
            cpu += ct.user + ct.system
        except psutil.Error:
            continue
    return None, cpu


# (label, whether to count the process with its children) for a child of the harness, or None to
# leave it out.
Classifier = Callable[[list[str]], tuple[str, bool] | None]


class Sampler:
    def __init__(self, interval: float = 0.5, classify: Classifier | None = None) -> None:
        self.interval = interval
        self.classify = classify
        self._seen: set[int] = set()
        self.series: list[Series] = []
        self.windows: list[Window] = []
        self._procs: dict[int, tuple[Series, psutil.Process]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def track(self, label: str, pid: int | None, *, tree: bool = False) -> None:
        """Sample `pid` under `label` from now on (until it exits or `forget` is called)."""
        if pid is None:
            return
        with self._lock:
            if pid in self._procs:
                return
            try:
                proc = psutil.Process(pid)
                proc.cpu_times()
            except psutil.Error:
                return
            s = Series(label, pid, tree, started=time.monotonic())
            self.series.append(s)
            self._procs[pid] = (s, proc)
        self._sample(s, proc)

    def forget(self, pid: int | None) -> None:
        """Stop sampling a process (its pid may be reused by another later)."""
        with self._lock:
            item = self._procs.pop(pid or -1, None)
        if item is not None:
            self._sample(*item)

    def _sample(self, s: Series, proc: psutil.Process) -> bool:
        try:
            rss, cpu = _cpu_of(proc, s.tree)
        except psutil.Error:
            return False
        s.points.append((time.monotonic(), rss, cpu))
        return True

    def discover(self) -> None:
        """Track every new direct child of the harness that `classify` gives a label: services,
        helpers, the broker, the database and k6 are all started from here."""
        if self.classify is None:
            return
        for child in psutil.Process(os.getpid()).children():
            if child.pid in self._seen:
                continue
            try:
                what = self.classify(child.cmdline())
            except psutil.Error:
                continue
            # An unlabelled child is looked at again next time: caught between fork and exec,
            # it still shows the harness's command line.
            if what is not None:
                self._seen.add(child.pid)
                self.track(what[0], child.pid, tree=what[1])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.discover()
            with self._lock:
                items = list(self._procs.items())
            for pid, (s, proc) in items:
                if not self._sample(s, proc):
                    with self._lock:
                        self._procs.pop(pid, None)

    @contextmanager
    def window(self, name: str) -> Iterator[Window]:
        """Marks a time window; sample the tracked processes at both ends for exact CPU."""
        w = Window(name, time.monotonic())
        self.sample_now()
        try:
            yield w
        finally:
            self.sample_now()
            w.end = time.monotonic()
            self.windows.append(w)

    def sample_now(self) -> None:
        self.discover()
        with self._lock:
            items = list(self._procs.values())
        for s, proc in items:
            self._sample(s, proc)

    def tracked_cpu_seconds(self) -> float:
        """CPU seconds of every process sampled, over the time each was sampled."""
        return sum(s.points[-1][2] - s.points[0][2] for s in self.series if s.points)

    def usage(self, window: Window) -> dict[str, dict[str, Any]]:
        """Per label: CPU seconds and share of a core over the span of the samples that bracket
        the window (windows marked with `window()` sample their own ends, so the span is the
        window), and the peak RSS seen in it (MB). A window shorter than the sampling interval
        is still read: off its neighbouring samples."""
        out: dict[str, dict[str, Any]] = {}
        percent: dict[str, float] = {}
        for s in self.series:
            before = [p for p in s.points if p[0] < window.start]
            after = [p for p in s.points if p[0] >= window.start]
            if not after or (not before and s.started > window.end):
                continue  # gone before the window, or born after it
            # A process born inside the window spent all its CPU in it.
            if before:
                since, base = before[-1][0], before[-1][2]
            elif s.started >= window.start:
                since, base = window.start, 0.0
            else:
                since, base = after[0][0], after[0][2]
            until = next((p for p in after if p[0] >= window.end), after[-1])
            cpu = until[2] - base
            inside = [p for p in after if p[0] <= window.end] or [until]
            rss = [p[1] for p in inside if p[1] is not None]
            entry = out.setdefault(
                s.label, {"cpu_seconds": 0.0, "peak_rss_mb": None, "processes": 0}
            )
            entry["cpu_seconds"] = round(entry["cpu_seconds"] + cpu, 2)
            entry["processes"] += 1
            span = until[0] - since
            percent[s.label] = percent.get(s.label, 0.0) + (100 * cpu / span if span > 0 else 0.0)
            if rss:
                peak = round(max(rss) / MB, 1)
                entry["peak_rss_mb"] = max(entry["peak_rss_mb"] or 0.0, peak)
        for label, entry in out.items():
            entry["cpu_percent_of_one_core"] = round(percent[label], 1)
        return out
