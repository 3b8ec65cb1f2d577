"""The `oculo` command line: serve, keys (create, list, revoke), usage, models."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Column, Table

from oculo.config import ConfigError, Settings, load_settings, model_from_path

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from oculo.accounts.keys import KeyInfo

T = TypeVar("T")

app = typer.Typer(
    name="oculo",
    help="A self-hosted, OpenAI-compatible vision inference API.",
    no_args_is_help=True,
    add_completion=False,
)
keys_app = typer.Typer(help="API keys: create, list, revoke.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
console = Console(stderr=True)
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)

ConfigOption = Annotated[
    Path | None,
    typer.Option(help="TOML config file (its data_dir / database_url say where the keys are)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="JSON for scripts instead of a table.")]


def _settings(
    config: Path | None,
    host: str | None = None,
    port: int | None = None,
    model: str | None = None,
    model_id: str | None = None,
) -> Settings:
    try:
        settings = load_settings(config, overrides={"host": host, "port": port})
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    if model is not None:
        settings = settings.model_copy(
            update={"models": [model_from_path(model, model_id=model_id)]}
        )
    return settings


def _with_store(settings: Settings, work: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """Run `work` against the migrated accounts database, then close it."""
    from oculo.accounts.store import open_store

    async def run() -> T:
        engine = await open_store(settings.database_url, settings.data_dir)
        try:
            return await work(engine)
        finally:
            await engine.dispose()

    from sqlalchemy.exc import SQLAlchemyError

    try:
        return asyncio.run(run())
    except (OSError, SQLAlchemyError) as exc:
        console.print(f"[red]error:[/red] the accounts database is unavailable: {exc}")
        raise typer.Exit(1) from None


async def _first_key(engine: AsyncEngine) -> str | None:
    """One key, stored hashed, when the store has none at all (not even revoked ones)."""
    from oculo.accounts.keys import KeyStore

    keys = KeyStore(engine)
    if await keys.count():
        return None
    key, _ = await keys.create("default")
    return key


async def _nothing(engine: AsyncEngine) -> None:
    return None


def _prepare_store(settings: Settings) -> None:
    """Migrate the store; on the first start without configured keys, make a key, print it once."""
    if settings.api_keys:
        _with_store(settings, _nothing)
        return
    key = _with_store(settings, _first_key)
    if key is not None:
        console.print(
            "\n[bold]First start: made an API key[/bold] (stored hashed, shown only now):\n"
        )
        print(f"export INFERENCE_API_KEY={key}\n", flush=True)
    else:
        console.print(
            "API keys come from the key store. Make one with [bold]oculo keys create --name NAME"
            "[/bold]; see them with [bold]oculo keys list[/bold]."
        )


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    config: Annotated[
        Path | None, typer.Option(help="TOML config file (server settings, model catalog).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Serve this one checkpoint folder (or hub id) instead of the catalog."),
    ] = None,
    model_id: Annotated[
        str | None, typer.Option(help="Public id for --model (default: the folder name).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
) -> None:
    """Start the API server."""
    import uvicorn

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    settings = _settings(config, host, port, model, model_id)
    if not settings.models:
        from oculo.models import default_model_spec

        settings = settings.model_copy(update={"models": [default_model_spec()]})
    _prepare_store(settings)
    from oculo.api.app import create_app

    application = create_app(settings)
    console.print(
        f"oculo serving {', '.join(m.id for m in settings.models)} on "
        f"http://{settings.host}:{settings.port}/v1"
    )
    uvicorn.run(
        application,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=5,
    )


def _moment(text: str | None, option: str) -> datetime | None:
    """An ISO date (midnight UTC) or date-time (UTC unless it names a zone)."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        console.print(f"[red]error:[/red] {option} takes a date like 2030-01-31, not {text!r}")
        raise typer.Exit(2) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _key_json(info: KeyInfo) -> dict[str, Any]:
    def iso(moment: datetime | None) -> str | None:
        return moment.isoformat() if moment else None

    return {
        "id": info.id,
        "name": info.name,
        "models": list(info.models) if info.models is not None else None,
        "rpm": info.rpm,
        "tpm": info.tpm,
        "created_at": iso(info.created_at),
        "expires_at": iso(info.expires_at),
        "revoked_at": iso(info.revoked_at),
        "active": info.active,
    }


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who or what the key is for.")],
    models: Annotated[
        list[str] | None,
        typer.Option(help="A model id the key may use (repeat, or comma-separate); default all."),
    ] = None,
    rpm: Annotated[int | None, typer.Option(min=1, help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(min=1, help="Tokens per minute.")] = None,
    expires: Annotated[
        str | None, typer.Option(help="Expiry: a date (midnight UTC) or ISO date-time.")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Make a key and print it once (only its hash is stored)."""
    from oculo.accounts.keys import KeyStore

    allowed = [m.strip() for entry in models or [] for m in entry.split(",") if m.strip()]
    expires_at = _moment(expires, "--expires")

    async def create(engine: AsyncEngine) -> tuple[str, KeyInfo]:
        return await KeyStore(engine).create(
            name, models=allowed or None, rpm=rpm, tpm=tpm, expires_at=expires_at
        )

    key, info = _with_store(_settings(config), create)
    console.print(f"Key [bold]{info.id}[/bold] ({name}) made. It is shown only now:")
    print(key, flush=True)


@keys_app.command("list")
def keys_list(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """The stored keys (their public ids; secrets are not stored)."""
    from oculo.accounts.keys import KeyStore

    async def list_keys(engine: AsyncEngine) -> list[KeyInfo]:
        return await KeyStore(engine).list()

    infos = _with_store(_settings(config), list_keys)
    if as_json:
        print(json.dumps([_key_json(i) for i in infos], indent=2))
        return
    table = Table(
        Column("id", no_wrap=True, min_width=12),
        "name",
        "models",
        "rpm",
        "tpm",
        Column("created", no_wrap=True),
        Column("expires", no_wrap=True),
        "state",
    )
    for i in infos:
        state = "revoked" if i.revoked_at else ("active" if i.active else "expired")
        table.add_row(
            i.id,
            i.name,
            ", ".join(i.models) if i.models else "all",
            str(i.rpm or "-"),
            str(i.tpm or "-"),
            i.created_at.strftime("%Y-%m-%d %H:%M"),
            i.expires_at.strftime("%Y-%m-%d %H:%M") if i.expires_at else "-",
            state,
        )
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(metavar="ID", help="The key's id (oculo keys list).")],
    config: ConfigOption = None,
) -> None:
    """Revoke a key: every oculo process sharing the database refuses its next request."""
    from oculo.accounts.keys import KeyStore

    async def revoke(engine: AsyncEngine) -> bool:
        return await KeyStore(engine).revoke(key_id)

    if not _with_store(_settings(config), revoke):
        console.print(f"[red]error:[/red] no key with id {key_id!r}")
        raise typer.Exit(1)
    console.print(f"Key {key_id} revoked.")


@app.command()
def usage(
    key: Annotated[str | None, typer.Option("--key", help="Only this key id.")] = None,
    since: Annotated[str | None, typer.Option(help="From this date (UTC), inclusive.")] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Usage from the ledger: requests and tokens by day, key and model."""
    from oculo.accounts.ledger import Ledger, UsageTotal

    start = _moment(since, "--since")
    day: date | None = start.date() if start else None

    async def totals(engine: AsyncEngine) -> list[UsageTotal]:
        return await Ledger(engine).totals(key_id=key, since=day)

    rows = _with_store(_settings(config), totals)
    if as_json:
        lines = [
            {
                "date": r.day,
                "key_id": r.key_id,
                "model": r.model,
                "requests": r.requests,
                "prompt_tokens": r.prompt_tokens,
                "image_tokens": r.image_tokens,
                "text_tokens": r.text_tokens,
                "completion_tokens": r.completion_tokens,
                "total_tokens": r.total_tokens,
            }
            for r in rows
        ]
        print(json.dumps(lines, indent=2))
        return
    table = Table(
        Column("date", no_wrap=True),
        Column("key", no_wrap=True, min_width=12),
        *"model requests prompt image completion total".split(),
    )
    for r in rows:
        table.add_row(
            r.day,
            r.key_id,
            r.model,
            *(str(n) for n in (r.requests, r.prompt_tokens, r.image_tokens)),
            *(str(n) for n in (r.completion_tokens, r.total_tokens)),
        )
    out.print(table)


def _server_url(url: str | None, config: Path | None) -> str:
    if url:
        return url.rstrip("/")
    settings = _settings(config)
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{host}:{settings.port}"


def _upstream_row(model: dict[str, Any], up: dict[str, Any]) -> list[str]:
    if up["ejected"]:
        health = "[red]ejected[/red]"
    elif not up["checked"]:
        health = "unchecked"
    else:
        health = "[green]healthy[/green]" if up["healthy"] else "[red]unhealthy[/red]"
    requests = up["requests"]
    failed = requests.get("error", 0) + requests.get("timeout", 0)
    return [
        model["id"],
        model["engine"],
        model["status"],
        up["url"],
        health,
        str(up["outstanding"]),
        f"{up['ejected_for']:.0f} s" if up["ejected"] else "-",
        f"{requests.get('ok', 0)} / {failed}",
        up["last_error"] or "-",
    ]


@app.command()
def models(
    url: Annotated[
        str | None,
        typer.Option(help="The running oculo server (default: host and port from the settings)."),
    ] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """The models a running server serves, and for remote ones each upstream's state."""
    import httpx

    base = _server_url(url, config)
    try:
        response = httpx.get(base + "/pool", timeout=10)
        response.raise_for_status()
        models = response.json()["models"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        console.print(
            f"[red]error:[/red] no oculo server answered at {base} ({type(exc).__name__}); "
            "start one with `oculo serve` or name it with --url"
        )
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(models, indent=2))
        return
    table = Table(
        Column("model", no_wrap=True),
        "engine",
        "status",
        Column("upstream", no_wrap=True),
        "health",
        "outstanding",
        "ejected for",
        "ok / failed",
        "last error",
    )
    for model in models:
        if not model["upstreams"]:
            table.add_row(model["id"], model["engine"], model["status"], *["-"] * 6)
        for up in model["upstreams"]:
            table.add_row(*_upstream_row(model, up))
    out.print(table)
    retried = sum(m["retries"] for m in models)
    if retried:
        out.print(f"{retried} request(s) retried on another upstream since the server started.")


@app.command()
def version() -> None:
    """Print oculo's version."""
    from oculo import __version__

    print(__version__)


if __name__ == "__main__":
    app()
