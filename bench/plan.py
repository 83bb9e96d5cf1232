"""How much each mode measures: counts and durations, all bounded."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    mode: str
    # 1. ingress accept, and the bare endpoint at the same offered rates
    ingress_rates: tuple[int, ...]
    ingress_seconds: float
    saturation_vus: int
    # 6. baselines
    kafka_messages: int
    hop_messages: int  # at 50/s
    pg_commit_rows: int
    pg_batch_rows: int
    http_requests: int
    # 2. end to end
    warmup_calls: int
    latency_rate: int
    latency_seconds: float
    # The latency phase's length when the capacity measured first is below its rate: it cannot
    # keep up, and every extra second of overload is a backlog to wait for.
    overload_seconds: float
    # How long a phase waits for its webhooks once the load stops (webhooks still coming).
    drain_timeout: float
    ramp_rates: tuple[int, ...]
    ramp_seconds: float
    # Below the latency phase's rate, on a stack of their own, lowest first: how far up the
    # latency target holds (each step ramp_seconds long).
    light_rates: tuple[int, ...]
    sustained_seconds: float  # 0: the best ramp step stands as the sustained figure
    # When 200/s did not keep up: steps of x1.3 above the rate found to keep up.
    climb_steps: int
    capacity_rate: int
    capacity_seconds: float
    # 8. growth: instances of the busiest service; extra instances on a fresh stack each
    growth_instances: tuple[int, ...]
    growth_fresh_stack: bool
    # profile of the busiest service (0: none)
    profile_seconds: float
    # 3-5. one process of each
    delivery_messages: int
    settlement_calls: int
    projection_calls: int


FULL = Plan(
    mode="full",
    ingress_rates=(100, 250, 500, 1000),
    ingress_seconds=8,
    saturation_vus=64,
    kafka_messages=100_000,
    hop_messages=250,
    pg_commit_rows=10_000,
    pg_batch_rows=100_000,
    http_requests=20_000,
    warmup_calls=40,
    latency_rate=200,
    latency_seconds=60,
    overload_seconds=15,
    drain_timeout=180,
    ramp_rates=(300, 400, 500, 650, 800),
    ramp_seconds=10,
    light_rates=(25, 50, 100, 150),
    sustained_seconds=60,
    climb_steps=3,
    capacity_rate=200,
    capacity_seconds=10,
    growth_instances=(1, 2, 4),
    growth_fresh_stack=True,
    profile_seconds=20,
    delivery_messages=5_000,
    settlement_calls=10_000,
    # 1,000,000 events (7 a call): the rebuild the targets name, applied live first.
    projection_calls=142_858,
)

QUICK = Plan(
    mode="quick",
    ingress_rates=(300,),
    ingress_seconds=3,
    saturation_vus=64,
    kafka_messages=20_000,
    hop_messages=100,
    pg_commit_rows=2_000,
    pg_batch_rows=20_000,
    http_requests=5_000,
    warmup_calls=16,
    latency_rate=200,
    latency_seconds=8,
    overload_seconds=4,
    drain_timeout=60,
    ramp_rates=(300,),
    ramp_seconds=8,
    light_rates=(),
    sustained_seconds=0,
    climb_steps=0,
    capacity_rate=150,
    capacity_seconds=2,
    growth_instances=(1, 2),
    growth_fresh_stack=False,
    profile_seconds=3,
    delivery_messages=500,
    settlement_calls=1_000,
    # 28,000 events: a replay of ~3 s at ~8,000 events/s; with fewer it ends before it is timed.
    projection_calls=4_000,
)

# For the harness's own test: every section runs, on counts too small to mean anything.
TINY = Plan(
    mode="tiny",
    ingress_rates=(50,),
    ingress_seconds=1,
    saturation_vus=8,
    kafka_messages=1_000,
    hop_messages=20,
    pg_commit_rows=200,
    pg_batch_rows=1_000,
    http_requests=300,
    warmup_calls=4,
    latency_rate=20,
    latency_seconds=2,
    overload_seconds=2,
    drain_timeout=60,
    ramp_rates=(),
    ramp_seconds=2,
    light_rates=(10,),
    sustained_seconds=0,
    climb_steps=0,
    capacity_rate=50,
    capacity_seconds=1,
    growth_instances=(1,),
    growth_fresh_stack=False,
    profile_seconds=0,
    delivery_messages=50,
    settlement_calls=50,
    projection_calls=30,
)

PLANS = {p.mode: p for p in (FULL, QUICK, TINY)}
