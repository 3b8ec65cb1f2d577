"""The chat API end to end: the real openai package against a live server on loopback."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import httpx
import pytest
from conftest import API_KEY, ARCHS, Server, data_uri, make_image, png_uri

SYSTEM = "You are a helpful assistant that can answer questions about the image."


def seed_messages(uri: str, question: str = "What is in this image?") -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": uri}},
                {"type": "text", "text": question},
            ],
        },
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_seed_python_example(openai_client: Any, arch: str, schemas: Any) -> None:
    completion = openai_client.chat.completions.create(
        model=f"tiny-{arch}", messages=seed_messages(png_uri(64, 48))
    )
    choice = completion.choices[0]
    assert isinstance(choice.message.content, str)
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.prompt_tokens_details.image_tokens == 1601
    assert usage.prompt_tokens > 1601  # text tokens by the tokenizer on top of the image's
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == f"tiny-{arch}"
    schemas(completion.model_dump(exclude_unset=True), "CreateChatCompletionResponse")


def test_raw_response_validates_against_openai_schema(server: Server, schemas: Any) -> None:
    with server.client() as client:
        body = {"model": "tiny-idefics3", "messages": seed_messages(png_uri())}
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    schemas(r.json(), "CreateChatCompletionResponse")


def test_two_images_and_text_only(openai_client: Any) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare these."},
                {"type": "image_url", "image_url": {"url": png_uri(840, 560)}},
                {"type": "image_url", "image_url": {"url": png_uri(32, 32, "red")}},
            ],
        }
    ]
    completion = openai_client.chat.completions.create(model="tiny-gemma3", messages=messages)
    assert completion.usage.prompt_tokens_details.image_tokens == 2402 + 1601
    text_only = openai_client.chat.completions.create(
        model="tiny-llava", messages=[{"role": "user", "content": "Hello there"}]
    )
    assert text_only.usage.prompt_tokens_details.image_tokens == 0
    assert text_only.usage.prompt_tokens > 0


@pytest.mark.parametrize(
    ("width", "height", "tokens"),
    [(32, 32, 1601), (560, 560, 1601), (840, 560, 2402), (1120, 1120, 6404), (3000, 3000, 6404)],
)
def test_token_table(openai_client: Any, width: int, height: int, tokens: int) -> None:
    image = make_image(width, height, "JPEG" if width > 1000 else "PNG")
    uri = data_uri(image, "image/jpeg")
    completion = openai_client.chat.completions.create(
        model="tiny-idefics3", messages=seed_messages(uri), max_tokens=2
    )
    assert completion.usage.prompt_tokens_details.image_tokens == tokens
    # The same text with no image: the difference is exactly the image's tokens.
    bare = openai_client.chat.completions.create(
        model="tiny-idefics3",
        messages=[
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "text", "text": "What is in this image?"}]},
        ],
        max_tokens=2,
    )
    assert completion.usage.prompt_tokens - bare.usage.prompt_tokens == tokens


def test_detail_low_bills_one_tile(openai_client: Any) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": png_uri(1120, 1120), "detail": "low"}},
                {"type": "text", "text": "What is this?"},
            ],
        }
    ]
    completion = openai_client.chat.completions.create(
        model="tiny-idefics3", messages=messages, max_tokens=2
    )
    assert completion.usage.prompt_tokens_details.image_tokens == 1601


@pytest.mark.parametrize("arch", ARCHS)
def test_streaming_with_usage(openai_client: Any, server: Server, arch: str, schemas: Any) -> None:
    model = f"tiny-{arch}"
    whole = openai_client.chat.completions.create(
        model=model, messages=seed_messages(png_uri()), temperature=0, max_tokens=12
    )
    stream = openai_client.chat.completions.create(
        model=model,
        messages=seed_messages(png_uri()),
        temperature=0,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # greedy: streamed == whole
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1
    assert finishing[0].choices[0].finish_reason == whole.choices[0].finish_reason
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.model_dump() == whole.usage.model_dump()
    assert len({c.id for c in chunks}) == 1


def test_raw_sse_framing_and_schemas(server: Server, schemas: Any) -> None:
    body = {
        "model": "tiny-idefics3",
        "messages": seed_messages(png_uri()),
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 5,
    }
    with server.client() as client, client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    for payload in payloads:
        schemas(payload, "CreateChatCompletionStreamResponse")
    assert payloads[-1]["usage"]["prompt_tokens_details"]["image_tokens"] == 1601


def test_stream_without_usage_has_no_usage_chunk(openai_client: Any) -> None:
    chunks = list(
        openai_client.chat.completions.create(
            model="tiny-idefics3", messages=seed_messages(png_uri()), max_tokens=4, stream=True
        )
    )
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_sampling_parameters(openai_client: Any) -> None:
    def ask(**kw: Any) -> Any:
        return openai_client.chat.completions.create(
            model="tiny-idefics3", messages=seed_messages(png_uri()), **kw
        )

    a = ask(temperature=1.0, seed=7, max_tokens=10)
    b = ask(temperature=1.0, seed=7, max_tokens=10)
    assert a.choices[0].message.content == b.choices[0].message.content
    short = ask(temperature=0, max_completion_tokens=3)
    assert short.usage.completion_tokens <= 3
    if short.usage.completion_tokens == 3:
        assert short.choices[0].finish_reason == "length"
    full = ask(temperature=0, max_tokens=12).choices[0].message.content
    if len(full) > 4:
        stop = full[2:4]
        cut = ask(temperature=0, max_tokens=12, stop=[stop]).choices[0].message.content
        assert stop not in cut
        assert full.startswith(cut)
    ok = ask(
        temperature=0.7, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5, n=1, user="u1"
    )
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_models_endpoints(server: Server, schemas: Any) -> None:
    with server.client() as client:
        listing = client.get("/v1/models")
        assert listing.status_code == 200
        body = listing.json()
        schemas(body, "ListModelsResponse")
        ids = [m["id"] for m in body["data"]]
        assert ids[:3] == ["tiny-idefics3", "tiny-gemma3", "tiny-llava"]
        first = body["data"][0]
        assert first["status"] == "ready"
        assert first["limits"]["max_images"] == 2
        assert first["context_length"] > 0
        one = client.get("/v1/models/tiny-gemma3")
        assert one.status_code == 200
        schemas(one.json(), "Model")
        assert one.json()["id"] == "tiny-gemma3"
        broken = client.get("/v1/models/broken").json()
        assert broken["status"] == "failed"


def test_openai_models_list(openai_client: Any) -> None:
    ids = {m.id for m in openai_client.models.list()}
    assert {"tiny-idefics3", "tiny-gemma3", "tiny-llava"} <= ids


def test_health_and_ready(server: Server) -> None:
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}
    ready = httpx.get(server.base_url + "/ready")
    # One catalog entry points at a folder that does not exist: the server is honest about it.
    assert ready.status_code == 503
    assert ready.json()["models"]["tiny-idefics3"] == "ready"
    assert ready.json()["models"]["broken"] == "failed"


def test_seed_curl_example(server: Server, tmp_path: Any) -> None:
    image = tmp_path / "image.png"
    image.write_bytes(make_image(64, 64))
    script = f"""
DATA_URI="data:image/png;base64,$(base64 -w0 {image})"
curl -s {server.v1}/chat/completions \\
  -H "Authorization: Bearer $INFERENCE_API_KEY" \\
  -H "Content-Type: application/json" \\
  -d '{{
    "model": "tiny-idefics3",
    "messages": [
      {{
        "role": "system",
        "content": "You are a helpful assistant that can answer questions about the image."
      }},
      {{
        "role": "user",
        "content": [
          {{
            "type": "image_url",
            "image_url": {{ "url": "'"$DATA_URI"'" }}
          }},
          {{
            "type": "text",
            "text": "What is in this image?"
          }}
        ]
      }}
    ]
  }}'
"""
    out = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        env={"INFERENCE_API_KEY": API_KEY, "PATH": "/usr/bin:/bin"},
        check=True,
    )
    body = json.loads(out.stdout)
    assert body["object"] == "chat.completion"
    assert body["usage"]["prompt_tokens_details"]["image_tokens"] == 1601


def test_client_leaving_a_stream_stops_generation(server: Server) -> None:
    body = {
        "model": "tiny-gemma3",
        "messages": seed_messages(png_uri()),
        "stream": True,
        "max_tokens": 1_000,
        "temperature": 1.0,
        "ignore_eos": True,  # the random model would otherwise end some answers at once
    }
    before = server.log().count("stream ended early")
    with server.client() as client, client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        next(r.iter_raw())
    deadline = time.monotonic() + 20
    while server.log().count("stream ended early") == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.log().count("stream ended early") == before + 1
    # The engine is free again: a new request is answered at once.
    with server.client() as client:
        r = client.post(
            "/v1/chat/completions",
            json={"model": "tiny-gemma3", "messages": seed_messages(png_uri()), "max_tokens": 2},
        )
    assert r.status_code == 200
