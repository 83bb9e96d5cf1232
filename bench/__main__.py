"""`python -m bench [--quick]`: run the benchmarks, write bench/results/<timestamp>.{json,md,png}.

The embedded broker and database are started here unless --kafka-bootstrap and --postgres-dsn
name running ones (then each section gets its own topic prefix and database on them)."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.infra import Infra
from bench.plan import PLANS
from bench.report import write
from bench.run import Run

RESULTS = Path(__file__).parent / "results"
QUIET_CPU_PERCENT = 15


def wait_for_quiet(limit: float) -> None:
    """Wait (up to `limit` seconds) until the machine has been nearly idle for 15 s: the run
    shares 2 cores, and other work there lowers every figure."""
    import psutil

    deadline = time.monotonic() + limit
    quiet = 0
    while time.monotonic() < deadline:
        busy = psutil.cpu_percent(interval=5)
        quiet = quiet + 1 if busy < QUIET_CPU_PERCENT else 0
        if quiet >= 3:
            return
        print(f"  waiting for a quiet machine: {busy:.0f} % busy", flush=True)
    print("  the machine did not get quiet; running anyway", flush=True)


async def main_async(args: argparse.Namespace) -> int:
    plan = PLANS[args.mode]
    if args.wait_quiet:
        wait_for_quiet(args.wait_quiet)
    stamp = time.strftime("%Y%m%d-%H%M%S") + ("" if plan.mode == "full" else f"-{plan.mode}")
    root = Path(tempfile.mkdtemp(prefix="postback-bench-"))
    infra = Infra(root, args.kafka_bootstrap, args.postgres_dsn)
    print(f"Postback benchmark, {plan.mode} mode; logs in {root / 'logs'}", flush=True)
    finished = False
    try:
        await infra.start()
        report = await Run(plan, infra, args.out, stamp).run()
        finished = True
    finally:
        infra.stop()
        # The embedded database alone reaches gigabytes in a full run; the logs are kept when
        # asked for, or when the run did not finish, to say why.
        shutil.rmtree(root / "pg", ignore_errors=True)
        if args.keep_logs or not finished:
            print(f"Logs kept in {root / 'logs'}", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
    json_path, md_path, png_path = write(report, args.out, stamp)
    print()
    print(md_path.read_text())
    print(f"Wrote {json_path}, {md_path}" + (f", {png_path}" if png_path else ""), flush=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick")
    mode.add_argument(
        "--tiny",
        dest="mode",
        action="store_const",
        const="tiny",
        help="every section on tiny counts (the harness's own test)",
    )
    parser.set_defaults(mode="full")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where reports are written")
    parser.add_argument("--kafka-bootstrap", help="a running broker instead of the embedded one")
    parser.add_argument("--postgres-dsn", help="a running PostgreSQL (a superuser DSN)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the services' logs")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to this long for the machine to be idle",
    )
    args = parser.parse_args()
    if bool(args.kafka_bootstrap) != bool(args.postgres_dsn):
        parser.error("--kafka-bootstrap and --postgres-dsn go together")
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
