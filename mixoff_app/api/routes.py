"""The /v1 routes: models, chat completions, completions, and the cache's stats, over one engine.

Plain Starlette routes, so the same list serves inside the app Gradio launches (same host, port and share
link as the page) and in the headless ``serve``. Every route checks access first (``access.refusal``).
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Awaitable, Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from ..access import public_info
from ..config import ConfigError
from ..limits import Busy, InputTooLong
from .access import refusal, session, stats_view
from .answer import Answer, Disconnected, Finish, Piece
from .config import ApiConfig
from .errors import ApiError
from .request import parse_chat, parse_completion, parse_json
from .responses import SSE_DONE, Shape, sse

log = logging.getLogger("mixoff.api")
OWNER = "mixoff"
CLIENT_GONE = 499          # nginx's "client closed request": nobody reads it, the log shows why


def model_id(info: Any) -> str:
    """The served model's name for clients: the display name without its note, never a server path."""
    return str(info.model_name).split(" (")[0]


def error_response(err: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    too_big = ApiError(413, f"The request body is larger than this server takes ({limit // 2**20} MiB).",
                       code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_big
        parts.append(part)
    return b"".join(parts)


def endpoint(config: ApiConfig, fn: Callable[[Request], Awaitable[Response]]
             ) -> Callable[[Request], Awaitable[Response]]:
    """A route's handler: access checked first; an ``ApiError`` in OpenAI's shape; anything else one line in
    the log and one sentence (500) to the client."""
    async def handle(request: Request) -> Response:
        try:
            refused = refusal(config, request.headers.get("authorization"))
            if refused is not None:
                raise refused
            return await fn(request)
        except ApiError as err:
            return error_response(err)
        except Exception as exc:     # noqa: BLE001 - one line in the log, one sentence to the client
            log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
            return error_response(ApiError(500, f"The server failed to answer: {type(exc).__name__}: {exc}"))
    return handle


async def respond(request: Request, answer: Answer, shape: Shape, stream: bool,
                  include_usage: bool) -> Response:
    """An answer as one JSON body, or as server-sent events."""
    if not stream:
        text, finish = [], None
        try:
            async for item in answer.run(request.is_disconnected):
                if isinstance(item, Piece):
                    text.append(item.text)
                elif isinstance(item, Finish):
                    finish = item
        except Disconnected:
            return Response(status_code=CLIENT_GONE)
        if finish is None:
            raise ApiError(500, "The answer ended without finishing.")
        return JSONResponse(shape.whole("".join(text), finish))

    async def events():
        if shape.chat:
            yield sse(shape.chunk(first=True, with_usage=include_usage))
        try:
            async for item in answer.run(request.is_disconnected):
                if isinstance(item, Piece):
                    yield sse(shape.chunk(item.text, with_usage=include_usage))
                elif isinstance(item, Finish):
                    yield sse(shape.chunk(finish=item, with_usage=include_usage))
                    if include_usage:
                        yield sse(shape.usage_chunk(item))
        except Disconnected:
            return
        except Exception as exc:     # noqa: BLE001 - the status is sent already: the error goes in the stream
            log.error("%s failed mid-stream: %s: %s", request.url.path, type(exc).__name__, exc)
            yield sse(ApiError(500, f"The server failed while answering: {type(exc).__name__}: {exc}").body())
        yield SSE_DONE

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def api_routes(get_engine: Callable[[], Any], config: ApiConfig) -> list[BaseRoute]:
    """``get_engine()`` returns the loaded engine or raises RuntimeError saying why not (still loading, failed)."""
    def engine_or_503() -> Any:
        try:
            return get_engine()
        except RuntimeError as exc:
            raise ApiError(503, str(exc), code="model_not_ready") from None

    async def start(request: Request, call: Callable[[threading.Event], Any], routed: bool = False
                    ) -> tuple[Any, Answer]:
        """Validate against the engine (tokenizing, context fit) and queue the answer: bad input, or a full line,
        fails at once. ``routed``: the answer returns its routing (vLLM's fields)."""
        engine = engine_or_503()
        cancel = threading.Event()
        try:
            events = await run_in_threadpool(call, engine, cancel)
        except (ValueError, ConfigError) as exc:
            msg = str(exc)
            code = "context_length_exceeded" if isinstance(exc, InputTooLong) else "invalid_value"
            raise ApiError(400, msg[:1].upper() + msg[1:], code=code) from None
        except Busy as exc:
            msg = str(exc)
            raise ApiError(429, msg[:1].upper() + msg[1:] + ".", code="server_busy") from None
        return engine, Answer(engine, events, cancel, routed or config.return_routed_experts)

    # ---- routes -------------------------------------------------------------------------------
    def model_card(engine: Any) -> dict:
        return {"id": model_id(engine.info), "object": "model", "created": 0, "owned_by": OWNER}

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card(engine_or_503())]})

    async def get_model(request: Request) -> Response:
        card = model_card(engine_or_503())
        if request.path_params["model"] != card["id"]:
            raise ApiError(404, f"The model '{request.path_params['model']}' does not exist here; this server "
                                f"serves '{card['id']}'.", param="model", code="model_not_found")
        return JSONResponse(card)

    async def chat_completions(request: Request) -> Response:
        req = parse_chat(parse_json(await read_body(request, config.max_body_bytes)), config.default_max_tokens)
        who = session(config, request.headers.get("authorization"))
        engine, answer = await start(request, lambda e, cancel: e.stream_chat(list(req.messages), req.params,
                                                                             cancel=cancel, session=who),
                                     req.routed_experts)
        return await respond(request, answer, Shape(True, model_id(engine.info)), req.stream,
                             req.include_usage)

    async def completions(request: Request) -> Response:
        req = parse_completion(parse_json(await read_body(request, config.max_body_bytes)),
                               config.default_max_tokens)
        who = session(config, request.headers.get("authorization"))
        engine, answer = await start(request, lambda e, cancel: e.stream_prompt(req.prompt, req.params,
                                                                               cancel=cancel, session=who),
                                     req.routed_experts)
        return await respond(request, answer, Shape(False, model_id(engine.info)), req.stream,
                             req.include_usage)

    async def stats(request: Request) -> Response:
        engine = engine_or_503()
        return JSONResponse(await run_in_threadpool(stats_view, engine, config, request.headers.get("authorization")))

    async def info(request: Request) -> Response:
        """The served model's shape, quantization and cache, without server paths: what a page driving this server
        from elsewhere (``app.py --backend``) shows in its header."""
        return JSONResponse(public_info(engine_or_503().info))

    table = [("/v1/models", list_models, "GET"), ("/v1/models/{model:path}", get_model, "GET"),
             ("/v1/chat/completions", chat_completions, "POST"), ("/v1/completions", completions, "POST"),
             ("/v1/mixoff/stats", stats, "GET"), ("/v1/mixoff/info", info, "GET")]
    routes: list[BaseRoute] = [Route(path, endpoint(config, fn), methods=[method]) for path, fn, method in table]

    async def unknown(request: Request) -> Response:
        """Inside /v1, a wrong path or method still gets OpenAI's error shape (outside it, the page answers)."""
        for route in routes:
            if route.matches(request.scope)[0].name == "PARTIAL":
                raise ApiError(405, f"{request.method} is not allowed on {request.url.path}.",
                               code="method_not_allowed")
        raise ApiError(404, f"Invalid URL ({request.method} {request.url.path}).", code="unknown_url")

    routes.append(Route("/v1/{rest:path}", endpoint(config, unknown),
                        methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]))
    return routes
