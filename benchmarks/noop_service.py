"""The no-op service of ``benchmarks/http.py``: the same handler as an embserve App and as a
plain Starlette app (``{"ok": true}`` for GET /noop).

``embserve run benchmarks/noop_service.py:app`` serves the first; the benchmark serves the
second with uvicorn and with hypercorn.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import embserve

PATH = "/noop"


async def noop(request: Request) -> JSONResponse:
    """The plain Starlette handler."""
    return JSONResponse({"ok": True})


starlette_app = Starlette(routes=[Route(PATH, noop)])


@embserve.deployment(max_ongoing_requests=1000, max_queued_requests=-1)
class Noop:
    """The no-op endpoint."""

    async def __call__(self, request: Any) -> dict[str, bool]:
        return {"ok": True}


app = embserve.App({PATH: Noop.bind()})
