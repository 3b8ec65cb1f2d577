"""GET /v1/usage: the calling key's own usage, by day and model."""

from __future__ import annotations

from datetime import date
from typing import Any

from fastapi import APIRouter, Depends, Request

from oculo.accounts.keys import Account
from oculo.accounts.ledger import Ledger, UsageTotal
from oculo.api.auth import authenticate
from oculo.api.responses import JSONResponse

router = APIRouter()


def _line(total: UsageTotal) -> dict[str, Any]:
    return {
        "date": total.day,
        "model": total.model,
        "requests": total.requests,
        "prompt_tokens": total.prompt_tokens,
        "image_tokens": total.image_tokens,
        "text_tokens": total.text_tokens,
        "completion_tokens": total.completion_tokens,
        "total_tokens": total.total_tokens,
    }


@router.get("/v1/usage")
async def get_usage(
    request: Request, since: date | None = None, account: Account = Depends(authenticate)
) -> JSONResponse:
    ledger: Ledger = request.app.state.ledger
    totals = await ledger.totals(key_id=account.id, since=since)
    lines = [_line(t) for t in totals]
    fields = "requests prompt_tokens image_tokens text_tokens completion_tokens total_tokens"
    summed = {field: sum(line[field] for line in lines) for field in fields.split()}
    body = {
        "object": "list",
        "key": {"id": account.id, "name": account.name},
        "data": lines,
        "total": summed,
    }
    return JSONResponse(body)
