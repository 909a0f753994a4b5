"""attn_implementation="pagoda" in HF transformers: same logits and greedy tokens as eager and sdpa."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from pagoda.integrations import transformers as pt  # noqa: E402


def _load(path, impl):
    pt.register()
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl,
                                                             dtype=torch.float32).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0      # left padding, as generate() expects for decoder-only models
    mask[2, :9] = 0
    ids[mask == 0] = 0
    return ids, mask


def test_forward_logits_match_eager_with_padding(model_dir):
    ids, mask = _batch()
    with torch.no_grad():
        ref = _load(model_dir, "eager")(input_ids=ids, attention_mask=mask).logits
        out = _load(model_dir, "pagoda")(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_tokens_equal_eager_and_sdpa(model_dir, cache, padded):
    # Unpadded + static: HF drops the prefill mask although the keys include the cache's empty slots.
    ids, mask = _batch()
    if not padded:
        ids, mask = ids[:1], mask[:1]
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    outs = {}
    for impl in ("eager", "sdpa", "pagoda"):
        with torch.no_grad():
            outs[impl] = _load(model_dir, impl).generate(input_ids=ids, attention_mask=mask, **kw)
    assert outs["pagoda"].shape[1] == ids.shape[1] + 12
    assert torch.equal(outs["pagoda"], outs["eager"])
    assert torch.equal(outs["pagoda"], outs["sdpa"])


def test_non_causal_pattern_masks_fall_back_exactly():
    # A mask that is not padding + causal (a block-diagonal "packed documents" mask) takes the exact fallback.
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    allowed = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    allowed[..., :3, :3] = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    allowed[..., 3:, 3:] = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = pt.pagoda_attention_forward(module, q, k, v, allowed, scaling=0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           attn_mask=allowed, scale=0.25).transpose(1, 2)
    torch.testing.assert_close(out, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_gpu_logits_close_to_sdpa(model_dir, cache):
    ids, mask = _batch()
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    if cache == "static":
        kw["cache_implementation"] = "static"
    scores = {}
    for impl in ("sdpa", "pagoda"):
        pt.register()
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=impl,
                                                                  dtype=torch.float16).cuda().eval()
        with torch.no_grad():
            scores[impl] = torch.stack(model.generate(input_ids=ids, attention_mask=mask, **kw).scores)
    a, b = scores["pagoda"].float(), scores["sdpa"].float()
    assert ((a - b).norm() / b.norm()).item() < 1e-2
