"""``pagoda bench engine --processors`` on the CPU with a tiny model and a handful of requests: every row runs,
the ratios are of each system's own plain run, and the constraint is the same in every form (the processors
ban the same ids and penalise the same tokens as the engine's built-in path)."""
from __future__ import annotations

import json

import pytest
import torch

from pagoda.bench import engine as eb
from pagoda.bench import engine_processors as ep
from tests.models.tiny import tiny_model  # noqa: F401


def test_bench_engine_processors_cli_tiny(tiny_model, tmp_path):  # noqa: F811
    model = tiny_model("qwen3")
    out = tmp_path / "out"
    rc = eb.main(["--processors", "--model", str(model), "--num-requests", "3", "--min-len", "3", "--max-len", "5",
                  "--max-model-len", "32", "--budget-s", "30", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "engine-processors.json").read_text())
    rows = {r["system"]: r for r in report["results"]}
    assert set(rows) == {f"pagoda-{v}" for v in ep.PAGODA_VARIANTS} | {
        "hf-static", "hf-static-processor", "hf-dynamic", "hf-dynamic-processor"}
    assert all(r["status"] == "ok" and r["output_tok_s"] > 0 for r in rows.values()), rows
    for name, r in rows.items():
        base = "pagoda-plain" if name.startswith("pagoda") else name.removesuffix("-processor")
        assert r["vs_plain"] == pytest.approx(r["output_tok_s"] / rows[base]["output_tok_s"], rel=1e-3)
    assert rows["pagoda-plain"]["vs_plain"] == 1
    assert "banned token ids" in (out / "engine-processors.md").read_text()


def test_the_forms_apply_the_same_constraint():
    """On the same logits and tokens: HF's Python processor and pagoda's batch-level processor ban the same ids
    (-inf); the callable does too; the penalty is HF's (divide positive logits, multiply negative ones)."""
    vocab = 400
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, vocab, generator=g)
    ids = torch.randint(0, vocab, (3, 6), generator=g)
    hf = ep._hf_constraint(vocab, torch.device("cpu"))[0](ids, logits.clone())
    ref = logits.clone().double()
    for r in range(3):
        for t in set(ids[r].tolist()):
            ref[r, t] = ref[r, t] * ep.PENALTY if ref[r, t] < 0 else ref[r, t] / ep.PENALTY
    ref[:, ep.banned(vocab)] = float("-inf")
    torch.testing.assert_close(hf.double(), ref)

    class _Cfg:
        class hf_config:
            vocab_size = vocab

    batch = ep.BanTokens(_Cfg, torch.device("cpu"), False).apply(logits.clone())
    assert torch.isneginf(batch).sum(1).tolist() == [len(ep.banned(vocab))] * 3
    assert torch.isneginf(batch[:, ep.banned(vocab)]).all()
    one = ep._ban_callable(torch.device("cpu"), vocab)([], logits[0].clone())
    assert torch.equal(torch.isneginf(one), torch.isneginf(batch[0]))
    bias = ep._sampling_kwargs("builtin", torch.device("cpu"), vocab)["logit_bias"]
    assert sorted(bias) == ep.banned(vocab) and set(bias.values()) == {-100.0}


def test_structured_variant_constrains_every_token(tmp_path):
    """The structured row's regex on the benchmark's own tokenizer (tokens ``t<id>``): every generated token is
    one whose text starts with t1..t5, and the grammar never ends before ``max_tokens``."""
    import re

    from pagoda.engine import LLM, SamplingParams

    spec = dict(eb.QWEN3_0_6B, vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    model = eb.dummy_model_dir(spec, "qwen3", tmp_path / "m")
    llm = LLM(str(model), load_format="dummy", dtype="float32", max_model_len=64, device="cpu")
    kw = ep._sampling_kwargs("structured", torch.device("cpu"), 600)
    outs = llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 4,
                        SamplingParams(temperature=1.0, seed=3, max_tokens=24, ignore_eos=True, **kw))
    for o in outs:
        ids = o.outputs[0].token_ids
        assert len(ids) == 24
        assert all(re.fullmatch(r"t[1-5][0-9]*", f"t{t}") for t in ids), ids
    free = SamplingParams(temperature=1.0, seed=3, max_tokens=24, ignore_eos=True)
    unconstrained = llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 4, free)
    assert any(not re.fullmatch(r"t[1-5][0-9]*", f"t{t}") for o in unconstrained for t in o.outputs[0].token_ids)
