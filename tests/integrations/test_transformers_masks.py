"""pagoda's HF attention function under every mask layout HF produces: dense slices (static cache without
padding), ragged batches (padding), sliding windows, the exact SDPA fallback; and its host path: one mask
read per forward, no custom-op dispatch outside torch.compile."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from pagoda.integrations import transformers as pt  # noqa: E402


def _module():
    m = torch.nn.Module()
    m.is_causal = True
    return m


def _mask(b, sq, sk, starts, ends, window=None):
    """Boolean [b, 1, sq, sk]: row i's keys [starts[i], ends[i]), its sq queries the last sq of them
    (bottom-right causal), optionally a sliding window of ``window`` keys."""
    m = torch.zeros(b, 1, sq, sk, dtype=torch.bool)
    for i in range(b):
        n = ends[i] - starts[i]
        for j in range(sq):
            pos = n - sq + j                     # this query's index among the valid keys
            if pos < 0:
                continue                         # a padding query: sees nothing
            lo = 0 if window is None else max(0, pos - window + 1)
            m[i, 0, j, starts[i] + lo:starts[i] + pos + 1] = True
    return m


def _reference(q, k, v, mask, scale):
    g = q.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                                           attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("sq", [1, 5])
@pytest.mark.parametrize("layout,window", [("dense", None), ("ragged", None), ("dense", 3), ("ragged", 3)])
def test_masks_match_sdpa(sq, layout, window):
    torch.manual_seed(0)
    b, hq, hk, d, sk = 3, 4, 2, 16, 12
    q, k, v = torch.randn(b, hq, sq, d), torch.randn(b, hk, sk, d), torch.randn(b, hk, sk, d)
    if layout == "dense":      # static cache, no padding: keys [0, 9) of 12 slots
        starts, ends = [0] * b, [9] * b
    else:                      # left padding of different lengths, empty slots after
        starts, ends = [0, 3, 7], [9, 9, 9]
    mask = _mask(b, sq, sk, starts, ends, window)
    pt._LAYOUTS.clear()
    out, _ = pt.pagoda_attention_forward(_module(), q, k, v, mask, scaling=0.3,
                                         sliding_window=window)
    assert next(iter(pt._LAYOUTS.values()))[2][0] == layout
    rows = mask[:, 0].any(-1)                    # queries that see something (others: zeros)
    ref = _reference(q, k, v, mask, 0.3)
    torch.testing.assert_close(out[rows], ref[rows], atol=1e-5, rtol=1e-5)
    assert (out[~rows] == 0).all()


def test_unpadded_static_prefill_without_mask_cuts_empty_slots():
    # HF passes no mask for a prefill into an empty static cache; keys past the prompt are empty slots.
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    out, _ = pt.pagoda_attention_forward(_module(), q, k, v, None, scaling=0.25)
    ref = _reference(q, k[:, :, :5], v[:, :, :5], torch.ones(5, 5, dtype=torch.bool).tril(), 0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_float_and_per_head_masks():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    allowed = _mask(2, 3, 7, [0, 2], [6, 6])
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    out, _ = pt.pagoda_attention_forward(_module(), q, k, v, additive, scaling=0.25)
    torch.testing.assert_close(out, _reference(q, k, v, allowed, 0.25), atol=1e-5, rtol=1e-5)
    per_head = allowed.expand(2, 4, 3, 7).clone()
    per_head[:, 1, :, 2] = False                 # not a padding/causal pattern: exact SDPA fallback
    out, _ = pt.pagoda_attention_forward(_module(), q, k, v, per_head, scaling=0.25)
    torch.testing.assert_close(out, _reference(q, k, v, per_head, 0.25), atol=1e-5, rtol=1e-5)


def test_mask_read_once_per_mask_and_again_after_an_in_place_edit(monkeypatch):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    mask = _mask(2, 1, 8, [0, 0], [5, 5])
    reads = []
    real = pt._read_mask
    monkeypatch.setattr(pt, "_read_mask", lambda *a: reads.append(1) or real(*a))
    pt._LAYOUTS.clear()
    for _ in range(4):                            # four layers of one forward
        out, _ = pt.pagoda_attention_forward(_module(), q, k, v, mask, scaling=0.25)
    assert len(reads) == 1
    mask[:, :, :, 5] = True                       # the next step's mask, written in place
    out, _ = pt.pagoda_attention_forward(_module(), q, k, v, mask, scaling=0.25)
    assert len(reads) == 2
    torch.testing.assert_close(out, _reference(q, k, v, mask, 0.25), atol=1e-5, rtol=1e-5)


def test_sliding_window_model_matches_eager():
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                     sliding_window=4, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = transformers.MistralForCausalLM(cfg).eval()
    pt.register()
    ids = torch.randint(3, 96, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    logits = {}
    for impl in ("eager", "pagoda"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            logits[impl] = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(logits["pagoda"][valid], logits["eager"][valid], atol=1e-4, rtol=1e-4)


def test_attention_op_launches_directly_outside_compile(monkeypatch):
    # The custom op's dispatcher entry costs ~80 µs of host time under no_grad: eager calls skip it;
    # torch.compile still sees one opaque op.
    from pagoda.ops import _attention_op as op

    launched = []
    monkeypatch.setattr(op, "_launch", lambda q, k, v, out, *rest: launched.append(1) or out.copy_(q))
    dispatched = []
    real_op = op.attention_fwd_custom_op
    monkeypatch.setattr(op, "attention_fwd_custom_op", lambda *a: dispatched.append(1) or real_op(*a))
    q = torch.randn(1, 4, 2, 16)

    def f(q):
        out = torch.empty_like(q)
        op.attention_fwd_op(q, q, q, out, None, None, None, None, 4, 1, 0.25, -1, 0, 0.0)
        return out * 2

    with torch.no_grad():
        torch.testing.assert_close(f(q), q * 2)
    assert launched == [1] and dispatched == []
    torch.testing.assert_close(torch.compile(f, backend="aot_eager", fullgraph=True)(q), q * 2)
    assert dispatched and len(launched) >= 2


def test_host_overhead_probe_runs_on_cpu():
    from pagoda.bench import hf_overhead
    res = hf_overhead.measure(torch.device("cpu"), batch=2, kv_len=8, capacity=12, n=20)
    assert res["stubbed_launch"]
    assert all(isinstance(v, float) and v > 0 for v in res["us_per_call"].values()), res


def test_inference_mode_masks_are_read_every_call(monkeypatch):
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    reads = []
    real = pt._read_mask
    monkeypatch.setattr(pt, "_read_mask", lambda *a: reads.append(1) or real(*a))
    with torch.inference_mode():
        mask = _mask(1, 1, 6, [0], [4])
        for _ in range(2):
            pt.pagoda_attention_forward(_module(), q, k, v, mask, scaling=0.25)
        mask[..., 4] = True                      # in place, no version counter to tell
        out, _ = pt.pagoda_attention_forward(_module(), q, k, v, mask, scaling=0.25)
    assert len(reads) == 3
    torch.testing.assert_close(out, _reference(q, k, v, mask, 0.25), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("starts,ends", [([2, 5], [5, 5]), ([0, 0], [0, 0])])
def test_decode_rows_without_keys_give_zeros(starts, ends):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    mask = _mask(2, 1, 8, starts, ends)
    out, _ = pt.pagoda_attention_forward(_module(), q, k, v, mask, scaling=0.25)
    rows = mask[:, 0].any(-1)
    assert (out[~rows] == 0).all()
    torch.testing.assert_close(out[rows], _reference(q, k, v, mask, 0.25)[rows], atol=1e-5, rtol=1e-5)


def test_attention_sinks_are_refused():
    """GPT-OSS hands per-head sinks (s_aux) that change the softmax's denominator: refused, never ignored."""
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(NotImplementedError, match="s_aux"):
        pt.pagoda_attention_forward(_module(), q, k, k, None, scaling=0.25, s_aux=torch.zeros(4))
    out, _ = pt.pagoda_attention_forward(_module(), q, k, k, None, scaling=0.25, s_aux=None)   # absent: fine
    assert out.shape == (1, 1, 4, 16)


def _naive(q, k, v, allowed, scale, softcap=0.0):
    """float64 attention with the keys repeated per query head, soft cap, bool mask; zeros where a row sees
    no key."""
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q.double() @ k.transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2)


@pytest.mark.parametrize("softcap", [0.0, 30.0, 2.0])
@pytest.mark.parametrize("float_mask", [False, True])
def test_exact_fallback_with_gqa_and_soft_cap(softcap, float_mask):
    """Masks that are not padding + causal go to the exact fallback: GQA without repeating the keys, and a
    soft cap (Gemma 2) computed there instead of refused; per-head masks; a bool row that sees nothing gives
    zeros."""
    torch.manual_seed(1)
    b, hq, hk, sq, sk, d = 2, 8, 2, 3, 7, 16
    q, k, v = torch.randn(b, hq, sq, d), torch.randn(b, hk, sk, d), torch.randn(b, hk, sk, d)
    allowed = torch.rand(b, hq, sq, sk) > 0.4
    allowed[..., 0] = True
    if not float_mask:
        allowed[1, 3, 2] = False                     # one row of one head sees nothing
    given = (torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min) if float_mask
             else allowed)
    out = pt._sdpa_fallback(_module(), q, k, v, given, 0.3, softcap)
    assert out.shape == (b, sq, hq, d)
    torch.testing.assert_close(out.double(), _naive(q, k, v, allowed, 0.3, softcap), atol=1e-5, rtol=1e-5)
    shared = allowed[:, :1].clone()                   # HF's usual [b, 1, q, k] mask
    out = pt._sdpa_fallback(_module(), q, k, v, shared, 0.3, softcap)
    torch.testing.assert_close(out.double(), _naive(q, k, v, shared, 0.3, softcap), atol=1e-5, rtol=1e-5)
