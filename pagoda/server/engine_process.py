"""The engine in a process of its own, as vLLM's EngineCore: ``pagoda serve``'s default.

Why: in one process the engine's Python (scheduling, input building, output processing: a few ms a step) and
the event loop's (a few tens of µs per streamed token, hundreds of streams) take turns on one GIL, so at high
concurrency each engine step also waits for the HTTP layer. Apart, each has its interpreter: the engine steps
at its offline pace and the server keeps up by merging what a slow stream has not sent yet (``RequestStream``).

Layout (``multiprocessing``, spawn: CUDA cannot cross a fork):
- server process: ``ProcessEngineLoop``, the event-loop side of ``EngineLoop`` unchanged; commands go into a
  ``multiprocessing.Queue`` (pickled by its feeder thread, not the event loop), and a reader thread takes each
  step's message from the other queue and hands it to the event loop (``call_soon_threadsafe``), updating the
  metrics from the engine snapshot the message carries;
- engine process: builds the engine with ``factory(*args, **kwargs)``, reports ``ready`` (what the server
  checks requests against: ``max_model_len``, ``vocab_size``) or ``failed``, then runs ``drive`` until a stop
  command or its parent's death. One message per step: ``("events", events, stepped, engine_snapshot)``. Outputs cross
  as plain tuples without their prompt (`pack_events`: the server has the prompt and never reads it back), so a
  step of 256 running requests pickles 256 short tuples, not 256 prompts.

The engine process ignores SIGINT (a terminal's Ctrl-C reaches the whole process group): the server decides when
it stops, fails the running requests, then sends ``stop``; the engine frees their pages and exits. A server that
dies leaves no engine behind (the engine checks its parent every step), and an engine that dies fails every
request with a 503 and turns ``/health`` unhealthy.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing as mp
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from types import SimpleNamespace

from pagoda.server.engine_loop import EngineLoop, LoopClock, drive
from pagoda.server.errors import APIError
from pagoda.server.metrics import engine_snapshot
from pagoda.server.packed import pack_output

log = logging.getLogger("pagoda.server")

_POLL_S = 1.0


def pack_events(events: list) -> list:
    """A step's events as they cross to the server: each output packed (`pagoda.server.packed.pack_output`),
    without its prompt; the pickling is on the engine's thread, inside its step."""
    return [(kind, rid, pack_output(payload) if kind == "out" else payload) for kind, rid, payload in events]


def _engine_main(factory: Callable, args: tuple, kwargs: dict, commands, results, log_level: int) -> None:
    """The engine process: build, report, drive. Each step's message is pickled here, on the engine's thread
    (an output that cannot be pickled fails the engine loudly instead of losing the step in the queue's feeder
    thread)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(levelname)s %(asctime)s %(name)s [engine]: %(message)s")
    parent = mp.parent_process()
    try:
        engine = factory(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - reported to the server, which refuses to start
        results.put(("failed", f"building the engine failed: {type(exc).__name__}: {exc}"))
        return
    # The engine's long-lived objects (the model, its graphs, the tokenizer) leave the collector's view, as vLLM's
    # engine core does: the cyclic collections the steps' short-lived objects trigger then scan only those.
    gc.collect()
    gc.freeze()
    results.put(("ready", {"max_model_len": engine.config.max_model_len, "vocab_size": engine.vocab_size}))

    clock = LoopClock()

    def on_step(events: list, stepped: bool) -> None:
        results.put(bytes(ForkingPickler.dumps(("events", pack_events(events), stepped,
                                                engine_snapshot(engine, clock)))))

    try:
        drive(engine, commands, on_step, alive=parent.is_alive if parent is not None else None, clock=clock)
        results.put(("stopped", None))
    except BaseException as exc:  # noqa: BLE001 - every running request fails with this message
        log.exception("engine loop failed")
        results.put(("failed", f"The engine failed: {type(exc).__name__}: {exc}"))
    finally:
        shutdown = getattr(engine, "shutdown", None)     # other tensor-parallel ranks, if any
        if shutdown is not None:
            shutdown()
        if parent is not None and not parent.is_alive():
            # Nobody reads the results any more: exiting must not wait to flush them into a full pipe.
            results.cancel_join_thread()


class ProcessEngineLoop(EngineLoop):
    """``EngineLoop`` over an engine built and driven in its own process by ``factory(*args, **kwargs)``.

    ``launch()`` (blocking, before the server listens) starts the process and waits until the engine is built;
    then ``config.max_model_len`` and ``vocab_size`` are the engine's. ``factory`` and its arguments must be
    picklable (a module-level function or class). The server supplies its own tokenizer."""

    def __init__(self, factory: Callable, args: tuple = (), kwargs: dict | None = None, metrics=None):
        super().__init__(None, metrics)
        ctx = mp.get_context("spawn")
        self._commands = ctx.Queue()
        # Commands left unsent when this process exits (the engine gone or going) must not hold the exit up.
        self._commands.cancel_join_thread()
        self._results = ctx.Queue()
        self._proc = ctx.Process(target=_engine_main, args=(factory, tuple(args), dict(kwargs or {}),
                                                            self._commands, self._results,
                                                            logging.getLogger().getEffectiveLevel()),
                                 name="pagoda-engine", daemon=False)
        self._reader: threading.Thread | None = None
        self._stop_sent = False
        self.config = SimpleNamespace(max_model_len=None)
        self.vocab_size: int | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def launch(self, timeout: float | None = None) -> ProcessEngineLoop:
        """Start the engine process and wait for its engine (RuntimeError with the reason if it fails)."""
        self._proc.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                kind, payload = self._results.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._proc.is_alive():
                    code = self._proc.exitcode
                    raise RuntimeError(f"the engine process exited (code {code}) while starting") from None
                if deadline is not None and time.monotonic() > deadline:
                    self._kill()
                    raise RuntimeError(f"the engine was not ready within {timeout} s") from None
        if kind != "ready":
            self._proc.join(10)
            raise RuntimeError(payload)
        self.config.max_model_len, self.vocab_size = payload["max_model_len"], payload["vocab_size"]
        return self

    # ---- server side -------------------------------------------------------------------------------
    def start(self) -> None:
        if self.vocab_size is None:
            raise RuntimeError("ProcessEngineLoop.launch() must run before the server starts")
        self._loop = asyncio.get_running_loop()
        self._reader = threading.Thread(target=self._read, name="pagoda-engine-reader", daemon=True)
        self._reader.start()

    @property
    def healthy(self) -> bool:
        return (self._error is None and self._proc.is_alive() and self._reader is not None
                and self._reader.is_alive())

    def _send(self, cmd: tuple) -> None:
        """Queue a command for the engine process. An add whose parameters cannot cross to it (e.g. a
        per-request Python callable defined in a function) is refused here, naming the reason."""
        if self._stop_sent:
            return
        if cmd[0] == "add":
            try:
                ForkingPickler.dumps(cmd)
            except Exception as exc:  # noqa: BLE001 - pickle raises many types
                raise APIError(f"the request's parameters cannot be sent to the engine process: {exc}",
                               code="invalid_value") from None
        self._stop_sent = cmd[0] == "stop"
        self._commands.put(cmd)

    def _read(self) -> None:
        """Reader thread: each step's message to the event loop, until the engine stops or dies. Whatever
        goes wrong here fails every request (none is left waiting)."""
        try:
            self._read_messages()
        except Exception as exc:  # noqa: BLE001
            log.exception("reading the engine's results failed")
            self._post_failure(f"The engine's results could not be read: {type(exc).__name__}: {exc}")

    def _read_messages(self) -> None:
        metrics = self.metrics
        while True:
            try:
                msg = self._results.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._proc.is_alive():
                    self._post_failure(f"The engine process exited (code {self._proc.exitcode}).")
                    return
                continue
            if isinstance(msg, bytes):
                msg = pickle.loads(msg)
            kind = msg[0]
            if kind == "events":
                _, events, stepped, snapshot = msg       # outputs stay packed: the streams fold them
                self.steps += stepped
                if metrics is not None:
                    metrics.observe(*snapshot)
                if events:
                    self._loop.call_soon_threadsafe(self._deliver, events)
            elif kind == "failed":
                self._post_failure(msg[1])
                return
            else:                       # stopped
                return

    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine process from outside the event loop (the server never started, or has ended):
        a stop command, then terminate if it does not exit within ``timeout``. Safe to call more than once."""
        if self._proc.pid is None:
            return
        self._send(("stop",))
        self._join(timeout)

    def _join(self, timeout: float) -> None:
        if self._reader is not None:
            self._reader.join(timeout)
        self._proc.join(timeout)
        if self._proc.is_alive():
            log.warning("the engine process did not stop within %.0f s; terminating it", timeout)
            self._kill()

    def _kill(self) -> None:
        self._proc.terminate()
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
