"""Shared fixtures: tiny real-architecture checkpoints and a live oculo server on loopback."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared"
CORPUS = SHARED / "corpus"
SPEC = SHARED / "openai-spec" / "chat-schemas.json"
API_KEY = "sk-test-" + "k" * 32
ARCHS = ("idefics3", "gemma3", "llava")


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def make_image(width: int, height: int, fmt: str = "PNG", color: str = "blue") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format=fmt)
    return buf.getvalue()


def png_uri(width: int = 32, height: int = 32, color: str = "blue") -> str:
    return data_uri(make_image(width, height, "PNG", color))


@pytest.fixture(scope="session", autouse=True)
def _private_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test touches the user's own oculo database: the default data folder is a temp one."""
    saved = os.environ.get("OCULO_DATA_DIR")
    os.environ["OCULO_DATA_DIR"] = str(tmp_path_factory.mktemp("oculo-data"))
    yield
    if saved is None:
        os.environ.pop("OCULO_DATA_DIR", None)
    else:
        os.environ["OCULO_DATA_DIR"] = saved


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from oculo.testing.checkpoints import build_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: build_checkpoint(arch, root / arch, seed=0) for arch in ARCHS}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    base_url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60, **kw)


def start_server(config: str, workdir: Path, extra_env: dict[str, str] | None = None) -> Server:
    """`oculo serve --config` in a subprocess; returns once no model is still loading."""
    port = free_port()
    cfg = workdir / "oculo.toml"
    cfg.write_text(config)
    log_path = workdir / "server.log"
    env = {
        **os.environ,
        "OCULO_API_KEYS": API_KEY,
        "OCULO_DATA_DIR": str(workdir / "data"),
        **(extra_env or {}),
    }
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "oculo.cli", "serve", "--config", str(cfg), "--port", str(port)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
    )
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    wait_ready(server)
    return server


def wait_ready(server: Server, timeout: float = 120) -> None:
    """Until no model is still loading (a model may have failed: the tests look at that)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log()}")
        try:
            body = httpx.get(server.base_url + "/ready", timeout=2).json()
            if "loading" not in body["models"].values():
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    server.process.kill()
    raise RuntimeError(f"server did not become ready:\n{server.log()}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()


def catalog(checkpoints: dict[str, Path]) -> str:
    lines = ["[server]", "max_pixels = 40_000_000", ""]
    for arch, path in checkpoints.items():
        lines += ["[[models]]", f'id = "tiny-{arch}"', f'path = "{path}"', "max_tokens = 16", ""]
    lines += [
        "[[models]]",
        'id = "tiny-context"',
        f'path = "{checkpoints["idefics3"]}"',
        "context_length = 64",
        "",
        "[[models]]",
        'id = "broken"',
        'path = "/nonexistent/checkpoint"',
        "",
    ]
    return "\n".join(lines)


@pytest.fixture(scope="session")
def server(
    checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    srv = start_server(catalog(checkpoints), tmp_path_factory.mktemp("server"))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def openai_client(server: Server) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def schemas() -> Any:
    from jsonschema import Draft202012Validator

    components = json.loads(SPEC.read_text())["components"]

    def check(body: Any, name: str) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": components}
        errors = list(Draft202012Validator(schema).iter_errors(body))
        assert not errors, f"{name}: {[e.message for e in errors[:3]]}"

    return check


# PostgreSQL and Redis for the accounts tests: local runs may skip them, CI (CI=true) must not.
POSTGRES_ADMIN_URL = os.environ.get(
    "OCULO_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("OCULO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def unavailable(what: str, exc: BaseException) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} must be running in CI (.ci/run starts it): {exc!r}")
    pytest.skip(f"{what} is not reachable here: {exc!r}")


def _postgres_admin(sql: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards; yields its URL."""
    from sqlalchemy.engine import make_url

    name = "oculo_test_" + uuid.uuid4().hex[:12]
    try:
        _postgres_admin(f'CREATE DATABASE "{name}"')
    except Exception as exc:  # refused, no such role, ...: PostgreSQL is not there for us
        unavailable("PostgreSQL", exc)
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(False)
    finally:
        _postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each accounts test runs on a fresh SQLite file and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'accounts.db'}"
    else:
        with postgres_database() as url:
            yield url


@pytest.fixture
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except Exception as exc:
        unavailable("Redis", exc)
    return REDIS_URL


def one_model(checkpoints: dict[str, Path], max_tokens: int = 8) -> str:
    """A config that serves only the tiny Idefics3 checkpoint, as "tiny"."""
    path = checkpoints["idefics3"]
    return f'[[models]]\nid = "tiny"\npath = "{path}"\nmax_tokens = {max_tokens}\n'


def oculo_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`oculo ARGS` in a subprocess with `env` added to the environment; must succeed."""
    done = subprocess.run(
        [sys.executable, "-m", "oculo.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done


def run_async(work: Any) -> Any:
    """Await `work` (a coroutine) from a synchronous test."""
    return asyncio.run(work)


@contextmanager
def serve_in_process(engine: Any, model_id: str, **settings: Any) -> Iterator[str]:
    """An oculo app around `engine` under uvicorn in a thread; yields its base URL."""
    from oculo.config import ModelSpec
    from oculo.registry import ModelRegistry

    spec = ModelSpec(id=model_id, path="-")
    with serve_settings(
        [spec], ModelRegistry([spec], factory=lambda _: engine), **settings
    ) as base:
        yield base


@contextmanager
def serve_settings(models: list[Any], registry: Any = None, **settings: Any) -> Iterator[str]:
    """An oculo app for the catalog `models` under uvicorn in a thread; yields its base URL."""
    import uvicorn

    from oculo.api.app import create_app
    from oculo.config import Settings

    if "database_url" not in settings:
        settings.setdefault("data_dir", tempfile.mkdtemp(prefix="oculo-data-"))
    settings.setdefault("api_keys", [API_KEY])
    config = Settings(models=models, **settings)
    app = create_app(config, registry)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/ready").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)
