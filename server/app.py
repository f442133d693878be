"""The FastAPI application: OpenAI routes over one EngineWorker."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from hetero.runtime import Runtime
from server.handlers import chat, completion
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.state import APIError, ServerConfig, ServerState

__all__ = ["APIError", "ServerConfig", "create_app"]

log = logging.getLogger("hetero.server")


def create_app(runtime: Runtime | Callable[[], Runtime], config: ServerConfig | None = None) -> FastAPI:
    """The server app over ``runtime``, or over what ``runtime()`` returns, loaded in the background
    (``/health`` answers 503 until it is ready)."""
    state = ServerState(config or ServerConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        if isinstance(runtime, Runtime):
            state.attach(runtime, loop)
        else:
            threading.Thread(
                target=_load, args=(runtime, state, loop), name="hetero-load", daemon=True
            ).start()
        try:
            yield
        finally:
            state.close()

    app = FastAPI(title="hetero", version="0.1.0", lifespan=lifespan)
    app.state.hetero = state
    app.add_middleware(_AuthMiddleware, state=state)
    _add_error_handlers(app)
    _add_routes(app, state)
    return app


def _load(loader: Callable[[], Runtime], state: ServerState, loop: asyncio.AbstractEventLoop) -> None:
    try:
        runtime = loader()
    except Exception as e:
        state.load_error = f"{type(e).__name__}: {e}"
        log.error("loading the model failed: %s", state.load_error)
        if state.on_load_error is not None:
            state.on_load_error()
        return
    loop.call_soon_threadsafe(state.attach, runtime, loop)


class _AuthMiddleware:
    """Bearer-key check on /v1 routes, before the body is read (so a bad key is 401, whatever the body)."""

    def __init__(self, app: Any, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        key = self.state.config.api_key
        if key is None or scope["type"] != "http" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), key.encode()):
            return await self.app(scope, receive, send)
        err = APIError(
            401,
            "missing or incorrect API key; send it as `Authorization: Bearer KEY`",
            code="invalid_api_key",
        )
        await err.response()(scope, receive, send)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(
                ": "
            )
        else:
            parts = [
                f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in errors
            ]
            message = "invalid request: " + "; ".join(parts[:5])
        return APIError(400, message, param=".".join(loc) or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()


def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> Response:
        if state.worker is None:
            status = "failed" if state.load_error else "loading"
            return JSONResponse({"status": status, "error": state.load_error}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        runtime, _ = state.ready()
        card = {
            "id": state.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "hetero",
            "max_model_len": runtime.engine.config.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat(state, body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await completion(state, body, request)
