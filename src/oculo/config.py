"""Settings: built-in defaults, then a TOML file, then `OCULO_*` environment variables, then flags.

A config file looks like::

    [server]
    host = "127.0.0.1"
    port = 8000
    max_images = 2                # images per request
    max_pixels = 40_000_000       # per image, checked from the header before decoding
    max_concurrent_requests = 64  # in flight (running + queued); past it: 503 overloaded
    api_keys = ["sk-..."]         # or OCULO_API_KEYS=key1,key2 (static keys, no limits)
    data_dir = "/var/lib/oculo"   # the SQLite database's folder (default: a per-user data folder)
    # database_url = "postgresql://oculo@db/oculo"  # instead of SQLite: several oculo processes
    # redis_url = "redis://cache:6379/0"            # rate limits shared by several processes
    # ledger_sync = "full"        # usage rows on disk before each answer; "deferred": within 1 s

    [[models]]                    # the catalog: one table per public model id
    id = "smolvlm"
    engine = "transformers"
    path = "/models/SmolVLM-256M-Instruct"   # a checkpoint folder (or a hub id)
    # context_length = 8192       # else read from the checkpoint's config
    # max_tokens = 512            # default completion length when a request names none
    # dtype = "auto"              # or "float32", "bfloat16", ...
    # device = "cpu"

    [[models]]                    # a remote model: a pool of OpenAI-compatible servers
    id = "google/gemma-3-27b-instruct/bf-16"
    engine = "remote"
    upstreams = ["http://vllm-a:8000", "http://vllm-b:8000"]
    upstream_model = "google/gemma-3-27b-it"    # the name the upstreams know it by
    upstream_key_env = "VLLM_API_KEY"           # or upstream_key = "..."
    context_length = 131072
    # connect_timeout = 5, first_byte_timeout = 120, total_timeout = 600 (seconds)
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_BODY_BYTES = 1_048_576  # the seed's "less than 1 MB": 1 MiB or more is refused


class ConfigError(Exception):
    """The configuration cannot be used; the message says why and where."""


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    engine: Literal["transformers", "remote"] = "transformers"
    path: str | None = Field(default=None, min_length=1)  # transformers: the checkpoint
    context_length: int | None = Field(default=None, ge=16)
    max_tokens: int = Field(default=512, ge=1)
    dtype: str = "auto"
    device: str = "cpu"
    description: str = ""
    owned_by: str = "oculo"
    # sampling for requests that leave it out (unset: OpenAI's default, 1.0; a remote model
    # then sends nothing and the upstream's own generation config decides)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    # remote: a pool of OpenAI-compatible servers (vLLM, SGLang, llama.cpp, Ollama, oculo)
    upstreams: list[str] = Field(default_factory=list)
    upstream_model: str | None = Field(default=None, min_length=1)  # else the public id
    upstream_key: str | None = None  # Bearer key the upstreams expect
    upstream_key_env: str | None = None  # ... or the environment variable that holds it
    connect_timeout: float = Field(default=5.0, gt=0)
    first_byte_timeout: float = Field(default=120.0, gt=0)  # to the first piece of the answer
    total_timeout: float = Field(default=600.0, gt=0)  # to its end
    health_interval: float = Field(default=5.0, gt=0)  # seconds between health checks
    eject_after: int = Field(default=3, ge=1)  # consecutive failures that eject an upstream
    eject_seconds: float = Field(default=30.0, gt=0)  # its cool-down
    retries: int = Field(default=2, ge=0)  # other upstreams tried before the first byte
    max_outstanding: int = Field(default=256, ge=1)  # per upstream; past it: 503 overloaded
    tokenizer: str | None = None  # remote: tokenizer.json (or its folder) to count prompt text

    @model_validator(mode="after")
    def _engine_fields(self) -> ModelSpec:
        if self.engine == "transformers":
            if self.path is None:
                raise ValueError(f"model {self.id!r}: a transformers model needs a path")
            if self.upstreams:
                raise ValueError(f'model {self.id!r}: upstreams are for engine = "remote"')
            return self
        if not self.upstreams:
            raise ValueError(f"model {self.id!r}: a remote model needs upstreams = [...]")
        self.upstreams = [_base_url(self.id, url) for url in self.upstreams]
        if len(set(self.upstreams)) != len(self.upstreams):
            raise ValueError(f"model {self.id!r}: an upstream is listed twice")
        if self.upstream_key and self.upstream_key_env:
            raise ValueError(f"model {self.id!r}: set upstream_key or upstream_key_env, not both")
        if self.first_byte_timeout > self.total_timeout:
            raise ValueError(f"model {self.id!r}: first_byte_timeout exceeds total_timeout")
        return self

    def resolved_upstream_key(self, env: Mapping[str, str] | None = None) -> str | None:
        """The key sent upstream: `upstream_key`, or the variable `upstream_key_env` names."""
        if self.upstream_key_env is None:
            return self.upstream_key
        value = (os.environ if env is None else env).get(self.upstream_key_env)
        if not value:
            raise ConfigError(
                f"model {self.id!r}: the environment variable {self.upstream_key_env} "
                "(upstream_key_env) is not set"
            )
        return value


def _base_url(model_id: str, url: str) -> str:
    """An upstream's base URL, as given with or without `/v1`: `http://host:port[/prefix]`."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"model {model_id!r}: upstream {url!r} is not an http(s) URL")
    base = url.rstrip("/")
    return base.removesuffix("/v1")


# how far a usage row is written before its answer goes out (oculo.accounts.ledger)
LedgerSync = Literal["full", "deferred"]


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys: list[str] = Field(default_factory=list)
    max_body_bytes: int = Field(default=MAX_BODY_BYTES, ge=1024)
    max_images: int = Field(default=2, ge=0)
    max_pixels: int = Field(default=40_000_000, ge=1)
    max_concurrent_requests: int = Field(default=64, ge=1)
    data_dir: str | None = None
    database_url: str | None = None
    redis_url: str | None = None
    ledger_sync: LedgerSync = "full"  # see oculo.accounts.ledger
    models: list[ModelSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_ids(self) -> Settings:
        seen: set[str] = set()
        for spec in self.models:
            if spec.id in seen:
                raise ValueError(f"model id {spec.id!r} appears twice in the catalog")
            seen.add(spec.id)
        return self


_ENV_FIELDS: dict[str, str] = {
    "OCULO_HOST": "host",
    "OCULO_PORT": "port",
    "OCULO_MAX_IMAGES": "max_images",
    "OCULO_MAX_PIXELS": "max_pixels",
    "OCULO_MAX_CONCURRENT_REQUESTS": "max_concurrent_requests",
    "OCULO_DATA_DIR": "data_dir",
    "OCULO_DATABASE_URL": "database_url",
    "OCULO_REDIS_URL": "redis_url",
    "OCULO_LEDGER_SYNC": "ledger_sync",
}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    out: dict[str, Any] = dict(data.get("server", {}))
    if "models" in data:
        out["models"] = data["models"]
    unknown = set(data) - {"server", "models"}
    if unknown:
        raise ConfigError(f"config file {path}: unknown sections {sorted(unknown)}")
    return out


def load_settings(
    config_file: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge defaults < TOML file < environment < explicit overrides (flags)."""
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    if config_file is not None:
        merged.update(_read_toml(config_file))
    for var, field in _ENV_FIELDS.items():
        if env.get(var):
            merged[field] = env[var]
    if env.get("OCULO_API_KEYS"):
        merged["api_keys"] = [k.strip() for k in env["OCULO_API_KEYS"].split(",") if k.strip()]
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"invalid setting {where}: {first['msg']}") from None


def model_from_path(path_or_id: str, *, model_id: str | None = None) -> ModelSpec:
    """The catalog entry for `oculo serve --model PATH_OR_ID`."""
    folder = Path(path_or_id).expanduser()
    name = model_id or (folder.name if folder.exists() else path_or_id)
    path = str(folder.resolve()) if folder.exists() else path_or_id
    return ModelSpec(id=name, path=path)
