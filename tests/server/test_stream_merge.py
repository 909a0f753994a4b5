"""Outputs that queue up while a stream's reader is busy come out as one: `RequestOutput.add` (vLLM's merge of a
later output into an earlier one) and `RequestStream`, which applies it to whatever waits in its queue."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from pagoda.engine.outputs import CompletionOutput, Logprob, RequestOutput
from pagoda.server.engine_loop import RequestStream
from pagoda.server.errors import APIError


def _out(pieces: dict[int, tuple[str, list[int]]], finished=False, reasons=None, logprobs=False, cached=None):
    reasons = reasons or {}
    return RequestOutput("r", None, [1, 2], None, [
        CompletionOutput(i, text, list(ids), -float(len(ids)),
                         [{t: Logprob(-0.5, 1)} for t in ids] if logprobs else None, *reasons.get(i, (None, None)))
        for i, (text, ids) in sorted(pieces.items())], finished, num_cached_tokens=cached)


def test_add_appends_deltas_per_sample():
    a = _out({0: ("he", [5]), 1: ("x", [9])}, logprobs=True, cached=0)
    a.add(_out({1: ("y", [10])}, logprobs=True), aggregate=True)
    a.add(_out({0: ("llo", [6, 7]), 1: ("", [])}, finished=True, reasons={0: ("stop", "\n"), 1: ("length", None)},
               logprobs=True, cached=16), aggregate=True)
    c0, c1 = a.outputs
    assert (c0.index, c0.text, c0.token_ids, c0.finish_reason, c0.stop_reason) == (0, "hello", [5, 6, 7], "stop", "\n")
    assert (c1.text, c1.token_ids, c1.finish_reason) == ("xy", [9, 10], "length")
    assert [list(s) for s in c0.logprobs] == [[5], [6], [7]] and c0.cumulative_logprob == -2.0
    assert a.finished and a.num_cached_tokens == 16


def test_add_without_aggregate_replaces_and_adds_missing_samples():
    a = _out({1: ("ab", [1, 2])})
    a.add(_out({0: ("z", [3]), 1: ("abc", [1, 2, 4])}), aggregate=False)
    assert [(c.index, c.text, c.token_ids) for c in a.outputs] == [(0, "z", [3]), (1, "abc", [1, 2, 4])]
    assert not a.finished


def _drain(stream: RequestStream, items) -> list:
    async def run():
        for x in items:
            stream.put(x)
        got = []
        try:
            async for out in stream:
                got.append(out)
        except APIError as exc:
            got.append(exc)
        return got

    return asyncio.run(run())


def test_stream_merges_what_waits_and_stops_at_the_last():
    items = [_out({0: (c, [i])}) for i, c in enumerate("abc")] + [_out({0: ("d", [3])}, finished=True,
                                                                       reasons={0: ("length", None)})]
    got = _drain(RequestStream("r"), items)
    assert len(got) == 1 and got[0].outputs[0].text == "abcd" and got[0].outputs[0].token_ids == [0, 1, 2, 3]
    assert got[0].finished


def test_stream_delivers_outputs_before_an_error_behind_them():
    err = APIError("The server is shutting down.", status=503, code="unavailable")
    got = _drain(RequestStream("r"), [_out({0: ("a", [1])}), _out({0: ("b", [2])}), err])
    assert got[0].outputs[0].text == "ab" and got[1] is err


@pytest.mark.parametrize("aggregate", [True, False])
def test_stream_appends_deltas_or_keeps_the_latest_cumulative(aggregate):
    items = [_out({0: ("a", [1])}), _out({0: ("ab", [1, 2])}, finished=True, reasons={0: ("stop", None)})]
    got = _drain(RequestStream("r", aggregate=aggregate), items)
    assert got[0].outputs[0].text == ("aab" if aggregate else "ab")


def test_a_reader_cancelled_while_waiting_loses_nothing():
    async def run():
        s = RequestStream("r")
        reader = asyncio.ensure_future(s.__anext__())
        await asyncio.sleep(0)
        reader.cancel()
        s.put(_out({0: ("a", [1])}))           # lands after the cancel
        with pytest.raises(asyncio.CancelledError):
            await reader
        s.put(_out({0: ("b", [2])}, finished=True, reasons={0: ("length", None)}))
        return [o async for o in s]

    got = asyncio.run(run())
    assert len(got) == 1 and got[0].outputs[0].text == "ab" and got[0].finished


def test_step_counters_survive_replaced_engine_stats():
    """A caller that replaces engine.stats (new counters from 0) must not make a counter go down (prometheus
    raises on a negative increment, which would end the engine thread)."""
    from pagoda.bench.serve import engine_counters
    from pagoda.engine.llm_engine import StepStats
    from pagoda.server.metrics import ServerMetrics, engine_snapshot

    m = ServerMetrics("x")
    engine = SimpleNamespace(scheduler=SimpleNamespace(running=[], waiting=[], block_manager=SimpleNamespace(
        usage=0.0, num_queried_tokens=0, num_hit_tokens=0)))
    engine.stats = StepStats(steps=100, decode_steps=10, host_s=1.0, wait_s=1.0, decode_host_s=0.5,
                             decode_wait_s=0.5)
    m.observe(*engine_snapshot(engine))
    engine.stats = StepStats(steps=1, decode_steps=1, host_s=0.1, wait_s=0.1, decode_host_s=0.1, decode_wait_s=0.1)
    m.observe_engine(engine)
    c = engine_counters(m.render().decode())
    assert c[("steps", "decode")] == 11 and c[("steps", "prefill")] == 90
    assert c[("host_s", "decode")] == pytest.approx(0.6)


def test_engine_loop_clock_counts_each_part():
    """`drive` books its time by part: idle while blocked for a command, steps inside engine.step(), handoff in
    on_step; /metrics carries the increases."""
    import queue
    import time

    from pagoda.bench.serve import engine_counters
    from pagoda.server.engine_loop import LoopClock, drive
    from pagoda.server.metrics import ServerMetrics

    class Engine:
        def __init__(self):
            self.left = 0

        def has_unfinished_requests(self):
            return self.left > 0

        def add_request(self, rid, prompt, params):
            self.left = 3

        def abort_request(self, rids):
            self.left = 0

        def step(self):
            time.sleep(0.02)
            self.left -= 1
            return []

    commands = queue.SimpleQueue()
    clock, m = LoopClock(), ServerMetrics("x")
    engine = SimpleNamespace()
    engine.scheduler = SimpleNamespace(running=[], waiting=[], block_manager=SimpleNamespace(
        usage=0.0, num_queried_tokens=0, num_hit_tokens=0))
    fake = Engine()

    def on_step(events, stepped):
        time.sleep(0.01)
        m.observe_engine(engine, clock)
        if not fake.has_unfinished_requests():
            commands.put(("stop",))

    import threading
    threading.Timer(0.05, commands.put, (("add", "r", {}, None),)).start()
    drive(fake, commands, on_step, clock=clock)
    idle, cmds, steps, handoff = clock.as_tuple()
    assert idle >= 0.04 and steps >= 0.06 and handoff >= 0.03 and 0 <= cmds < 0.02
    c = engine_counters(m.render().decode())
    assert c[("loop_s", "steps")] == pytest.approx(steps, abs=1e-6)        # the last handoff is not yet booked
    assert c[("loop_s", "idle")] == pytest.approx(idle, abs=1e-3)      # less the wait that read the stop


def test_observe_many_renders_as_observe_each():
    """The step-batched histogram update gives the same buckets, count and sum as one observe per value,
    boundaries and values past the last bound included."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from pagoda.server.metrics import observe_many

    values = [0.0, 0.01, 0.010001, 0.05, 0.3, 0.3, 2.5, 79.9, 80.0, 1e6, 0.024999]
    pages = []
    for batched in (False, True):
        reg = CollectorRegistry()
        h = Histogram("itl", "x", ["m"], buckets=(0.01, 0.025, 0.05, 0.3, 2.5, 80.0), registry=reg).labels("a")
        if batched:
            observe_many(h, values[:4])
            observe_many(h, [])
            observe_many(h, values[4:])
        else:
            for v in values:
                h.observe(v)
        pages.append([ln for ln in generate_latest(reg).decode().splitlines() if "_created" not in ln])
    assert pages[0] == pages[1]
    assert 'itl_bucket{le="0.01",m="a"} 2.0' in pages[1] and 'itl_count{m="a"} 11.0' in pages[1]
