"""Two oculo processes on one PostgreSQL and one Redis share keys, revocations and limits."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    Server,
    oculo_cli,
    one_model,
    png_uri,
    postgres_database,
    start_server,
    stop_server,
)


@pytest.fixture
def fleet(
    checkpoints: dict[str, Path], tmp_path: Path, redis_url: str
) -> Iterator[tuple[Server, Server, dict[str, str]]]:
    with postgres_database() as database_url:
        env = {"OCULO_DATABASE_URL": database_url, "OCULO_REDIS_URL": redis_url}
        servers: list[Server] = []
        try:
            for name in ("a", "b"):
                workdir = tmp_path / name
                workdir.mkdir()
                servers.append(start_server(one_model(checkpoints), workdir, env))
            yield servers[0], servers[1], env
        finally:
            for server in servers:
                stop_server(server)


def ask(server: Server, key: str) -> httpx.Response:
    body: dict[str, Any] = {
        "model": "tiny",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png_uri()}},
                    {"type": "text", "text": "What is in this image?"},
                ],
            }
        ],
        "max_tokens": 2,
    }
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(server.v1 + "/chat/completions", json=body, headers=headers, timeout=60)


def create_key(env: dict[str, str], *args: str) -> str:
    key = oculo_cli("keys", "create", *args, env=env).stdout.strip()
    assert key.startswith("sk-oculo-")
    return key


def test_two_processes_share_keys_revocations_and_limits(
    fleet: tuple[Server, Server, dict[str, str]],
) -> None:
    a, b, env = fleet
    # a key made after both started works on both, and its limit is one limit
    shared = create_key(env, "--name", "shared", "--rpm", "2")
    first, second, third = ask(a, shared), ask(b, shared), ask(a, shared)
    assert [first.status_code, second.status_code, third.status_code] == [200, 200, 429]
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert third.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(third.headers["retry-after"]) >= 1
    assert ask(b, shared).status_code == 429

    # a revocation on the shared database is seen by both on their next request
    doomed = create_key(env, "--name", "doomed")
    assert ask(a, doomed).status_code == 200 and ask(b, doomed).status_code == 200
    keys = json.loads(oculo_cli("keys", "list", "--json", env=env).stdout)
    doomed_id = next(k["id"] for k in keys if k["name"] == "doomed")
    oculo_cli("keys", "revoke", doomed_id, env=env)
    assert ask(a, doomed).status_code == 401 and ask(b, doomed).status_code == 401

    # both processes wrote to the one ledger
    usage = json.loads(oculo_cli("usage", "--json", env=env).stdout)
    by_key = {line["key_id"]: line["requests"] for line in usage}
    assert by_key[doomed_id] == 2
    assert sum(by_key.values()) == 4
    for server in (a, b):
        log = server.log()
        for key in (shared, doomed):
            assert key not in log and key.split("_", 1)[1] not in log
