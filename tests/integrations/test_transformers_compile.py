"""attn_implementation="pagoda" under torch.compile (HF compiles a static cache's decode step, with CUDA graphs on
a GPU): the traced path needs no host sync and breaks no graph, and gives what the eager path gives."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from pagoda.integrations import transformers as pt  # noqa: E402
from pagoda.ops import _decode_op  # noqa: E402
from tests.integrations.test_transformers import _batch, _load  # noqa: E402
from tests.integrations.test_transformers_masks import _mask, _module, _reference  # noqa: E402


@pytest.mark.parametrize("starts,ends,window", [([0, 0, 0], [9, 9, 9], None), ([0, 3, 7], [9, 9, 9], None),
                                                ([0, 3, 7], [9, 12, 8], 3), ([2, 5, 0], [5, 5, 0], None)])
@pytest.mark.parametrize("float_mask", [False, True])
def test_traced_decode_matches_sdpa(starts, ends, window, float_mask):
    """Static cache with and without padding, a sliding window inside the mask, rows that see nothing
    (zeros), HF's additive float masks: the `pagoda::decode_hf` op against SDPA under the same mask."""
    b, hq, hk, d, sk = 3, 4, 2, 16, 12
    q, k, v = torch.randn(b, hq, 1, d), torch.randn(b, hk, sk, d), torch.randn(b, hk, sk, d)
    mask = _mask(b, 1, sk, starts, ends, window)
    given = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min) if float_mask else mask
    out = pt._traced_forward(_module(), q, k, v, given, 0.0, 0.3, None, window, None)
    rows = mask[:, 0].any(-1)
    torch.testing.assert_close(out[rows], _reference(q, k, v, mask, 0.3)[rows], atol=1e-5, rtol=1e-5)
    assert (out[~rows] == 0).all()


def test_traced_paths_without_a_mask_and_with_a_pattern_mask():
    """No mask: every key (a window longer than the cache changes nothing; a shorter one is applied);
    prefill with a mask: exact SDPA; per-head masks: exact SDPA."""
    b, hq, hk, d, sk = 2, 4, 2, 16, 10
    q, k, v = torch.randn(b, hq, 1, d), torch.randn(b, hk, sk, d), torch.randn(b, hk, sk, d)
    everything = torch.ones(b, 1, 1, sk, dtype=torch.bool)
    torch.testing.assert_close(pt._traced_forward(_module(), q, k, v, None, 0.0, 0.3, None, None, None),
                               _reference(q, k, v, everything, 0.3))
    last4 = _mask(b, 1, sk, [0, 0], [sk, sk], window=4)
    torch.testing.assert_close(pt._traced_forward(_module(), q, k, v, None, 0.0, 0.3, None, 4, None),
                               _reference(q, k, v, last4, 0.3))
    qp = torch.randn(b, hq, 5, d)
    causal = _mask(b, 5, sk, [0, 2], [sk, sk])
    torch.testing.assert_close(pt._traced_forward(_module(), qp, k, v, causal, 0.0, 0.3, None, None, None),
                               _reference(qp, k, v, causal, 0.3))
    per_head = torch.rand(b, hq, 1, sk) > 0.3
    per_head[..., 0] = True
    torch.testing.assert_close(pt._traced_forward(_module(), q, k, v, per_head, 0.0, 0.3, None, None, None),
                               _reference(q, k, v, per_head, 0.3))


def test_compiled_static_generate_is_one_graph_and_equals_eager(model_dir, monkeypatch):
    """HF's own auto-compile of the decode step (static cache), forced on the CPU, with fullgraph=True: a graph
    break anywhere in pagoda's attention would raise. The decode op runs, and the greedy tokens equal the
    uncompiled sdpa and pagoda generates (padded batch)."""
    calls = []
    real = _decode_op.decode_dense_masked
    monkeypatch.setattr(_decode_op, "decode_dense_masked", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    torch._dynamo.reset()
    ids, mask = _batch()
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    cfg = transformers.CompileConfig(backend="aot_eager", fullgraph=True)
    cfg._compile_all_devices = True
    with torch.no_grad():
        want = _load(model_dir, "sdpa").generate(input_ids=ids, attention_mask=mask, disable_compile=True, **kw)
        eager = _load(model_dir, "pagoda").generate(input_ids=ids, attention_mask=mask, disable_compile=True, **kw)
        assert not calls, "the eager path took the compiled path's op"
        got = _load(model_dir, "pagoda").generate(input_ids=ids, attention_mask=mask, compile_config=cfg, **kw)
    torch._dynamo.reset()
    assert calls, "the compiled decode step did not run pagoda's decode op"
    assert torch.equal(got, want) and torch.equal(eager, want)


@pytest.mark.gpu
def test_gpu_compiled_static_generate_close_to_sdpa(model_dir, monkeypatch):
    """HF's default for a static cache on a GPU: the decode step compiled by Inductor with CUDA graphs
    (reduce-overhead). pagoda's decode op is captured (it ran while recording), and the scores match sdpa's
    compiled generate on a padded batch."""
    calls = []
    real = _decode_op.decode_dense_masked
    monkeypatch.setattr(_decode_op, "decode_dense_masked", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ids, mask = (t.cuda() for t in _batch())
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
              cache_implementation="static")
    scores = {}
    for impl in ("sdpa", "pagoda"):
        torch._dynamo.reset()
        pt.register()
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=impl,
                                                                  dtype=torch.float16).cuda().eval()
        with torch.no_grad():
            for _ in range(2):                      # the second generate replays the recorded graphs
                scores[impl] = torch.stack(model.generate(input_ids=ids, attention_mask=mask, **kw).scores)
    torch._dynamo.reset()
    assert calls, "the compiled decode step did not run pagoda's decode op"
    a, b = scores["pagoda"].float(), scores["sdpa"].float()
    assert ((a - b).norm() / b.norm()).item() < 1e-2


_ARCHS = {  # tiny configs: GQA 4/2; Qwen3's q/k norms; Gemma2's soft cap and sliding layers; Mistral's window
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, sliding_window=6, attn_logit_softcapping=20.0,
                                                         final_logit_softcapping=None)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=6)),
}


@pytest.mark.parametrize("arch", sorted(_ARCHS))
def test_compiled_static_generate_of_other_architectures(arch, tmp_path, monkeypatch):
    """The traced path under the masks these models build (sliding-window layers, a soft cap), the generate
    longer than the window: one graph (fullgraph=True), every decode attention through pagoda's op (2 layers
    x 7 compiled steps), and the same greedy tokens as eager attention."""
    calls = []
    real = _decode_op.decode_dense_masked
    monkeypatch.setattr(_decode_op, "decode_dense_masked", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cfg_name, model_name, extra = _ARCHS[arch]
    cfg = getattr(transformers, cfg_name)(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                          pad_token_id=0, eos_token_id=1, bos_token_id=2, **extra)
    torch.manual_seed(0)
    getattr(transformers, model_name)(cfg).save_pretrained(tmp_path)
    ids, mask = _batch()
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, cache_implementation="static")
    compile_cfg = transformers.CompileConfig(backend="aot_eager", fullgraph=True)
    compile_cfg._compile_all_devices = True
    torch._dynamo.reset()
    with torch.no_grad():
        want = _load(tmp_path, "eager").generate(input_ids=ids, attention_mask=mask, disable_compile=True, **kw)
        got = _load(tmp_path, "pagoda").generate(input_ids=ids, attention_mask=mask, compile_config=compile_cfg, **kw)
    torch._dynamo.reset()
    assert torch.equal(got, want) and len(calls) == 2 * 7
