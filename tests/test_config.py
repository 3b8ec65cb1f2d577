"""Settings: defaults < TOML < environment < flags; bad files are refused with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from oculo.config import ConfigError, load_settings, model_from_path


def test_defaults() -> None:
    s = load_settings(None, env={})
    assert (s.host, s.port, s.max_images, s.max_pixels) == ("127.0.0.1", 8000, 2, 40_000_000)
    assert s.max_body_bytes == 1_048_576
    assert s.api_keys == [] and s.models == []
    assert s.ledger_sync == "full"  # usage rows on disk before each answer


def test_file_env_and_flags_layer(tmp_path: Path) -> None:
    cfg = tmp_path / "oculo.toml"
    cfg.write_text(
        '[server]\nport = 9000\nmax_images = 1\napi_keys = ["a"]\n\n'
        '[[models]]\nid = "m1"\npath = "/models/m1"\ncontext_length = 4096\n'
    )
    s = load_settings(cfg, env={})
    assert s.port == 9000 and s.max_images == 1 and s.api_keys == ["a"]
    assert s.models[0].id == "m1" and s.models[0].context_length == 4096
    s = load_settings(cfg, env={"OCULO_PORT": "9100", "OCULO_API_KEYS": "x, y,"})
    assert s.port == 9100 and s.api_keys == ["x", "y"]
    assert load_settings(cfg, env={"OCULO_LEDGER_SYNC": "deferred"}).ledger_sync == "deferred"
    s = load_settings(cfg, env={"OCULO_PORT": "9100"}, overrides={"port": 9200, "host": None})
    assert s.port == 9200 and s.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[server\nport=1", "not valid TOML"),
        ("[server]\nport = -1", "port"),
        ("[server]\nbogus = 1", "bogus"),
        ("[extra]\nx = 1", "unknown sections"),
        ('[server]\nledger_sync = "sometimes"', "ledger_sync"),
        ('[[models]]\nid = "a"\npath = "p"\n[[models]]\nid = "a"\npath = "q"', "twice"),
        ('[[models]]\nid = "a"\npath = "p"\nengine = "magic"', "engine"),
    ],
)
def test_bad_config_is_refused_with_a_reason(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_settings(cfg, env={})


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(Path("/nonexistent/oculo.toml"), env={})


def test_model_from_path(tmp_path: Path) -> None:
    folder = tmp_path / "SmolVLM-256M-Instruct"
    folder.mkdir()
    assert model_from_path(str(folder)).id == "SmolVLM-256M-Instruct"
    assert model_from_path(str(folder), model_id="smol").id == "smol"
    hub = model_from_path("HuggingFaceTB/SmolVLM-256M-Instruct")
    assert hub.id == hub.path == "HuggingFaceTB/SmolVLM-256M-Instruct"
