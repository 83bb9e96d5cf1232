"""A window's CPU is read off the samples around it: the share of a core over the time those
samples cover, per process label."""

from __future__ import annotations

import pytest

from bench.resources import Sampler, Series, Window

pytestmark = pytest.mark.unit


def sampler(*series: Series) -> Sampler:
    s = Sampler()
    s.series.extend(series)
    return s


def test_a_window_between_samples_is_read_over_the_span_its_samples_cover() -> None:
    # Half a core throughout, sampled every 0.5 s; the window starts and ends between samples.
    points = [(t / 2, None, t / 4) for t in range(0, 21)]
    broker = Series("broker", pid=1, tree=False, points=points, started=0.0)
    use = sampler(broker).usage(Window("fifth", start=2.2, end=4.3))
    # CPU from the sample at 2.0 s to the one at 4.5 s: 1.25 s of CPU over 2.5 s.
    assert use["broker"]["cpu_seconds"] == 1.25
    assert use["broker"]["cpu_percent_of_one_core"] == 50.0


def test_a_window_shorter_than_the_sampling_interval_is_read_off_its_neighbours() -> None:
    # A whole core until 3 s, idle after; the window holds no sample of its own.
    points = [(0.0, 5 * 2**20, 0.0), (2.0, 6 * 2**20, 2.0), (4.0, 7 * 2**20, 3.0)]
    routing = Series("routing", pid=5, tree=False, points=points, started=-1.0)
    use = sampler(routing).usage(Window("last fifth", start=2.5, end=3.0))
    assert use["routing"]["cpu_seconds"] == 1.0
    assert use["routing"]["cpu_percent_of_one_core"] == 50.0
    assert use["routing"]["peak_rss_mb"] == 7.0


def test_a_process_gone_before_the_window_or_born_after_it_is_left_out() -> None:
    gone = Series("k6", pid=6, tree=False, points=[(0.0, None, 0.0), (1.0, None, 1.0)])
    late = Series("helper", pid=7, tree=False, points=[(9.0, None, 0.5)], started=8.5)
    assert sampler(gone, late).usage(Window("phase", start=2.0, end=4.0)) == {}


def test_a_process_born_inside_the_window_spent_all_its_cpu_in_it() -> None:
    child = Series("k6", pid=2, tree=False, points=[(6.0, 10 * 2**20, 1.0)], started=6.0)
    use = sampler(child).usage(Window("phase", start=5.0, end=7.0))
    assert use["k6"]["cpu_seconds"] == 1.0
    assert use["k6"]["cpu_percent_of_one_core"] == 100.0  # 1 s of CPU in the 1 s since 5.0
    assert use["k6"]["peak_rss_mb"] == 10.0


def test_the_processes_of_one_label_add_up() -> None:
    a = Series(
        "ingress", pid=3, tree=False, points=[(0.0, None, 0.0), (2.0, None, 0.5)], started=-1.0
    )
    b = Series(
        "ingress", pid=4, tree=False, points=[(0.0, None, 1.0), (2.0, None, 2.0)], started=-1.0
    )
    use = sampler(a, b).usage(Window("phase", start=0.0, end=2.0))
    assert use["ingress"]["processes"] == 2
    assert use["ingress"]["cpu_seconds"] == 1.5
    assert use["ingress"]["cpu_percent_of_one_core"] == 75.0
