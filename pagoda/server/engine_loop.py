"""The engine loop beside the event loop: ``drive`` runs ``LLMEngine.step()`` while the event loop serves HTTP.

``EngineLoop`` drives the engine from a thread of the server's process (an engine object built in-process, as
the tests and the simulated-engine study use); ``pagoda.server.engine_process.ProcessEngineLoop`` runs the same
``drive`` in a process of its own (what ``pagoda serve`` does), so the engine's Python never waits for the
HTTP layer's GIL. The event-loop side below is the same for both.

Handover, both ways thread-safe and batched per step:
- event loop -> engine thread: a ``queue.SimpleQueue`` of ("add" | "abort" | "stop") commands, drained by the
  engine thread between steps (the engine is only ever touched from its own thread);
- engine thread -> event loop: one ``loop.call_soon_threadsafe(deliver, events)`` per step carrying every
  request's output of that step (and add acknowledgements), fanned out to per-request `RequestStream`s.

``add_request`` waits for the engine's acknowledgement, so a request the engine refuses (``ValueError`` at
``add_request``: e.g. it can never fit the KV cache) is a 400 before any response byte is sent.
An abort (client gone) drops the request's stream at once and frees its KV pages at the next step boundary.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from pagoda.server.errors import APIError
from pagoda.server.metrics import LOOP_PARTS, ServerMetrics, observe_many
from pagoda.server.packed import fold, is_finished, num_new_tokens

log = logging.getLogger("pagoda.server")

_IDLE_POLL_S = 1.0         # an idle engine loop wakes this often (to notice its parent's death)


class RequestStream:
    """The outputs of one request as the event loop sees them: an async iterator of ``RequestOutput``.

    A mailbox rather than an ``asyncio.Queue`` (the loop hands over hundreds of outputs a step: a queue's put
    and get cost several times this). Outputs that arrived while the reader was busy come out as one
    (`RequestOutput.add`: appended for DELTA outputs, the latest for CUMULATIVE ones), as vLLM's output
    collector does: under load a stream sends fewer, larger chunks instead of falling further behind. Raises
    the ``APIError`` the loop puts in instead (shutdown, engine failure), after the outputs before it. Items are
    ``RequestOutput``s or, from the engine process, packed outputs (`pagoda.server.packed`), folded when read."""

    __slots__ = ("request_id", "finished", "arrival", "first_token_at", "last_token_at", "aggregate", "_items",
                 "_waiter")

    def __init__(self, request_id: str, aggregate: bool = True):
        self.request_id = request_id
        self.finished = False
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.aggregate = aggregate
        self._items: list = []                         # outputs (and at most one error, last) not yet read
        self._waiter: asyncio.Future | None = None     # the reader, waiting for the next put

    def put(self, item) -> None:
        """Event-loop side: an output or an exception for the reader."""
        self._items.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finished:               # a request's finished output is its last
            raise StopAsyncIteration
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items = self._items
        first = items[0]
        if isinstance(first, BaseException):
            self._items = items[1:]
            self.finished = True
            raise first
        n = 1
        done = is_finished(first)
        while n < len(items) and not done and not isinstance(items[n], BaseException):
            done = is_finished(items[n])
            n += 1
        self._items = items[n:]
        item = fold(items[:n], self.aggregate) if n > 1 or type(first) is tuple else first
        if done:
            self.finished = True
        return item


class EngineLoop:
    """Owns the engine thread; every public method is called from the event loop's thread."""

    def __init__(self, engine: Any, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.metrics = metrics
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._acks: dict[str, asyncio.Future] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: str | None = None        # set once the loop stops: why new requests are refused
        self.steps = 0

    # ---- event-loop side -------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pagoda-engine", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self._error is None and self._thread is not None and self._thread.is_alive()

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    async def add_request(self, request_id: str, prompt: dict, params: Any) -> RequestStream:
        """Hand a request to the engine and wait for it to be accepted (APIError 400 if refused)."""
        if self._error is not None:
            raise APIError(self._error, status=503, code="unavailable")
        kind = getattr(getattr(params, "output_kind", None), "name", "DELTA")
        stream = RequestStream(request_id, aggregate=kind != "CUMULATIVE")
        ack = self._loop.create_future()
        self._streams[request_id] = stream
        self._acks[request_id] = ack
        try:
            self._send(("add", request_id, prompt, params))
            await ack
        except BaseException as exc:
            self._streams.pop(request_id, None)
            self._acks.pop(request_id, None)
            if not isinstance(exc, APIError) and self._error is None:
                self._send(("abort", request_id))    # cancelled while waiting: the engine may hold it already
            raise
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(prompt["prompt_token_ids"]))
        return stream

    def abort(self, request_id: str) -> None:
        """Forget the request now; the engine drops it (and frees its pages) at the next step boundary."""
        stream = self._streams.pop(request_id, None)
        if stream is not None and self._error is None:
            self._send(("abort", request_id))

    def fail_all(self, message: str) -> None:
        """End every request with a 503 error and refuse new ones (shutdown); the thread stops after its step."""
        if self._error is None:
            self._error = message
        err = APIError(message, status=503, code="unavailable")
        for ack in self._acks.values():
            if not ack.done():
                ack.set_exception(err)
        self._acks.clear()
        for stream in self._streams.values():
            stream.put(err)
        self._streams.clear()
        self._send(("stop",))

    async def shutdown(self, message: str = "The server is shutting down.", timeout: float = 30.0) -> None:
        self.fail_all(message)
        await asyncio.to_thread(self._join, timeout)

    def _join(self, timeout: float) -> None:
        """Wait (off the event loop) for the engine to stop after ``fail_all``."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _deliver(self, events: list) -> None:
        """Event-loop side of one step: acknowledgements, then outputs to each request's stream."""
        now = time.perf_counter()
        m = self.metrics
        step_tokens = 0
        ttft: list[float] = []
        itl: list[float] = []
        e2e: list[float] = []
        for kind, rid, payload in events:
            if kind == "ack":
                ack = self._acks.pop(rid, None)
                if ack is None or ack.done():        # the client left while waiting: the stream was aborted
                    continue
                if payload is None:
                    ack.set_result(None)
                else:                                 # the engine's refusal, as a message
                    ack.set_exception(APIError(payload, code="invalid_value"))
                continue
            stream = self._streams.get(rid)
            if stream is None:                      # aborted: late outputs are dropped
                continue
            new_tokens = num_new_tokens(payload)
            step_tokens += new_tokens
            if new_tokens:
                if stream.first_token_at is None:
                    ttft.append(now - stream.arrival)
                    stream.first_token_at = now
                else:
                    itl.append(now - stream.last_token_at)
                stream.last_token_at = now
            stream.put(payload)
            if is_finished(payload):
                del self._streams[rid]
                e2e.append(now - stream.arrival)
        # One metrics update a step: a locked update per token costs as much as the rest of the delivery.
        if m is not None:
            if step_tokens:
                m.generation_tokens.inc(step_tokens)
            observe_many(m.time_to_first_token, ttft)
            observe_many(m.inter_token_latency, itl)
            observe_many(m.e2e_latency, e2e)

    # ---- engine thread ---------------------------------------------------------------------------
    def _send(self, cmd: tuple) -> None:
        self._inbox.put(cmd)

    def _run(self) -> None:
        loop, metrics = self._loop, self.metrics

        clock = LoopClock()

        def on_step(events: list, stepped: bool) -> None:
            self.steps += stepped
            if metrics is not None:
                metrics.observe_engine(self.engine, clock)
            if events:
                loop.call_soon_threadsafe(self._deliver, events)

        try:
            drive(self.engine, self._inbox, on_step, clock=clock)
        except BaseException as exc:  # an engine failure ends every request; the server reports unhealthy
            log.exception("engine loop failed")
            self._post_failure(f"The engine failed: {type(exc).__name__}: {exc}")

    def _post_failure(self, message: str) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self.fail_all, message)
            except RuntimeError:     # the loop closed meanwhile
                pass


class LoopClock:
    """Where the engine loop's time goes, in seconds since it started: ``idle`` (blocked for a command, nothing to
    run), ``commands`` (applying adds and aborts), ``steps`` (``engine.step()``), ``handoff`` (``on_step``: the
    step's events to the server). A served run's wall time less its steps' is what the HTTP side costs the
    engine (`pagoda bench serve` reports it)."""

    __slots__ = LOOP_PARTS

    def __init__(self):
        self.idle = self.commands = self.steps = self.handoff = 0.0

    def as_tuple(self) -> tuple[float, float, float, float]:
        """The seconds in `pagoda.server.metrics.LOOP_PARTS` order."""
        return (self.idle, self.commands, self.steps, self.handoff)


def drive(engine: Any, commands: Any, on_step: Callable[[list, bool], None],
          alive: Callable[[], bool] | None = None, clock: LoopClock | None = None) -> None:
    """The engine's loop until a ``("stop",)`` command (or ``alive()`` turns False): apply the queued commands,
    run one ``engine.step()`` while requests are unfinished, and hand that iteration's events to
    ``on_step(events, stepped)``: ``("ack", request_id, None | refusal message)`` per added request and
    ``("out", request_id, RequestOutput)`` per output. An iteration that only aborted hands over no events, but
    its ``on_step`` lets the caller see the engine after the abort.

    ``commands`` has ``queue.Queue``'s ``get(timeout=...)`` and ``get_nowait()`` (raising ``queue.Empty``);
    commands are ``("add", request_id, prompt, params)``, ``("abort", request_id)`` and ``("stop",)``. Blocks on
    ``commands`` only while the engine is idle. Requests still in the engine when it returns or raises are
    aborted (their KV pages freed). ``clock`` (a `LoopClock`) accumulates where the loop's time goes."""
    live: set[str] = set()
    clock = clock if clock is not None else LoopClock()
    now = time.perf_counter
    try:
        while alive is None or alive():
            events: list = []
            t0 = now()
            applied = _apply_commands(engine, commands, live, events, block=not engine.has_unfinished_requests(),
                                      clock=clock)
            t1 = now()
            clock.commands += t1 - t0
            if applied is None:
                break
            stepped = engine.has_unfinished_requests()
            if stepped:
                for out in engine.step():
                    events.append(("out", out.request_id, out))
                    if out.finished:
                        live.discard(out.request_id)
            t2 = now()
            clock.steps += t2 - t1
            if stepped or applied:
                on_step(events, stepped)
                clock.handoff += now() - t2
    finally:
        if live:       # stopping with requests in flight: free their pages
            try:
                engine.abort_request(list(live))
            except Exception:
                log.exception("aborting requests at shutdown failed")


def _apply_commands(engine, commands, live: set, events: list, block: bool, clock: LoopClock) -> int | None:
    """Apply queued commands: how many, or None once a stop arrives. Blocks (briefly) only when the engine is
    idle; the time blocked goes to ``clock.idle`` and is taken off ``clock.commands`` by the caller's sum."""
    applied = 0
    while True:
        try:
            if block:
                t0 = time.perf_counter()
                try:
                    cmd = commands.get(timeout=_IDLE_POLL_S)
                finally:
                    waited = time.perf_counter() - t0
                    clock.idle += waited
                    clock.commands -= waited
            else:
                cmd = commands.get_nowait()
        except queue.Empty:
            return applied
        block = False
        applied += 1
        if cmd[0] == "stop":
            return None
        if cmd[0] == "add":
            _, rid, prompt, params = cmd
            try:
                engine.add_request(rid, prompt, params)
            except (ValueError, TypeError) as exc:
                events.append(("ack", rid, str(exc)))
                continue
            live.add(rid)
            events.append(("ack", rid, None))
        else:
            rid = cmd[1]
            if rid in live:
                live.discard(rid)
                engine.abort_request([rid])
