"""Every row of DESIGN.md's error table against a live server: status, type, code and param."""

from __future__ import annotations

import json
import re
import socket
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import API_KEY, Server, data_uri, make_image, png_uri

URL_PARAM = "messages[1].content[0].image_url.url"


def image_request(url: str, model: str = "tiny-idefics3", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": "You answer questions about images."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "What is in this image?"},
                ],
            },
        ],
        "max_tokens": 4,
        **extra,
    }


def check_error(
    r: httpx.Response,
    status: int,
    type_: str,
    code: str,
    param: str | None = None,
    schemas: Any = None,
) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    error = body["error"]
    assert error["type"] == type_, error
    assert error["code"] == code, error
    assert error["param"] == param, error
    assert error["message"]
    assert not re.search(r"[A-Za-z0-9+/]{40,}", error["message"]), "echoes base64"
    if schemas is not None:
        schemas(body, "ErrorResponse")
    return dict(error)


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def post(client: httpx.Client, body: Any) -> httpx.Response:
    return client.post("/v1/chat/completions", json=body)


# -- 400 invalid_json / invalid_value --------------------------------------------------------


def test_body_not_json(client: httpx.Client, schemas: Any) -> None:
    r = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    check_error(r, 400, "invalid_request_error", "invalid_json", schemas=schemas)
    r = client.post("/v1/chat/completions", content=b"[1, 2]")
    check_error(r, 400, "invalid_request_error", "invalid_json")


@pytest.mark.parametrize(
    ("mutate", "param"),
    [
        (lambda b: b.pop("model"), "model"),
        (lambda b: b.update(messages=[]), "messages"),
        (lambda b: b.update(temperature=5), "temperature"),
        (lambda b: b.update(top_p=0), "top_p"),
        (lambda b: b.update(max_tokens=0), "max_tokens"),
        (lambda b: b.update(stream="yes please"), "stream"),
        (lambda b: b.update(stop=["a", "b", "c", "d", "e"]), "stop"),
        (lambda b: b["messages"][1].update(role="wizard"), "messages[1].role"),
        (lambda b: b["messages"][1].update(content=42), "messages[1].content"),
        (
            lambda b: b["messages"][1]["content"][0].update(type="input_audio"),
            "messages[1].content[0].type",
        ),
        (lambda b: b["messages"][1]["content"][0]["image_url"].pop("url"), URL_PARAM),
        (lambda b: b["messages"][1]["content"][0]["image_url"].update(url=7), URL_PARAM),
        (
            lambda b: b["messages"][1]["content"][0]["image_url"].update(detail="ultra"),
            "messages[1].content[0].image_url.detail",
        ),
        (lambda b: b["messages"][1]["content"][1].update(text=None), "messages[1].content[1].text"),
    ],
)
def test_wrong_shape_names_the_field(
    client: httpx.Client, mutate: Any, param: str, schemas: Any
) -> None:
    body = image_request(png_uri())
    mutate(body)
    check_error(post(client, body), 400, "invalid_request_error", "invalid_value", param, schemas)


def test_image_outside_user_message(client: httpx.Client) -> None:
    body = image_request(png_uri())
    body["messages"][0]["content"] = [{"type": "image_url", "image_url": {"url": png_uri()}}]
    check_error(
        post(client, body), 400, "invalid_request_error", "invalid_value", "messages[0].content[0]"
    )


def test_n_other_than_one_is_refused(client: httpx.Client) -> None:
    r = post(client, image_request(png_uri(), n=2))
    check_error(r, 400, "invalid_request_error", "unsupported_parameter", "n")


# -- images ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://upload.wikimedia.org/wikipedia/commons/3/3f/Crystal_Project_bug.png",
        "http://example.com/cat.png",
        "ftp://example.com/cat.png",
        "file:///etc/passwd",
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB",
    ],
)
def test_remote_url_is_not_supported(client: httpx.Client, url: str, schemas: Any) -> None:
    r = post(client, image_request(url))
    error = check_error(
        r, 400, "invalid_request_error", "image_url_not_supported", URL_PARAM, schemas
    )
    assert "data URI" in error["message"]


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png,rawbytesnotbase64",
        "data:image/png;base64,iVBORw0KGgo!!!notbase64",
        "data:image/png;base64,iVBORw0KGgoA",  # bad padding
        "data:image/png;base64,",
    ],
)
def test_bad_data_uri_is_invalid_image(client: httpx.Client, url: str) -> None:
    check_error(
        post(client, image_request(url)), 400, "invalid_request_error", "invalid_image", URL_PARAM
    )


def test_format_is_judged_by_bytes(client: httpx.Client) -> None:
    bmp = make_image(16, 16, "BMP")
    r = post(client, image_request(data_uri(bmp, "image/png")))
    check_error(r, 400, "invalid_request_error", "unsupported_image_format", URL_PARAM)
    tiff = make_image(16, 16, "TIFF")
    r = post(client, image_request(data_uri(tiff, "image/jpeg")))
    check_error(r, 400, "invalid_request_error", "unsupported_image_format", URL_PARAM)
    # Declared png, really a jpeg: accepted, because the bytes are a supported format.
    jpeg = make_image(16, 16, "JPEG")
    assert post(client, image_request(data_uri(jpeg, "image/png"))).status_code == 200


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_undecodable_and_over_the_pixel_cap(client: httpx.Client) -> None:
    broken = make_image(64, 64)[:-40]  # truncated PNG
    check_error(
        post(client, image_request(data_uri(broken))),
        400,
        "invalid_request_error",
        "invalid_image",
        URL_PARAM,
    )
    bomb = _png_claiming(50_000, 50_000)  # 2.5 gigapixels in a few dozen bytes
    r = post(client, image_request(data_uri(bomb)))
    error = check_error(r, 400, "invalid_request_error", "invalid_image", URL_PARAM)
    assert "50000" in error["message"].replace(",", "")


def test_second_image_error_names_its_position(client: httpx.Client) -> None:
    body = image_request(png_uri())
    body["messages"][1]["content"].append(
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    )
    check_error(
        post(client, body),
        400,
        "invalid_request_error",
        "image_url_not_supported",
        "messages[1].content[2].image_url.url",
    )


def test_more_than_two_images(client: httpx.Client, schemas: Any) -> None:
    body = image_request(png_uri())
    body["messages"][1]["content"] += [
        {"type": "image_url", "image_url": {"url": png_uri()}},
        {"type": "image_url", "image_url": {"url": png_uri()}},
    ]
    r = post(client, body)
    check_error(r, 400, "invalid_request_error", "too_many_images", "messages", schemas)
    # Images spread over several user messages count together.
    body = image_request(png_uri())
    body["messages"].append({"role": "assistant", "content": "Noted."})
    body["messages"].append(
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_uri()}}] * 2}
    )
    check_error(post(client, body), 400, "invalid_request_error", "too_many_images", "messages")


# -- 413 -------------------------------------------------------------------------------------


def _padded_body(total: int) -> bytes:
    body = json.dumps(image_request(png_uri(), user="")).encode()
    pad = total - len(body)
    return body.replace(b'"user": ""', b'"user": "' + b"x" * pad + b'"')


def test_body_of_one_mebibyte_is_refused(client: httpx.Client, schemas: Any) -> None:
    under = _padded_body(1_048_575)
    assert len(under) == 1_048_575
    assert post_bytes(client, under).status_code == 200
    at = _padded_body(1_048_576)
    assert len(at) == 1_048_576
    r = post_bytes(client, at)
    check_error(r, 413, "invalid_request_error", "request_too_large", None, schemas)


def post_bytes(client: httpx.Client, body: bytes) -> httpx.Response:
    return client.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )


def test_chunked_body_is_refused_while_it_streams(server: Server) -> None:
    """1 MiB sent chunked with no Content-Length: 413 once the count crosses the limit."""
    body = _padded_body(1_048_576)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 64 * 1024):
            yield body[i : i + 64 * 1024]

    with server.client() as client:
        r = client.post("/v1/chat/completions", content=chunks())
    assert "content-length" not in r.request.headers
    check_error(r, 413, "invalid_request_error", "request_too_large")


def test_oversized_declared_length_is_refused_before_the_body(server: Server) -> None:
    """A Content-Length of 5 MB is refused at once; the server never waits for those bytes."""
    port = int(server.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 5000000\r\n\r\n{"
        )
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = s.recv(65536)
            if not data:
                break
            reply += data
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert json.loads(payload)["error"]["code"] == "request_too_large"


# -- 401 / 404 / 503 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer sk-wrong"},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": "Bearer"},
    ],
)
def test_missing_or_wrong_key(server: Server, headers: dict[str, str], schemas: Any) -> None:
    r = httpx.post(server.v1 + "/chat/completions", json=image_request(png_uri()), headers=headers)
    error = check_error(r, 401, "authentication_error", "invalid_api_key", None, schemas)
    assert API_KEY not in error["message"]
    r = httpx.get(server.v1 + "/models", headers=headers)
    check_error(r, 401, "authentication_error", "invalid_api_key")


def test_unknown_model_names_the_models(client: httpx.Client, schemas: Any) -> None:
    r = post(client, image_request(png_uri(), model="gpt-5-vision"))
    error = check_error(r, 404, "invalid_request_error", "model_not_found", "model", schemas)
    assert "tiny-idefics3" in error["message"] and "gpt-5-vision" in error["message"]
    check_error(
        client.get("/v1/models/gpt-5-vision"),
        404,
        "invalid_request_error",
        "model_not_found",
        "model",
    )


def test_model_that_failed_to_load(client: httpx.Client, schemas: Any) -> None:
    r = post(client, image_request(png_uri(), model="broken"))
    check_error(r, 503, "server_error", "engine_unavailable", "model", schemas)


def test_context_length_exceeded(client: httpx.Client, schemas: Any) -> None:
    body = image_request(png_uri(), model="tiny-context")
    body["messages"][1]["content"][1]["text"] = "describe every detail " * 40
    r = post(client, body)
    check_error(r, 400, "invalid_request_error", "context_length_exceeded", "messages", schemas)
    body["stream"] = True  # the same, before any event is sent
    check_error(
        post(client, body), 400, "invalid_request_error", "context_length_exceeded", "messages"
    )


def test_unknown_route_and_method(client: httpx.Client) -> None:
    check_error(client.get("/v1/nothing"), 404, "invalid_request_error", "not_found")
    check_error(
        client.get("/v1/chat/completions"), 405, "invalid_request_error", "method_not_allowed"
    )


def test_openai_sdk_raises_typed_errors(openai_client: Any) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as bad:
        openai_client.chat.completions.create(
            model="tiny-idefics3",
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "https://a/b.png"}}],
                }
            ],
        )
    assert bad.value.code == "image_url_not_supported"
    assert bad.value.param == "messages[0].content[0].image_url.url"
    with pytest.raises(openai.NotFoundError):
        openai_client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "hi"}]
        )
