"""What the upstream pools of remote models show: `GET /pool` (for `oculo models`) and the
`oculo_upstream_*` series on `/metrics`, both read from the pools at the moment they are asked."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from oculo.api.responses import JSONResponse
from oculo.engines.pool import UpstreamPool
from oculo.registry import ModelRegistry

router = APIRouter()


def pools(registry: ModelRegistry) -> list[tuple[str, UpstreamPool]]:
    """(model id, pool) for every loaded model that has one."""
    out = []
    for model_id in registry.ids:
        pool = getattr(registry.engine_or_none(model_id), "pool", None)
        if isinstance(pool, UpstreamPool):
            out.append((model_id, pool))
    return out


def snapshot(registry: ModelRegistry) -> list[dict[str, Any]]:
    """Every model of the catalog with its engine and, for remote ones, each upstream's state."""
    by_model = dict(pools(registry))
    models = []
    for spec in registry.specs:
        pool = by_model.get(spec.id)
        models.append(
            {
                "id": spec.id,
                "engine": spec.engine,
                "status": registry.status(spec.id),
                "upstream_model": spec.upstream_model or spec.id
                if spec.engine == "remote"
                else None,
                "retries": pool.counters.retries if pool else 0,
                "upstreams": [asdict(state) for state in pool.states()] if pool else [],
            }
        )
    return models


@router.get("/pool")
async def pool_state(request: Request) -> JSONResponse:
    return JSONResponse({"models": snapshot(request.app.state.registry)})


class UpstreamCollector(Collector):
    """The pools' counters and gauges as Prometheus series, labelled by model and upstream."""

    def __init__(self, source: Callable[[], list[tuple[str, UpstreamPool]]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "oculo_upstream_requests",
            "Requests sent to upstream servers, by outcome (ok, rejected, busy, error, "
            "timeout, cancelled).",
            labels=["model", "upstream", "outcome"],
        )
        outstanding = GaugeMetricFamily(
            "oculo_upstream_outstanding",
            "Requests in flight on each upstream.",
            labels=["model", "upstream"],
        )
        healthy = GaugeMetricFamily(
            "oculo_upstream_healthy",
            "1 when the upstream passes its health checks and is not ejected.",
            labels=["model", "upstream"],
        )
        ejections = CounterMetricFamily(
            "oculo_upstream_ejections",
            "Times an upstream was taken out of rotation after failures in a row.",
            labels=["model", "upstream"],
        )
        retries = CounterMetricFamily(
            "oculo_upstream_retries",
            "Requests retried on another upstream after a failure before the first byte.",
            labels=["model"],
        )
        for model, pool in self._source():
            for upstream, state in zip(pool.upstreams, pool.states(), strict=True):
                labels = [model, upstream.label]
                for outcome, count in state.requests.items():
                    requests.add_metric([*labels, outcome], count)
                outstanding.add_metric(labels, state.outstanding)
                healthy.add_metric(labels, 1.0 if state.healthy and not state.ejected else 0.0)
                ejections.add_metric(labels, state.ejections)
            retries.add_metric([model], pool.counters.retries)
        yield from (requests, outstanding, healthy, ejections, retries)
