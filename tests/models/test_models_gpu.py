"""pagoda's models on CUDA (Triton kernels: fused RoPE + append, paged prefill and decode) against HF
transformers on the same GPU, float32 and bfloat16, and a Qwen3-0.6B-shaped dummy model."""
import pytest
import torch

from pagoda.models import build_model, init_dummy_weights, load_weights
from tests.helpers import rel_err
from tests.models.driver import PagedDriver
from tests.models.test_models import OTHER, PROMPT
from tests.models.tiny import ARCHS

transformers = pytest.importorskip("transformers")

# Relative error of the logits: float32 attention may run tf32 dots on the GPU; bf16 rounds every layer.
TOL = {torch.float32: 5e-3, torch.bfloat16: 4e-2}


def _check(out, ref, dtype, what):
    assert torch.isfinite(out).all(), what
    assert rel_err(out, ref) < TOL[dtype], f"{what}: rel err {rel_err(out, ref):.2e}"
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.1 * ref.abs().amax(-1)  # rows whose winner is not a near tie
    assert torch.equal(out.argmax(-1)[clear], ref.argmax(-1)[clear]), what


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHS)
def test_models_match_hf_on_gpu(tiny_model, arch, dtype):
    path = tiny_model(arch)
    config = transformers.AutoConfig.from_pretrained(path)
    model = build_model(config, dtype, "cuda")
    load_weights(model, path)
    assert model.model.embed_tokens.weight.is_cuda
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=dtype).cuda().eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    a, b = tok(PROMPT).input_ids, tok(OTHER).input_ids

    @torch.no_grad()
    def hf_logits(ids):
        return hf(torch.tensor([ids], device="cuda")).logits[0].float()

    driver = PagedDriver(model, page_size=16)
    driver.step({"a": a[:5]})
    out = driver.step({"a": a[5:], "b": b}, all_logits=True)
    _check(out[:len(a) - 5], hf_logits(a)[5:], dtype, "prefill a")
    _check(out[len(a) - 5:], hf_logits(b), dtype, "prefill b")
    seqs = {"a": list(a), "b": list(b)}
    for step in range(3):
        for s in seqs.values():
            s.append(int(hf_logits(s)[-1].argmax()))
        out = driver.step({k: s[-1:] for k, s in seqs.items()})
        for i, s in enumerate(seqs.values()):
            _check(out[i], hf_logits(s)[-1], dtype, f"decode step {step}")


@pytest.mark.gpu
def test_qwen3_06b_shaped_dummy_model_runs():
    config = transformers.Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                                      num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                      head_dim=128, max_position_embeddings=40960, rope_theta=1e6,
                                      tie_word_embeddings=True, architectures=["Qwen3ForCausalLM"])
    model = build_model(config, torch.bfloat16, "cuda")
    init_dummy_weights(model, seed=0)
    driver = PagedDriver(model, page_size=16, num_pages=256)
    gen = torch.Generator().manual_seed(0)
    prompts = {i: torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for i, n in enumerate((300, 77))}
    logits = driver.step(prompts)
    for _ in range(4):
        assert torch.isfinite(logits).all() and logits.std(-1).min() > 0.1
        logits = driver.step({i: [int(t)] for i, t in enumerate(logits.argmax(-1))})
    assert torch.isfinite(logits).all()
