"""GET /health (the process answers) and GET /ready (every model is loaded)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from oculo.api.responses import JSONResponse

router = APIRouter()


@router.get("/health")
async def health() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    registry = request.app.state.registry
    body = {
        "status": "ready" if registry.ready else "loading",
        "models": {model_id: registry.status(model_id) for model_id in registry.ids},
    }
    return JSONResponse(body, status_code=200 if registry.ready else 503)
