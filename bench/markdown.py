"""The run's report as Markdown: the targets, the ratios, then each section's tables."""

from __future__ import annotations

from typing import Any

from bench.figures import flatten, get_path, targets
from postback.embedded import EMBEDDED_TOPIC_PARTITIONS


def _noisy(meta: dict[str, Any]) -> str:
    """A warning when other work took a noticeable share of the machine during the run."""
    other, seconds, cpus = (
        meta.get("other_cpu_seconds"),
        meta.get("seconds"),
        (meta.get("machine") or {}).get("cpus"),
    )
    if not other or not seconds or not cpus:
        return ""
    share = other / (seconds * cpus)
    if share < 0.1:
        return ""
    return (
        f" (**{share:.0%} of the machine went to other work: every figure here is lower than "
        "on a quiet machine; compare ratios, not rates**)"
    )


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:,.1f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return [*out, ""]


def failed(section: Any) -> str | None:
    if not isinstance(section, dict):
        return "not run"
    return section.get("error") or section.get("skipped")


def markdown(r: dict[str, Any], plot_name: str | None) -> str:
    meta = r.get("meta", {})
    m = meta.get("machine", {})
    lines = [
        f"# Postback benchmark — {meta.get('mode')} run, {meta.get('started')}",
        "",
        f"Commit `{meta.get('commit')}` ({meta.get('uncommitted_files')} files changed in the "
        f"working tree), {m.get('cpus')} CPUs, {m.get('memory_gb')} GB, "
        f"Python {m.get('python')}, load generators {meta.get('load_generator')}; "
        f"run took {meta.get('seconds')} s; load average before "
        f"{(meta.get('load_average_before') or ['?'])[0]}, other processes used "
        f"{meta.get('other_cpu_seconds')} CPU s of the machine's "
        f"{meta.get('machine_busy_cpu_seconds')} during it (interrupts: "
        f"{meta.get('interrupt_cpu_seconds')})"
        f"{_noisy(meta)}. Embedded broker (Tansu, in memory, topics of "
        f"{EMBEDDED_TOPIC_PARTITIONS} partitions) "
        "and PostgreSQL (durable, fsync on), a fresh broker and database per section; every "
        "service a process of its own as `postback up` runs them. Every figure below was "
        "measured in this run, beside its baseline.",
        "",
        "## Targets (stated, not asserted)",
        "",
    ]
    lines += _table(
        ["target", "measured", "status"],
        [[t["target"], t["measured"], t["status"]] for t in targets(r)],
    )
    lines += ["## Figures beside their baselines", ""]
    lines += _table(
        ["figure", "value", "baseline", "baseline value", "ratio", "unit"],
        [
            [x["figure"], x["value"], x["baseline"], x["baseline_value"], x["ratio"], x["unit"]]
            for x in r.get("ratios", [])
        ],
    )
    if plot_name:
        lines += [f"![latency against offered load]({plot_name})", ""]

    lines += ["## 1. Ingress accept beside the bare endpoint", ""]
    ing = r.get("ingress", {})
    if failed(ing):
        lines += [f"Not measured: {failed(ing)}", ""]
    else:
        rows = []
        for which in ("bare", "ingress"):
            for x in ing[which]:
                rows.append(
                    [
                        "bare endpoint" if which == "bare" else "ingress POST /v1/calls",
                        x["offered_per_second"]
                        or f"closed loop, {x['vus']} connections, {x.get('load_generator', 'k6')}",
                        x["accepted_per_second"],
                        x["p50_ms"],
                        x["p95_ms"],
                        x["p99_ms"],
                        x["dropped"],
                        x["refused"],
                        x["server_cpu_ms_per_request"],
                        x.get("load_generator_cpu_ms_per_request"),
                    ]
                )
        lines += _table(
            [
                "server",
                "offered/s",
                "accepted/s",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "dropped",
                "refused",
                "server CPU ms/request",
                "load generator CPU ms/request",
            ],
            rows,
        )
        s = ing["saturation"]
        sessions = get_path(ing["ingress"][-1], "postgres_sessions", "services") or {}
        if sessions:
            lines += [
                "Ingress's PostgreSQL sessions at saturation (pg_stat_activity, 10 samples/s):",
                "",
            ]
            lines += _table(
                ["sessions of", "busy (avg)", "states"],
                [
                    [
                        who,
                        v["busy_sessions_avg"],
                        ", ".join(f"{k} {share:.0%}" for k, share in v["states"].items()),
                    ]
                    for who, v in sessions.items()
                ],
            )
        generator = s.get("load_generator", "k6")  # reports older than wrk: k6
        lines += [
            f"At saturation ingress accepts {_fmt(s['ingress_per_second'])} calls/s, "
            f"{_fmt(s['ratio'])} of the bare endpoint's {_fmt(s['bare_per_second'])}/s. "
            "Ingress ran alone (nothing downstream); k6 offered the fixed rates and "
            f"{generator} drove saturation, on the same 2 cores"
            + (
                " (wrk is not installed: k6's own CPU, about a core at these rates, leaves the "
                "servers one core between them and their database and broker)."
                if generator == "k6"
                else "."
            ),
            "",
        ]

    lines += ["## 2. End to end (instant sync owner, fast receiver)", ""]
    e2e = r.get("e2e", {})
    if failed(e2e):
        lines += [f"Not measured: {failed(e2e)}", ""]
    else:
        phases = [(x.get("name", "light"), x) for x in e2e.get("light", [])]
        phases.append(("latency", e2e["latency"]))
        phases += [(x.get("name", "ramp"), x) for x in e2e.get("ramp", [])]
        if e2e["sustained"].get("separate_phase"):
            phases.append(("sustained", e2e["sustained"]))
        rows = [
            [
                name,
                x["offered_per_second"],
                x["seconds"],
                x["accepted"],
                x["delivered"],
                x["lost"],
                x.get("in_flight_at_wait_end"),
                x["duplicated"],
                x["delivered_per_second"],
                x["latency_ms"]["p50"],
                x["latency_ms"]["p95"],
                x["latency_ms"]["p99"],
                x["drain_seconds"],
                "yes" if x["kept_up"] else "no",
            ]
            for name, x in phases
        ]
        lines += _table(
            [
                "phase",
                "offered/s",
                "s",
                "accepted",
                "delivered",
                "lost",
                "late",
                "duplicated",
                "delivered/s",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "backlog drain s",
                "kept up",
            ],
            rows,
        )
        su, cap = e2e["sustained"], e2e["capacity"]
        epc = e2e.get("events_per_call") or {}
        lines += [
            f"**Sustained: {_fmt(su['calls_per_second'])} calls/s** at "
            f"{_fmt(su['offered_per_second'])}/s offered for {_fmt(su['seconds'])} s, "
            f"lost {su['lost']}, duplicated {su['duplicated']}. "
            f"Latency is POST /v1/calls to the webhook's arrival. "
            f"Capacity working off a backlog: {_fmt(cap['delivered_per_second'])} calls/s "
            f"({cap['delivered']} calls, lost {cap['lost']}). "
            f"Broker records per call: {_fmt(epc.get('per_call'))} "
            f"({', '.join(f'{k} {v}' for k, v in (epc.get('records') or {}).items() if v)}).",
            "",
            (
                "Light steps run below the latency phase's rate on a stack of their own, lowest "
                "first. "
                if e2e.get("light")
                else ""
            )
            + "A phase keeps up when nothing is dropped or lost, ingress accepted >= 97 % of the "
            "offered calls, webhooks came at >= 90 % of the offered rate, and latency did not "
            "grow (p50 of the last fifth of the calls <= 2 x that of the first fifth + 500 ms). "
            "Lost: accepted (a row in ingress's table) and no webhook while none came for 15 s; "
            "late: still without a webhook when the wait for the backlog ran out while webhooks "
            "were still arriving (a backlog, not a loss). Accepted counts ingress's table; k6's "
            "own count of 202s is in the JSON.",
            "",
        ]
        if su.get("note"):
            lines += [f"_{su['note']}_", ""]
        shown = [(x.get("name", "light"), x) for x in e2e.get("light", [])[:1]]  # cores not full
        shown.append(("latency", e2e["latency"]))
        if su.get("separate_phase"):
            shown.append(("sustained", su))
        for name, x in shown:
            hops = {k: v for k, v in (x.get("hops") or {}).items() if isinstance(v, dict)}
            if not hops:
                continue
            lines += [
                f"Where the time goes ({name} phase, {x['offered_per_second']}/s, "
                f"{x['hops'].get('calls')} calls; gap between consecutive events of a call):",
                "",
            ]
            lines += _table(
                ["hop", "work of", "p50 ms", "p95 ms", "p99 ms"],
                [[k, v["work_of"], v["p50_ms"], v["p95_ms"], v["p99_ms"]] for k, v in hops.items()],
            )
            sessions = get_path(x, "postgres_sessions", "services") or {}
            if sessions:
                lines += [
                    f"PostgreSQL sessions in the {name} phase (pg_stat_activity, 10 samples/s): "
                    "sessions busy on average, and what they were doing:",
                    "",
                ]
                lines += _table(
                    ["sessions of", "busy (avg)", "states"],
                    [
                        [
                            who,
                            v["busy_sessions_avg"],
                            ", ".join(f"{k} {share:.0%}" for k, share in v["states"].items()),
                        ]
                        for who, v in sessions.items()
                    ],
                )
            drift = x.get("cpu_first_and_last_fifth") or {}
            if drift:
                lines += [
                    f"CPU while the {name} phase's load ran, in its first and its last fifth "
                    "(% of one core). The offered rate did not change: a process whose share "
                    "grew does more work per call as the run goes on.",
                    "",
                ]
                lines += _table(
                    ["process", "first fifth", "last fifth"],
                    [
                        [label, v["first"], v["last"]]
                        for label, v in sorted(drift.items(), key=lambda kv: -(kv[1]["last"] or 0))
                    ],
                )

    lines += ["## 3. Delivery (one process)", ""]
    lines += _component(r.get("delivery"))
    lines += ["## 4. Projection (one process)", ""]
    lines += _component(r.get("projection"))
    lines += ["## 5. Settlement (one process)", ""]
    lines += _component(r.get("settlement"))

    lines += ["## 6. Baselines (same broker, database and machine, same run)", ""]
    b = r.get("baselines", {})
    if failed(b):
        lines += [f"Not measured: {failed(b)}", ""]
    else:
        k, p, h = b["kafka"], b["postgres"], b["http_client"]
        hop = b.get("kafka_hop") or {}
        lines += _table(
            ["baseline", "rate", "shape"],
            [
                [
                    "aiokafka produce",
                    f"{_fmt(k['produce_per_second'])} msgs/s",
                    f"{k['messages']} x {k['message_bytes']} B, acks=all, the services' "
                    "producer settings",
                ],
                ["aiokafka consume", f"{_fmt(k['consume_per_second'])} msgs/s", "one consumer"],
                [
                    "one hop through the broker",
                    f"p50 {_fmt(hop.get('p50_ms'))} / p95 {_fmt(hop.get('p95_ms'))} / p99 "
                    f"{_fmt(hop.get('p99_ms'))} ms",
                    f"produce -> consumer-group fetch at {_fmt(hop.get('per_second'))}/s, "
                    f"fetch_max_wait {hop.get('fetch_max_wait_ms')} ms (the services' settings)",
                ],
                [
                    "asyncpg insert, commit per row",
                    f"{_fmt(p['commit_per_row_rows_per_second'])} rows/s",
                    f"{p['commit_per_row_connections']} connections, fsync on",
                ],
                [
                    "asyncpg insert + pg_notify, commit per row",
                    f"{_fmt(p.get('commit_per_row_with_notify_rows_per_second'))} rows/s",
                    f"{p['commit_per_row_connections']} connections, fsync on (how the outbox "
                    "relay was woken until recently: the NOTIFY queue lock serialises commits)",
                ],
                [
                    "asyncpg insert, batched",
                    f"{_fmt(p['batched_rows_per_second'])} rows/s",
                    f"{p['batch_rows']} rows per transaction, one connection",
                ],
                [
                    "aiohttp client POST",
                    f"{_fmt(h['requests_per_second'])} req/s",
                    f"{h['requests']} x 400 B, {h['concurrency']} in flight, to an aiohttp "
                    "receiver",
                ],
            ],
        )

    lines += ["## 7. Resources per process", ""]
    lines += _resources(r)

    lines += ["## 8. Growth: instances of the busiest service", ""]
    g = r.get("growth", {})
    if failed(g):
        lines += [f"Not measured: {failed(g)}", ""]
    else:
        pts = g["points"]
        services = sorted({s for x in pts for s in (x.get("cpu_ms_per_call") or {})})
        lines += [
            f"Busiest service: **{g['service']}**, topics of {g.get('topic_partitions')} "
            f"partitions; {g['measure']}.",
            "",
        ]
        lines += _table(
            ["instances", "calls/s", "lost", "dup", "all services CPU ms/call"]
            + [f"{s} CPU ms/call" for s in services],
            [
                [
                    x["instances"],
                    x["delivered_per_second"],
                    x["lost"],
                    x["duplicated"],
                    x["services_cpu_ms_per_call"],
                ]
                + [(x.get("cpu_ms_per_call") or {}).get(s) for s in services]
                for x in pts
            ],
        )
        for x in pts:
            if x.get("note"):
                lines += [f"_{x['instances']} instances: {x['note']}_", ""]

    lines += ["## Profiles (py-spy, the thread holding the GIL, 100 samples/s)", ""]
    profiles = get_path(r, "e2e", "profiles") or {}
    for title, prof in (
        ("The busiest service (CPU) in the end-to-end run", profiles.get("busiest")),
        ("The service of the slowest hop in the end-to-end run", profiles.get("slowest hop")),
        ("Ingress alone at saturation", get_path(r, "ingress", "profile")),
    ):
        if prof is None:
            continue
        lines += _profile(title, prof or {})
    if r.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    return "\n".join(lines)


def _profile(title: str, prof: dict[str, Any]) -> list[str]:
    lines = [f"### {title}", ""]
    if failed(prof) or not prof.get("samples"):
        return [*lines, f"Not profiled: {failed(prof) or 'no samples'}", ""]
    lines += [
        f"{prof['service']}, {prof.get('load')}: {prof['samples']} samples "
        f"(~{prof['cpu_seconds_sampled']} s holding the GIL). Inclusive: time in a function and "
        "everything it calls; self: time in the function's own code.",
        "",
    ]
    lines += _table(
        ["inclusive share", "function"],
        [[x["share"], f"`{x['function']}`"] for x in prof["inclusive"]],
    )
    lines += _table(
        ["self share", "function"], [[x["share"], f"`{x['function']}`"] for x in prof["self"]]
    )
    by_package = prof.get("self_by_package") or {}
    if by_package:
        lines += [
            "Own time by package: "
            + ", ".join(f"{k} {v:.0%}" for k, v in by_package.items())
            + ".",
            "",
        ]
    return lines


def _component(section: Any) -> list[str]:
    if failed(section):
        return [f"Not measured: {failed(section)}", ""]
    assert isinstance(section, dict)
    rows = [[k, v] for k, v in flatten(section).items() if k != "section_seconds"]
    return _table(["figure", "value"], rows)


def _resources(r: dict[str, Any]) -> list[str]:
    e2e = r.get("e2e") or {}
    wanted = [(e2e.get("resources"), "whole end-to-end stack, every phase")]
    if get_path(e2e, "sustained", "separate_phase"):
        wanted.append((get_path(e2e, "sustained", "resources"), "sustained phase"))
    wanted.append((get_path(e2e, "latency", "resources"), "latency phase"))
    out: list[str] = []
    for use, title in wanted:
        if not use:
            continue
        out += [f"**{title}** (peak RSS MB / CPU s / % of one core):", ""]
        rows = [
            [
                label,
                u["processes"],
                u["peak_rss_mb"],
                u["cpu_seconds"],
                u["cpu_percent_of_one_core"],
            ]
            for label, u in sorted(use.items(), key=lambda kv: -kv[1]["cpu_seconds"])
        ]
        out += _table(["process", "n", "peak RSS MB", "CPU s", "% of a core"], rows)
    if not out:
        out = ["No end-to-end windows were sampled.", ""]
    return out
