"""GET /v1/models and /v1/models/{id}: OpenAI's list shape, plus each model's limits."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from oculo.accounts.keys import Account
from oculo.api.auth import authenticate
from oculo.api.responses import JSONResponse
from oculo.config import ModelSpec
from oculo.errors import PermissionDenied
from oculo.media import MAX_IMAGE_TOKENS, TILE, TOKENS_PER_TILE
from oculo.policy import Limits
from oculo.protocol import ModelCard, ModelList

router = APIRouter()


def _card(request: Request, spec: ModelSpec) -> ModelCard:
    registry = request.app.state.registry
    limits: Limits = request.app.state.limits
    engine = registry.engine_or_none(spec.id)
    info = engine.info if engine is not None else None
    return ModelCard.model_validate(
        {
            "id": spec.id,
            "created": info.created if info else 0,
            "owned_by": spec.owned_by,
            **(info.extra if info else {}),
            # oculo's additions to OpenAI's Model object:
            "engine": spec.engine,
            "status": registry.status(spec.id),
            "description": spec.description or (info.description if info else ""),
            "context_length": info.context_length if info else spec.context_length,
            "limits": {
                "max_images": limits.max_images,
                "max_pixels": limits.max_pixels,
                "max_body_bytes": request.app.state.settings.max_body_bytes,
                "image_formats": ["webp", "png", "gif", "jpeg"],
                "image_tokens": {
                    "per_tile": TOKENS_PER_TILE,
                    "max": MAX_IMAGE_TOKENS,
                    "tile": TILE,
                },
            },
        }
    )


@router.get("/v1/models")
async def list_models(request: Request, account: Account = Depends(authenticate)) -> JSONResponse:
    specs = [spec for spec in request.app.state.registry.specs if account.may_use(spec.id)]
    return JSONResponse(ModelList(data=[_card(request, spec) for spec in specs]))


@router.get("/v1/models/{model_id:path}")
async def get_model(
    model_id: str, request: Request, account: Account = Depends(authenticate)
) -> JSONResponse:
    spec = request.app.state.registry.spec(model_id)
    if not account.may_use(spec.id):
        raise PermissionDenied(f"This API key may not use the model '{spec.id}'.", param="model")
    return JSONResponse(_card(request, spec))
