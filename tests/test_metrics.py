"""GET /metrics: Prometheus text whose traffic, token and latency counters move as they should."""

from __future__ import annotations

from conftest import Server, png_uri
from prometheus_client.parser import text_string_to_metric_families


def scrape(server: Server) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with server.client() as client:
        r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_completions_tokens_and_errors(server: Server) -> None:
    before = scrape(server)
    body = {
        "model": "tiny-llava",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png_uri(840, 560)}},
                    {"type": "text", "text": "What is in this image?"},
                ],
            }
        ],
        "max_tokens": 3,
    }
    with server.client() as client:
        ok = client.post("/v1/chat/completions", json=body).json()
        assert client.post("/v1/chat/completions", content=b"x" * 1_100_000).status_code == 413
        assert (
            client.post("/v1/chat/completions", json={**body, "model": "nope"}).status_code == 404
        )
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("oculo_image_tokens_total", model="tiny-llava") == 2402
    assert delta("oculo_prompt_tokens_total", model="tiny-llava") == ok["usage"]["prompt_tokens"]
    assert (
        delta("oculo_completion_tokens_total", model="tiny-llava")
        == ok["usage"]["completion_tokens"]
    )
    assert delta("oculo_engine_image_positions_total", model="tiny-llava") > 0
    finish = ok["choices"][0]["finish_reason"]
    assert (
        delta("oculo_completions_total", model="tiny-llava", finish_reason=finish, stream="false")
        == 1
    )
    route = "/v1/chat/completions"
    assert delta("oculo_http_requests_total", method="POST", route=route, status="413") == 1
    assert delta("oculo_http_requests_total", method="POST", route=route, status="404") == 1
    assert delta("oculo_errors_total", code="model_not_found") == 1
    assert delta("oculo_time_to_first_token_seconds_count", model="tiny-llava") == 1
    assert value(after, "oculo_requests_in_flight") == 0
