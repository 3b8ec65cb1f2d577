"""The `oculo` command line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from oculo.config import ConfigError, Settings, load_settings, model_from_path

app = typer.Typer(
    name="oculo",
    help="A self-hosted, OpenAI-compatible vision inference API.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)


def _settings(
    config: Path | None, host: str | None, port: int | None, model: str | None, model_id: str | None
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
    elif not settings.models:
        from oculo.models import default_model_spec

        settings = settings.model_copy(update={"models": [default_model_spec()]})
    return settings


def _ensure_key(settings: Settings) -> Settings:
    if settings.api_keys:
        return settings
    from oculo.api.auth import new_key

    key = new_key()
    console.print(
        "\n[bold]No API key configured (OCULO_API_KEYS); made one for this run.[/bold] "
        "It is shown only now:\n"
    )
    print(f"export INFERENCE_API_KEY={key}\n", flush=True)
    return settings.model_copy(update={"api_keys": [key]})


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
    settings = _ensure_key(_settings(config, host, port, model, model_id))
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


@app.command()
def version() -> None:
    """Print oculo's version."""
    from oculo import __version__

    print(__version__)


if __name__ == "__main__":
    app()
