"""The API on its own (no page): ``python -m mixoff_app serve``, run by uvicorn."""
from __future__ import annotations

from typing import Any, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse

from .config import ApiConfig
from .errors import ApiError
from .routes import api_routes, error_response


def create_app(get_engine: Callable[[], Any], config: ApiConfig) -> Starlette:
    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return error_response(ApiError(404, f"Invalid URL ({request.method} {request.url.path}): the API is "
                                            f"under /v1.", code="unknown_url"))

    async def not_allowed(request: Request, exc: Exception) -> JSONResponse:
        return error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}.",
                                       code="method_not_allowed"))

    return Starlette(routes=api_routes(get_engine, config), exception_handlers={404: not_found, 405: not_allowed})


def serve(engine: Any, config: ApiConfig, port: int) -> None:
    """Block serving ``engine`` on ``config.host``:``port`` until interrupted."""
    import uvicorn

    uvicorn.run(create_app(lambda: engine, config), host=config.host, port=port, log_level="warning",
                timeout_graceful_shutdown=5)
