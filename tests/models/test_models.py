"""pagoda's models against Hugging Face transformers (eager attention, float32, CPU) on the tiny folders:
prefill logits of every prompt token, then decode steps over a paged KV cache of scattered 4-token pages,
and a batched step mixing a chunked prefill with a fresh prefill, then batched decodes."""
import pytest
import torch

from pagoda.models import build_model, load_weights
from tests.models.driver import PagedDriver
from tests.models.tiny import ARCHS, SLIDING_WINDOW

transformers = pytest.importorskip("transformers")

# Longer than Mistral's window of 8, with multi-byte characters.
PROMPT = "The quick brown fox jumps over the lazy dog. Café 中文 🙂"
OTHER = "Continuous batching adds new requests at every step."
ATOL = 2e-4  # float32 logits of magnitude <= ~35 (llama3.1's tied table); HF and pagoda sum in other orders


def _load(path):
    config = transformers.AutoConfig.from_pretrained(path)
    model = build_model(config, torch.float32, "cpu")
    load_weights(model, path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return model, hf, tok


@torch.no_grad()
def _hf_logits(hf, ids):
    return hf(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_decode_match_hf(tiny_model, arch):
    model, hf, tok = _load(tiny_model(arch))
    ids = tok(PROMPT).input_ids
    assert len(ids) > 2 * SLIDING_WINDOW
    driver = PagedDriver(model, page_size=4)
    out = driver.step({"a": ids}, all_logits=True)
    ref = _hf_logits(hf, ids)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    seq = list(ids)
    for _ in range(4):
        seq.append(int(ref[-1].argmax()))
        out = driver.step({"a": seq[-1:]})
        ref = _hf_logits(hf, seq)
        torch.testing.assert_close(out[0], ref[-1], atol=ATOL, rtol=0)
    assert len(driver.pages["a"]) == -(-len(seq) // 4)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_chunked_prefill_and_decode_match_hf(tiny_model, arch):
    """Step 1: the first 7 tokens of A. Step 2: the rest of A (queries after cached keys, bottom-right
    causal) with all of B. Steps 3-4: one token each for A and B in one decode batch."""
    model, hf, tok = _load(tiny_model(arch))
    a, b = tok(PROMPT).input_ids, tok(OTHER).input_ids
    driver = PagedDriver(model, page_size=4, seed=1)
    driver.step({"a": a[:7]})
    out = driver.step({"a": a[7:], "b": b}, all_logits=True)
    torch.testing.assert_close(out[:len(a) - 7], _hf_logits(hf, a)[7:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[len(a) - 7:], _hf_logits(hf, b), atol=ATOL, rtol=0)
    seqs = {"a": list(a), "b": list(b)}
    for step in range(2):
        for s in seqs.values():
            s.append(int(_hf_logits(hf, s)[-1].argmax()))
        out = driver.step({k: s[-1:] for k, s in seqs.items()})
        for i, s in enumerate(seqs.values()):
            torch.testing.assert_close(out[i], _hf_logits(hf, s)[-1], atol=ATOL, rtol=0, msg=f"step {step}")


def test_sliding_window_is_what_hf_masks(tiny_model):
    """Mistral's window of 8 is window_left 7 (a query sees itself and 7 keys before); 6 or 8 would differ
    from HF here, so the equality above pins the convention."""
    model, hf, tok = _load(tiny_model("mistral"))
    assert model.attn_plan_kwargs["window_left"] == SLIDING_WINDOW - 1
    ids = tok(PROMPT).input_ids
    ref = _hf_logits(hf, ids)
    for window_left in (SLIDING_WINDOW - 2, SLIDING_WINDOW):
        kwargs = dict(model.attn_plan_kwargs, window_left=window_left)
        out = PagedDriver(model).step({"a": ids}, all_logits=True, plan_kwargs=kwargs)
        assert (out - ref).abs().max() > 100 * ATOL


def test_qwen2_use_sliding_window(tiny_model):
    """Qwen2 with use_sliding_window on every layer (max_window_layers=0) takes the window."""
    model, hf, tok = _load(tiny_model("qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=0))
    assert model.attn_plan_kwargs["window_left"] == 5
    ids = tok(PROMPT).input_ids
    out = PagedDriver(model).step({"a": ids}, all_logits=True)
    torch.testing.assert_close(out, _hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_llama3_rope_scaling_matters(tiny_model):
    """The tiny Llama's llama3 frequency bands change its logits (so matching HF checks the scaling)."""
    path = tiny_model("llama3.1")
    model, hf, tok = _load(path)
    assert model.attention_layers()[0].rope.rope_type == "llama3"
    ids = tok(PROMPT).input_ids
    out = PagedDriver(model).step({"a": ids}, all_logits=True)
    rope = model.attention_layers()[0].rope
    for layer in model.attention_layers():  # the same weights without the scaling
        layer._rope_kwargs = dict(rotary_dim=rope.rotary_dim, rope_theta=rope.rope_theta)
    plain = PagedDriver(model).step({"a": ids}, all_logits=True)
    assert (out - plain).abs().max() > 100 * ATOL
    torch.testing.assert_close(out, _hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_tied_embeddings(tiny_model):
    """Llama 3.2-style tied embeddings: the checkpoint has no lm_head.weight; the head shares the table."""
    from safetensors import safe_open

    path = tiny_model("llama3.1")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    model, _, _ = _load(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied, _, _ = _load(tiny_model("qwen3"))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


@pytest.mark.parametrize("arch", ARCHS)
def test_interface(tiny_model, arch):
    model, _, _ = _load(tiny_model(arch))
    spec = model.kv_cache_spec
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype) == (2, 2, 16, torch.float32)
    assert len(model.attention_layers()) == 2
    assert model.attn_plan_kwargs["sm_scale"] == 16 ** -0.5
    assert model.attn_plan_kwargs["logits_soft_cap"] is None
    assert model.compute_logits(torch.randn(3, 64)).dtype == torch.float32
