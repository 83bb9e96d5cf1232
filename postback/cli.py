"""The `postback` command."""

from __future__ import annotations

import asyncio
import importlib
import sys
from pathlib import Path
from typing import Annotated

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
    module = importlib.import_module(f"postback_{service.replace('-', '_')}.app")

    async def serve() -> None:
        await module.build(get_settings()).serve()

    asyncio.run(serve())


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


@app.command()
def schemas(
    out: Annotated[Path, typer.Option(help="Folder to write.")] = Path("schemas"),
) -> None:
    """Regenerate the event JSON Schemas, the AsyncAPI and the OpenAPI documents."""
    from postback.schemas import write

    changed = write(out)
    typer.echo(f"updated {len(changed)} files" if changed else "schemas are up to date")


def main() -> None:
    app()
