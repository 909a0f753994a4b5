"""``pagoda serve``: build the engine, the application and a uvicorn server that shuts down cleanly.

On SIGINT / SIGTERM uvicorn stops accepting connections and then waits for open responses to finish;
``PagodaServer`` first ends every running request with an error (a streamed request gets an error event
and ``data: [DONE]``, a waiting one a 503), so nothing waits on generations that will not come, then the
engine stops after its current step (in its own process by default: ``engine_process``). A second SIGINT
forces the exit.

uvicorn re-raises the signal that stopped it once it has shut down. Under the default SIGTERM disposition that
kills the process on the spot: no ``finally``, no exit handlers (multiprocessing's among them, which unlink the
engine process's queue semaphores). ``serve`` turns that last SIGTERM into ``SystemExit(143)`` and a SIGINT's
KeyboardInterrupt into exit code 130, so the engine process is stopped and joined and the interpreter exits
normally, with the status a signalled exit conventionally reports.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading

import uvicorn

from pagoda.server.cli_args import engine_kwargs

log = logging.getLogger("pagoda.server")


class PagodaServer(uvicorn.Server):
    """uvicorn's server, failing the running requests as shutdown begins (uvicorn would wait for them)."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        app = self.config.loaded_app
        while hasattr(app, "app") and not hasattr(app, "state"):   # uvicorn's middleware wrappers
            app = app.app
        loop = getattr(getattr(app, "state", None), "engine_loop", None)
        if loop is not None:
            loop.fail_all("The server is shutting down.")
        await super().shutdown(sockets)


def build_engine(model: str, **kwargs):
    from pagoda.engine.llm_engine import LLMEngine
    return LLMEngine.from_kwargs(model, **kwargs)


def make_server(app, host: str, port: int, log_level: str = "info", shutdown_timeout: float = 10.0,
                fd: int | None = None) -> PagodaServer:
    config = uvicorn.Config(app, host=host, port=port, fd=fd, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=shutdown_timeout, lifespan="on")
    return PagodaServer(config)


def _under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def serve(args: argparse.Namespace) -> int:
    """Entry point of ``pagoda serve`` (parsed arguments from ``cli_args.add_serve_arguments``).

    The engine runs in a process of its own (``engine_process``) unless ``--no-engine-process`` or under
    torchrun (every rank is already a process the launcher made: rank 0's engine stays in its server)."""
    from transformers import AutoTokenizer

    from pagoda.server.app import build_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    try:
        if args.engine_process and not _under_torchrun():
            from pagoda.server.engine_process import ProcessEngineLoop
            engine = ProcessEngineLoop(build_engine, (args.model,), engine_kwargs(args)).launch()
            log.info("engine ready in process %d", engine.pid)
        else:
            engine = build_engine(args.model, **engine_kwargs(args))
    except (RuntimeError, ValueError, OSError) as exc:   # a bad folder or option, no memory left: say so
        log.error("pagoda serve: %s", exc)
        return 1
    try:
        # The server's own tokenizer: prompts are encoded on the event loop while the engine decodes.
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model, local_files_only=True)
        app = build_app(engine, served_model_name=args.served_model_name or args.model, tokenizer=tokenizer,
                        api_key=args.api_key)
        log.info("serving %s on http://%s:%d/v1", args.served_model_name or args.model, args.host, args.port)
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _exit_on_signal) if main else None
        try:
            make_server(app, args.host, args.port, args.log_level, args.shutdown_timeout).run()
        except KeyboardInterrupt:
            return 130
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    finally:        # however the server ended (a port in use exits from inside uvicorn): no engine left behind
        close = getattr(engine, "close", None)
        if close is not None:
            close()
    return 0
