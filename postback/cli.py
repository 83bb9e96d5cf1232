"""The `postback` command."""

from __future__ import annotations

import asyncio
import importlib
import sys
import time
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit, urlunsplit

import typer

from postback_libs.settings import SERVICES, get_settings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Postback: async API gateway.",
)
topics_app = typer.Typer(no_args_is_help=True, help="Kafka topics.")
app.add_typer(topics_app, name="topics")
ledger_app = typer.Typer(no_args_is_help=True, help="Settlement's ledger.")
app.add_typer(ledger_app, name="ledger")


@app.command()
def up(
    data_dir: Annotated[Path, typer.Option(help="Where embedded data and logs live.")] = Path(
        ".postback"
    ),
    base_port: Annotated[int, typer.Option(help="Ingress port; the others follow it.")] = 8080,
    demo: Annotated[bool, typer.Option(help="Run `postback demo` once the stack is up.")] = False,
) -> None:
    """Run the whole system on this machine until Ctrl-C."""
    from postback.stack import up as run_up

    then = None
    if demo:
        then = [
            sys.executable,
            "-m",
            "postback",
            "demo",
            "--url",
            f"http://127.0.0.1:{base_port}",
            "--data-dir",
            str(data_dir),
        ]
    raise typer.Exit(run_up(data_dir, base_port, then))


@app.command()
def run(service: Annotated[str, typer.Argument(help=" | ".join(SERVICES))]) -> None:
    """Run one service (what a container runs)."""
    if service not in SERVICES:
        typer.echo(f"unknown service {service!r}; choose one of: {', '.join(SERVICES)}", err=True)
        raise typer.Exit(2)
    from postback_libs.runtime import run_event_loop

    module = importlib.import_module(f"postback_{service.replace('-', '_')}.app")

    async def serve() -> None:
        await module.build(get_settings()).serve()

    run_event_loop(serve())


@app.command()
def migrate() -> None:
    """Create or upgrade every service's Postgres schema."""
    from postback.stack import PACKAGES
    from postback_libs.db import migrate as run_migrate
    from postback_libs.db import schema_for

    settings = get_settings()

    async def all_services() -> None:
        for service in SERVICES:
            applied = await run_migrate(
                settings.database_url, schema_for(service), PACKAGES[service]
            )
            typer.echo(f"{service}: {', '.join(applied) if applied else 'up to date'}")

    asyncio.run(all_services())


@topics_app.command("create")
def topics_create() -> None:
    """Create every missing topic with its partitions, cleanup policy and retention."""
    from postback_libs.topics import ensure_topics

    created = asyncio.run(ensure_topics(get_settings()))
    typer.echo(f"created: {', '.join(created)}" if created else "all topics exist")


@ledger_app.command("check")
def ledger_check(
    margin: Annotated[
        float | None,
        typer.Option(
            help="Seconds past a call's deadline a reservation may stay reserved "
            "(default: the release grace plus two sweep intervals)."
        ),
    ] = None,
    topic: Annotated[
        bool, typer.Option(help="Also replay the ledger topic and compare the balances.")
    ] = True,
) -> None:
    """Verify every ledger invariant; exit 1 naming the first violation."""
    from datetime import timedelta

    from postback.ledger_check import check

    report = asyncio.run(
        check(
            get_settings(),
            margin=None if margin is None else timedelta(seconds=margin),
            topic=topic,
        )
    )
    if not report.ok:
        typer.echo(f"ledger check FAILED: {report.violations[0]}", err=True)
        for more in report.violations[1:]:
            typer.echo(f"  also: {more}", err=True)
        raise typer.Exit(1)
    replayed = f", {report.topic_events} ledger events replayed" if topic else ""
    typer.echo(
        f"ledger ok: {report.accounts} accounts, {report.transfers} transfers, "
        f"{report.open_reservations} reservations open{replayed}"
    )


@app.command()
def demo(
    url: Annotated[str, typer.Option(help="Ingress URL.")] = "http://127.0.0.1:8080",
    data_dir: Annotated[Path, typer.Option(help="Where `postback up` keeps its data.")] = Path(
        ".postback"
    ),
    delay: Annotated[float, typer.Option(help="Seconds the demo owner takes.")] = 2.0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the webhook.")] = 60.0,
) -> None:
    """Register a demo API and consumer, make a call, and show its signed result arrive."""
    from postback.demo import run_demo

    raise typer.Exit(asyncio.run(run_demo(url, data_dir, delay, timeout)))


projection_app = typer.Typer(no_args_is_help=True, help="The read model.")
app.add_typer(projection_app, name="projection")


@projection_app.command("rebuild")
def projection_rebuild(
    partial: Annotated[
        bool,
        typer.Option(
            help="Rebuild from what the topics still hold, though retention removed their "
            "oldest events or the broker lost its log (the calls they no longer hold leave "
            "the read model)."
        ),
    ] = False,
) -> None:
    """Replay the topics into a fresh read model and swap it in atomically."""
    from postback_projection.rebuild import rebuild

    last = [0.0, -1.0]  # when, and how many, last said

    def progress(applied: int, total: int) -> None:
        if applied != last[1] and (time.monotonic() - last[0] >= 1 or applied >= total):
            last[:] = [time.monotonic(), applied]
            typer.echo(f"  replayed {applied:,} of {total:,} events")

    from postback_libs.runtime import run_event_loop, tune_gc
    from postback_projection.rebuild import IncompleteHistory

    tune_gc()  # a replay makes millions of short-lived objects, as a running service does
    try:
        result = run_event_loop(rebuild(get_settings(), progress, partial=partial))
    except IncompleteHistory as e:
        typer.echo(f"not rebuilt: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        f"read model rebuilt from {result['events']:,} events in {result['seconds']} s, "
        f"swapped in within {result['swap_seconds']} s ({', '.join(result['tables'])})"
    )


dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters: events a consumer gave up on.")
app.add_typer(dlq_app, name="dlq")


@dlq_app.command("list")
def dlq_list(
    group: Annotated[str | None, typer.Option(help="Only this consumer group's.")] = None,
) -> None:
    """Every dead letter, oldest first: its id, when, the group, where it came from, why."""
    from postback.dlq import letters

    found = asyncio.run(letters(get_settings(), group))
    for letter in found:
        typer.echo(letter.line())
    typer.echo(f"{len(found)} dead letter{'' if len(found) == 1 else 's'}", err=True)


@dlq_app.command("replay")
def dlq_replay(
    ids: Annotated[list[str] | None, typer.Argument(help="Dead letter ids (`dlq list`).")] = None,
    group: Annotated[
        str | None, typer.Option(help="Every dead letter of this consumer group.")
    ] = None,
) -> None:
    """Send dead letters back to the group that gave up on them, once the cause is fixed."""
    from postback.dlq import letters, refusal, replay

    if not ids and group is None:
        typer.echo("name dead letters by id, or a consumer group with --group", err=True)
        raise typer.Exit(2)
    settings = get_settings()
    found = asyncio.run(letters(settings, group))
    chosen = [letter for letter in found if not ids or letter.id in ids]
    missing = sorted(set(ids or ()) - {letter.id for letter in chosen})
    why_not = {letter.id: refusal(settings, letter) for letter in chosen}
    refused = [(letter, why_not[letter.id]) for letter in chosen if why_not[letter.id]]
    ready = [letter for letter in chosen if not why_not[letter.id]]
    asyncio.run(replay(settings, ready))
    for letter in ready:
        typer.echo(f"replayed {letter.id} for {letter.data.consumer_group}")
    for letter, why in refused:
        typer.echo(f"not replayed {letter.id}: {why}", err=True)
    for id_ in missing:
        typer.echo(f"no dead letter {id_}", err=True)
    if not chosen and not missing:
        typer.echo(f"no dead letters of group {group!r} (`postback dlq list` shows them all)")
    if refused or missing:
        raise typer.Exit(1)


@app.command()
def schemas(
    out: Annotated[Path, typer.Option(help="Folder to write.")] = Path("schemas"),
) -> None:
    """Regenerate the event JSON Schemas, the AsyncAPI and the OpenAPI documents."""
    from postback.schemas import write

    changed = write(out)
    typer.echo(f"updated {len(changed)} files" if changed else "schemas are up to date")


def _unreachable(e: BaseException) -> str:
    """What could not be reached, at which address and by which setting (no password)."""
    import asyncpg
    from aiokafka.errors import KafkaError

    s = get_settings()
    url = urlsplit(s.database_url)
    host = url.hostname or ""
    if url.username:
        host = f"{url.username}@{host}"
    if url.port:
        host = f"{host}:{url.port}"
    db = f"the database at {urlunsplit(url._replace(netloc=host))} (POSTBACK_DATABASE_URL)"
    broker = f"the broker at {s.kafka_bootstrap} (POSTBACK_KAFKA_BOOTSTRAP)"
    if isinstance(e, KafkaError):
        what = broker
    elif isinstance(
        e, asyncpg.PostgresError | asyncpg.InterfaceError | asyncpg.ClientConfigurationError
    ):
        what = db
    else:
        what = f"{db} or {broker}"
    return (
        f"could not reach {what}: {e!r}. For a stack `postback up` runs, its addresses are in "
        "its data dir: set -a; . <data dir>/env; set +a (.postback/env by default)"
    )


def main() -> None:
    import socket

    import asyncpg
    from aiokafka.errors import KafkaConnectionError
    from pydantic import ValidationError

    from postback_libs.db import UNREACHABLE
    from postback_libs.settings import ConfigurationError

    try:
        app()
    except ValidationError as e:
        if e.title != "Settings":
            raise
        for error in e.errors():
            name = "POSTBACK_" + "_".join(str(part) for part in error["loc"]).upper()
            typer.echo(f"invalid configuration: {name}: {error['msg']}", err=True)
        sys.exit(2)
    except ConfigurationError as e:
        typer.echo(f"invalid configuration: {e}", err=True)
        sys.exit(2)
    except (
        *UNREACHABLE,
        socket.gaierror,  # a host name that does not resolve
        asyncpg.InvalidCatalogNameError,  # no such database
        asyncpg.InvalidAuthorizationSpecificationError,  # no such role, a wrong password
        asyncpg.ClientConfigurationError,  # not a database URL
        KafkaConnectionError,
    ) as e:
        typer.echo(_unreachable(e), err=True)
        sys.exit(1)
