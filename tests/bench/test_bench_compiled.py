"""Peers compiled as their users compile them: the recompile limit is raised for a study, a limit still
hit raises instead of running eagerly, graph breaks and fallbacks are counted per row and never printed as
the peer's figure. Dynamo runs on the CPU with its ``eager`` backend here (no Inductor compile)."""
import pytest
import torch
import torch._dynamo.config as dynamo_config

from pagoda.bench import attention, backends
from pagoda.bench.compiled import RECOMPILE_LIMIT, CompileWatch, silently_eager, users_compile


def _limit() -> int:
    return getattr(dynamo_config, "recompile_limit", None) or dynamo_config.cache_size_limit


def test_users_compile_raises_the_limit_and_restores_it():
    before = _limit()
    assert before < 24    # the default (8) is below the attention grid's 24 shapes: the reason for all this
    with users_compile() as applied:
        assert _limit() == RECOMPILE_LIMIT and max(applied.values()) >= RECOMPILE_LIMIT
        assert dynamo_config.fail_on_recompile_limit_hit is True
    assert _limit() == before and dynamo_config.fail_on_recompile_limit_hit is False


def test_every_shape_is_compiled_under_users_compile_and_counted():
    torch._dynamo.reset()

    def f(x):
        return x.sin() + 1
    fn = torch.compile(f, dynamic=False, backend="eager", fullgraph=True)
    watch = CompileWatch()
    with users_compile():
        for n in range(1, 13):            # 12 shapes: past the default limit of 8
            fn(torch.randn(n))
    delta = watch.delta()
    assert delta["graphs"] == 12 and delta["eager_fallbacks"] == 0 and delta["graph_breaks"] == 0
    assert silently_eager(delta) is None


def test_a_fallback_past_the_limit_is_detected_and_named(monkeypatch):
    """Past the default limit Dynamo runs the function uncompiled and says so only in a log warning."""
    torch._dynamo.reset()

    def g(x):
        return x.cos() * 2
    fn = torch.compile(g, dynamic=False, backend="eager")
    watch = CompileWatch()
    for n in range(1, 12):
        fn(torch.randn(n))
    delta = watch.delta()
    assert delta["eager_fallbacks"] >= 1
    assert "recompile limit" in silently_eager(delta)
    monkeypatch.setattr(dynamo_config, "recompile_limit", 2)
    with users_compile(limit=3):          # a limit a study still hits raises instead
        torch._dynamo.reset()
        with pytest.raises(Exception, match="recompile"):
            for n in range(1, 6):
                fn(torch.randn(n))
    torch._dynamo.reset()


def test_a_graph_break_is_named():
    assert "graph break" in silently_eager({"graphs": 2, "graph_breaks": 1, "eager_fallbacks": 0})


def test_flex_is_compiled_once_fullgraph_and_watched(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    backends._compiled_flex.cache_clear()
    try:
        backends._compiled_flex()
        backends._compiled_flex()
    finally:
        backends._compiled_flex.cache_clear()
    assert calls == [{"dynamic": False, "fullgraph": True}]
    assert backends.ATTENTION_BACKENDS["flex"].compiled
    assert "CUDA" in backends.ATTENTION_BACKENDS["flex"].unavailable(torch.device("cpu"))


def test_a_compiled_row_that_fell_back_is_an_error_not_a_figure(monkeypatch):
    """A watched backend whose Dynamo counters show a fallback gets no figure, and the reason says why."""
    fake = backends.Backend("fake_compiled", "test", lambda d: None,
                            lambda q, k, v, causal, scale: (lambda: q * 2), compiled=True)
    monkeypatch.setitem(backends.ATTENTION_BACKENDS, "fake_compiled", fake)
    deltas = iter([{"graphs": 1, "graph_breaks": 0, "eager_fallbacks": 1}])
    monkeypatch.setattr(attention, "CompileWatch", lambda: type("W", (), {"delta": lambda self: next(deltas)})())
    monkeypatch.setattr(attention, "CPU_REP_MS", 1.0)
    case = attention.AttentionCase(1, 16, 2, 8, False)
    (row,) = attention.run_case(case, ["fake_compiled"], torch.device("cpu"), torch.float32, {})
    assert row["status"] == "error" and "recompile limit" in row["reason"] and row["tflops"] is None
    assert row["compile"]["eager_fallbacks"] == 1
