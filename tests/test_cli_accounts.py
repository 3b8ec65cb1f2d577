"""`oculo keys ...`, `oculo usage` and the first start's key, against a fresh SQLite data folder."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from oculo import cli
from oculo.accounts.ledger import Ledger, UsageRecord
from oculo.accounts.store import open_store
from oculo.config import Settings


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OCULO_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("OCULO_DATABASE_URL", raising=False)
    monkeypatch.delenv("OCULO_API_KEYS", raising=False)
    return tmp_path


def run(*args: str) -> tuple[str, str]:
    result = CliRunner().invoke(cli.app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout, result.stderr


def test_first_start_makes_one_key_and_later_starts_do_not(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(data_dir=str(data))
    cli._prepare_store(settings)
    first = capsys.readouterr()
    [line] = [x for x in first.out.splitlines() if x.startswith("export INFERENCE_API_KEY=")]
    key = line.removeprefix("export INFERENCE_API_KEY=")
    assert key.startswith("sk-oculo-")
    cli._prepare_store(settings)
    second = capsys.readouterr()
    assert "INFERENCE_API_KEY" not in second.out + second.err
    assert "oculo keys create" in second.err
    stored = (data / "oculo.db").read_bytes()
    assert key.encode() not in stored and key.split("_", 1)[1].encode() not in stored
    listed = json.loads(run("keys", "list", "--json")[0])
    assert [k["name"] for k in listed] == ["default"] and key.startswith(
        "sk-oculo-" + listed[0]["id"]
    )


def test_configured_keys_mean_no_generated_key(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli._prepare_store(Settings(data_dir=str(data), api_keys=["sk-mine"]))
    assert "INFERENCE_API_KEY" not in capsys.readouterr().out
    assert json.loads(run("keys", "list", "--json")[0]) == []


def test_keys_create_list_revoke(data: Path) -> None:
    out, err = run(
        "keys", "create", "--name", "team", "--models", "a,b", "--models", "c",
        "--rpm", "2", "--tpm", "1000", "--expires", "2099-01-31",
    )  # fmt: skip
    key = out.strip()
    assert key.startswith("sk-oculo-") and "shown only now" in err
    [info] = json.loads(run("keys", "list", "--json")[0])
    assert info["name"] == "team" and info["models"] == ["a", "b", "c"]
    assert (info["rpm"], info["tpm"], info["active"]) == (2, 1000, True)
    assert info["expires_at"].startswith("2099-01-31T00:00:00")
    table = run("keys", "list")[0]
    assert info["id"] in table and "team" in table and key not in table
    assert key.split("_", 1)[1] not in table
    run("keys", "revoke", info["id"])
    [after] = json.loads(run("keys", "list", "--json")[0])
    assert after["revoked_at"] is not None and not after["active"]
    assert "revoked" in run("keys", "list")[0]
    missing = CliRunner().invoke(cli.app, ["keys", "revoke", "000000000000"])
    assert missing.exit_code == 1
    bad = CliRunner().invoke(cli.app, ["keys", "create", "--name", "x", "--expires", "soon"])
    assert bad.exit_code == 2


def test_usage_table_and_json(data: Path) -> None:
    async def fill() -> None:
        engine = await open_store(None, str(data))
        ledger = Ledger(engine)
        for i, (key_id, model) in enumerate([("k1", "m"), ("k1", "m"), ("k2", "n")]):
            await ledger.record(
                UsageRecord(
                    request_id=f"r{i}", key_id=key_id, model=model, text_tokens=10,
                    image_tokens=1601, image_positions=64, completion_tokens=5, status=200,
                    error_code=None, latency_ms=3.0, stream=False, created_at=datetime.now(UTC),
                )
            )  # fmt: skip
        await engine.dispose()

    import asyncio

    asyncio.run(fill())
    lines = json.loads(run("usage", "--json")[0])
    assert [(x["key_id"], x["model"], x["requests"]) for x in lines] == [
        ("k1", "m", 2),
        ("k2", "n", 1),
    ]
    assert lines[0]["prompt_tokens"] == 2 * 1611 and lines[0]["total_tokens"] == 2 * 1616
    only = json.loads(run("usage", "--key", "k2", "--json")[0])
    assert [x["key_id"] for x in only] == ["k2"]
    assert json.loads(run("usage", "--since", "2999-01-01", "--json")[0]) == []
    table = run("usage")[0]
    assert "k1" in table and "3222" in table
    with sqlite3.connect(data / "oculo.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
