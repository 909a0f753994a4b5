"""The FastAPI application: OpenAI routes, health, metrics, API key, error bodies, engine loop lifetime.

``build_app(engine, ...)`` works with any engine that has ``LLMEngine``'s step-level interface; the engine
loop starts with the application (lifespan) and stops with it, failing requests still running.
"""
from __future__ import annotations

import logging
import secrets
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from pagoda.server.engine_loop import EngineLoop
from pagoda.server.errors import APIError, error_body, from_validation_error, parse_json_object
from pagoda.server.metrics import ServerMetrics
from pagoda.server.params import ModelInfo
from pagoda.server.protocol import ChatCompletionRequest, CompletionRequest
from pagoda.server.serving import OpenAIServing

log = logging.getLogger("pagoda.server")


def model_info(engine: Any, name: str) -> ModelInfo:
    """What the server checks requests against, read from an ``LLMEngine``."""
    from pagoda.engine.sampling_params import SamplingParams
    return ModelInfo(name=name, max_model_len=engine.config.max_model_len, vocab_size=engine.vocab_size,
                     sampling_params_cls=SamplingParams)


def build_app(engine: Any, *, served_model_name: str, tokenizer: Any = None, api_key: str | None = None,
              info: ModelInfo | None = None, output_kind: Any = "delta") -> FastAPI:
    """The server application over ``engine``: an ``LLMEngine`` (driven only from the engine thread), or an
    ``EngineLoop`` over an engine elsewhere (``ProcessEngineLoop``, launched).

    tokenizer: the server's own tokenizer for prompts and chat templates (default ``engine.tokenizer``;
    a separate instance keeps HTTP-side encoding off the engine thread's object). api_key: when set, every
    ``/v1`` route needs ``Authorization: Bearer <api_key>``.
    """
    if isinstance(engine, EngineLoop) and info is None and getattr(engine, "vocab_size", None) is None:
        raise ValueError("engine is an engine loop whose engine is not running (ProcessEngineLoop: call launch() "
                         "first), and no info was given")
    info = info or model_info(engine, served_model_name)
    if output_kind == "delta":
        from pagoda.engine.sampling_params import RequestOutputKind
        output_kind = RequestOutputKind.DELTA
    metrics = ServerMetrics(info.name)
    if isinstance(engine, EngineLoop):          # e.g. a launched ProcessEngineLoop: the engine lives elsewhere
        if tokenizer is None:
            raise ValueError("tokenizer is required when engine is an engine loop (its engine has no tokenizer "
                             "in this process)")
        loop, loop.metrics = engine, metrics
    else:
        loop = EngineLoop(engine, metrics)
    serving = OpenAIServing(loop, info, tokenizer if tokenizer is not None else engine.tokenizer, output_kind)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop.start()
        try:
            yield
        finally:
            await loop.shutdown()

    app = FastAPI(title="pagoda", lifespan=lifespan)
    app.state.engine_loop = loop
    app.state.metrics = metrics
    app.state.info = info

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not (got.startswith("Bearer ") and secrets.compare_digest(got[7:].encode(), api_key.encode())):
            raise APIError("Incorrect or missing API key (send `Authorization: Bearer <key>`).", status=401,
                           code="invalid_api_key")

    async def body_of(request: Request, model: type):
        check_key(request)
        try:
            return model.model_validate(parse_json_object(await request.body()))
        except ValidationError as exc:
            raise from_validation_error(exc) from None

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        return JSONResponse(error_body(str(exc), code="invalid_value"), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception):
        log.exception("request failed")
        return JSONResponse(error_body(f"Internal error: {type(exc).__name__}: {exc}", status=500), status_code=500)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serving.completions(await body_of(request, CompletionRequest), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serving.chat(await body_of(request, ChatCompletionRequest), request)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": info.name, "object": "model", "created": created,
                                            "owned_by": "pagoda", "root": info.name,
                                            "max_model_len": info.max_model_len}]}

    @app.get("/health")
    async def health():
        if loop.healthy:
            return Response(status_code=200)
        return JSONResponse(error_body("The engine loop is not running.", status=503), status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
