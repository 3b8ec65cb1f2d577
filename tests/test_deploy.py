"""deploy/: the compose file validates, its catalog loads, every setting it uses is documented."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from oculo.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if os.environ.get("CI") == "true":
        pytest.fail("docker-compose must be installed in CI (.ci/run installs it)")
    pytest.skip("neither docker-compose nor the docker compose plugin is installed")


def config(env_file: Path | None) -> subprocess.CompletedProcess[str]:
    args = [*compose_command(), "-f", str(DEPLOY / "compose.yaml")]
    if env_file is not None:
        args += ["--env-file", str(env_file)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "VLLM_"))}
    return subprocess.run([*args, "config"], capture_output=True, text=True, env=clean, timeout=60)


def test_the_compose_file_validates(tmp_path: Path) -> None:
    done = config(DEPLOY / ".env.example")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for service in ("lb", "oculo-1", "oculo-2", "postgres", "redis", "vllm-a", "vllm-b"):
        assert re.search(rf"^  {service}:$", out, re.M), service
    assert out.count("driver: nvidia") == 2
    assert "postgresql://oculo:change-me@postgres:5432/oculo" in out
    # without the secrets it refuses, and says which one
    empty = tmp_path / "empty.env"
    empty.write_text("")
    refused = config(empty)
    assert refused.returncode != 0
    assert "POSTGRES_PASSWORD" in refused.stderr or "VLLM_API_KEY" in refused.stderr


def test_the_catalog_is_one_oculo_loads() -> None:
    settings = load_settings(DEPLOY / "oculo.toml", env={})
    (model,) = settings.models
    assert model.engine == "remote"
    assert model.upstreams == ["http://vllm-a:8000", "http://vllm-b:8000"]
    assert model.resolved_upstream_key({"VLLM_API_KEY": "k"}) == "k"
    compose = (DEPLOY / "compose.yaml").read_text()
    assert f"--served-model-name={model.upstream_model}" in compose
    assert f"--max-model-len={model.context_length}" in compose


def test_every_setting_the_deployment_uses_is_documented() -> None:
    used = set()
    for name in ("compose.yaml", "Dockerfile", ".env.example"):
        used |= set(re.findall(r"\b(OCULO_[A-Z_]+)\b", (DEPLOY / name).read_text()))
    assert {"OCULO_DATABASE_URL", "OCULO_REDIS_URL", "OCULO_HOST"} <= used
    readme = (ROOT / "README.md").read_text()
    page = (DEPLOY / "README.md").read_text()
    for variable in sorted(used):
        if variable == "OCULO_PUBLIC_PORT":  # compose's own, not oculo's
            assert variable in page
            continue
        assert variable in readme, f"{variable} is not in README.md"
        assert variable in page, f"{variable} is not in deploy/README.md"
    for variable in ("POSTGRES_PASSWORD", "VLLM_API_KEY", "HF_TOKEN"):
        assert variable in page
    # every key of the deployed catalog entry is described in the README
    catalog = (DEPLOY / "oculo.toml").read_text()
    keys = set(re.findall(r"^(\w+) =", catalog, re.M))
    for key in sorted(keys):
        assert f"`{key}`" in readme or f"{key} =" in readme, f"catalog key {key} not in README"
