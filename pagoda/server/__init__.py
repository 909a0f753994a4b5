"""OpenAI-compatible HTTP server over pagoda's engine (FastAPI + uvicorn): ``pagoda serve MODEL_DIR``.

``build_app(engine, served_model_name=...)`` gives the ASGI application; ``pagoda.server.launcher.serve``
runs it. Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics.
"""
from pagoda.server.app import build_app

__all__ = ["build_app"]
