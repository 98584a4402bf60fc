"""422 bodies that can always be rendered, whatever the client sent.

FastAPI's default validation handler echoes each offending `input` back as JSON; when the
input is NaN or Infinity (which Python's JSON parser accepts) rendering fails and the
client gets a 500 instead of the 422. This handler writes non-finite numbers as strings.
It never changes which requests are refused, only how the refusal is written.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # 'nan', 'inf', '-inf'
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = _finite(jsonable_encoder(exc.errors()))
    return JSONResponse(status_code=422, content={"detail": errors})


def install_error_handlers(app: FastAPI) -> None:
    """Call once per app that mounts admin routers (ingress/app.py, admin/app.py, tests)."""
    app.add_exception_handler(RequestValidationError, _validation_error)
