"""OpenAI-compatible HTTP server over pagoda's engine (FastAPI + uvicorn): ``pagoda serve MODEL_DIR``.

``build_app(engine, served_model_name=...)`` gives the ASGI application; ``pagoda.server.launcher.serve``
runs it. Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics.
"""
__all__ = ["build_app"]


def __getattr__(name: str):
    # The app (FastAPI, uvicorn) loads on first use: `pagoda bench` and `pagoda generate` build their command
    # line from `pagoda.server.cli_args` and must run without the server's optional dependencies.
    if name == "build_app":
        from pagoda.server.app import build_app
        return build_app
    raise AttributeError(f"module 'pagoda.server' has no attribute {name!r}")
