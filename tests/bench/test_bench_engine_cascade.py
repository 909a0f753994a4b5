"""``pagoda bench engine --cascade`` on the CPU at a tiny size: both engines run the same requests, the shared
prompt is cached for every request, the cascade engine takes the cascade path on every timed step, and the
float32 greedy tokens agree."""
from __future__ import annotations

import json

from pagoda.bench import engine as eb
from pagoda.bench import engine_cascade as ec
from tests.models.tiny import tiny_model  # noqa: F401


def test_bench_engine_cascade_cli_tiny(monkeypatch, tmp_path):
    monkeypatch.setattr(ec, "LLAMA_2_7B_8_LAYERS", dict(
        ec.LLAMA_2_7B_8_LAYERS, vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32))
    for name, value in dict(SYSTEM=48, UNIQUE=8, BATCH=4, WARM=1, TIMED=2).items():
        monkeypatch.setattr(ec, name, value)
    monkeypatch.setattr(ec, "run_study", lambda f=ec.run_study: f(dtypes=("float32",)))
    out = tmp_path / "out"
    assert eb.main(["--cascade", "--out", str(out)]) == 0
    (row,) = json.loads((out / "engine-cascade.json").read_text())["results"]
    assert row["dtype"] == "float32" and row["requests"] == 4
    assert row["same_tokens"] + row["first_diff_at_near_tie"] == 4
    assert row["cascade_steps"] >= 3 and row["plain_step_ms"] > 0 and row["cascade_step_ms"] > 0
    assert "cascade" in (out / "engine-cascade.md").read_text()


def test_bench_engine_profile_cli_tiny(tiny_model, tmp_path):  # noqa: F811
    """``--profile`` on the CPU: every request is decoding when the profile starts, the step row has a wall time
    and a host share in [0, 1], and host operators are listed."""
    out = tmp_path / "out"
    rc = eb.main(["--profile", "--model", str(tiny_model("qwen3")), "--num-requests", "6", "--min-len", "3",
                  "--max-len", "6", "--max-model-len", "128", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "engine-profile.json").read_text())
    step = report["results"][0]
    assert step["kind"] == "step" and report["meta"]["running"] == 6 and step["ms_per_step"] > 0
    assert 0 <= step["host_share"] <= 1
    assert any(r["kind"] == "host op" for r in report["results"])
    phases = {r["name"]: r["ms_per_step"] for r in report["results"] if r["kind"] == "host phase"}
    assert {"schedule", "inputs + launch", "sample", "process tokens", "step (all)"} <= set(phases)
    assert phases["step (all)"] >= phases["inputs + launch"] > 0
    prefill = [r for r in report["results"] if r["kind"] == "prefill step"]
    assert len(prefill) == 1 and prefill[0]["ms_per_step"] > 0 and report["meta"]["prefill_steps"] >= 3
    # cProfile's top functions by their own time (prefill rows only when prompts still wait after the first
    # profiled steps: not with these few short prompts)
    py = [r for r in report["results"] if r["kind"] == "host python"]
    assert len(py) > 5 and all(r["calls"] > 0 and r["ms_per_step"] >= 0 for r in py)
    assert [r["ms_per_step"] for r in py] == sorted((r["ms_per_step"] for r in py), reverse=True)


def test_tuned_choices_name_each_tuned_shape_class(monkeypatch):
    """What `launch_tuned` chose is listed by kernel and key (the cascade study records it per run)."""
    from pagoda.kernels.launch import fast

    class Tuned:                                # an autotuner: its kernel under ``fn``
        fn = type("_prefill_paged_kernel", (), {})

    tuned = Tuned()
    monkeypatch.setattr(fast, "_tuned_configs", {(tuned, (True,), 128, 4): "BLOCK_N: 64, num_warps: 8"})
    assert fast.tuned_choices() == {"_prefill_paged_kernel(True, 128, 4)": "BLOCK_N: 64, num_warps: 8"}
    text = ec.tables({"results": [{"dtype": "bfloat16", "cascade_tuned": "_prefill_paged_kernel(...): BLOCK_N: 64"}]})
    assert "autotuner chose" in text and "bfloat16: _prefill_paged_kernel" in text


def test_count_syncs_names_the_calling_line(monkeypatch):
    """The profile's sync count: each warning CUDA's sync debug mode raises, by the line that caused it; the
    debug mode is restored afterwards."""
    import warnings

    import torch

    from pagoda.bench import engine_profile as ep

    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    class Engine:
        def step(self):
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)

    counts = ep._count_syncs(Engine(), 3)
    ((where, n),) = counts.items()
    assert where.startswith("test_bench_engine_cascade.py:") and n == 3
    assert modes == ["warn", 0]


def test_python_profile_names_the_functions_that_take_the_time():
    """The profile's cProfile rows: the function that spends a step's Python time comes first, with its calls
    over the steps run, and no more steps run than asked."""
    from pagoda.bench import engine_profile as ep

    def busy_python(n):
        x = 0
        for i in range(n):
            x += i
        return x

    class Engine:
        steps = 0

        def has_unfinished_requests(self):
            return True

        def step(self):
            self.steps += 1
            busy_python(300_000)

    engine = Engine()
    rows, n = ep._python_profile(engine, 3, lambda: None)
    assert n == engine.steps == 3
    assert rows[0]["name"].startswith("busy_python (test_bench_engine_cascade.py:") and rows[0]["calls"] == 3
    assert rows[0]["ms_per_step"] > 1
