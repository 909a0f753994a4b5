"""The engine on a GPU in bfloat16 (Triton kernels): greedy tokens equal HF transformers' bf16 ``generate``
or first differ where HF's two best logits are within bf16 rounding; the memory profile sizes the KV cache;
a Qwen3-0.6B-shaped model with dummy weights serves a batch."""
from __future__ import annotations

import pytest
import torch

from pagoda.engine import LLM, SamplingParams
from tests.models.tiny import ARCHS

pytestmark = pytest.mark.gpu

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "The quick brown fox jumps over the lazy dog. A paged key-value cache stores",
    "Rotary position embeddings rotate pairs of features by an angle",
    "Numbers: 0 1 2 3 4 5",
]
NEW = 12


def _close_call(logits: torch.Tensor) -> bool:
    """HF's two best logits are within a few bf16 roundings of each other (either could win)."""
    top = logits.float().topk(2).values
    return float(top[0] - top[1]) <= 4 * 2.0 ** -8 * max(abs(float(top[0])), 1.0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("settings", [dict(), dict(block_size=4, max_num_batched_tokens=8, max_num_seqs=4,
                                                   num_gpu_blocks_override=24)],
                         ids=["default", "chunked-preempted"])
def test_bf16_greedy_matches_hf(arch, settings, tiny_model):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model(arch)
    llm = LLM(str(model_dir), dtype="bfloat16", max_model_len=128, gpu_memory_utilization=0.3, **settings)
    if "num_gpu_blocks_override" not in settings:
        assert llm.llm_engine.block_manager.num_blocks > 0
    params = SamplingParams(temperature=0, max_tokens=NEW, min_tokens=NEW)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    for out in outs:
        ids = torch.tensor([out.prompt_token_ids], device="cuda")
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                              do_sample=False, output_logits=True, return_dict_in_generate=True)
        ref_tokens = ref.sequences[0, ids.shape[1]:].tolist()
        ours = out.outputs[0].token_ids
        diff = next((j for j, (a, b) in enumerate(zip(ours, ref_tokens, strict=True)) if a != b), None)
        if diff is not None:
            assert _close_call(ref.logits[diff][0]), f"{arch}: first difference at {diff}: {ours} vs {ref_tokens}"
    if "num_gpu_blocks_override" in settings:
        assert llm.llm_engine.scheduler.num_preemptions > 0


def test_seeded_sampling_on_gpu(tiny_model):
    # Same seed, same batch: the same tokens run after run. Across batch compositions the draws are the same
    # but the logits need not be on a GPU (cuBLAS and the split-KV plan pick their reductions by batch size, and
    # a last-bit difference can move a draw at temperature 1), as in vLLM; the CPU tests check batch invariance.
    llm = LLM(str(tiny_model("qwen3")), dtype="bfloat16", max_model_len=128, gpu_memory_utilization=0.3)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, min_p=0.01, seed=11, max_tokens=16)
    batch = [SamplingParams(temperature=1.0, max_tokens=8)] * 3 + [params]
    first = llm.generate(PROMPTS, batch, use_tqdm=False)[3].outputs[0].token_ids
    again = llm.generate(PROMPTS, batch, use_tqdm=False)[3].outputs[0].token_ids
    assert first == again and len(first) == 16


def test_qwen3_0_6b_shaped_dummy_model(tmp_path, tiny_model):
    import transformers

    config = transformers.Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1e6, tie_word_embeddings=True,
        rms_norm_eps=1e-6, architectures=["Qwen3ForCausalLM"])
    config.save_pretrained(tmp_path)
    transformers.AutoTokenizer.from_pretrained(tiny_model("qwen3")).save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), load_format="dummy", dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.5)
    engine = llm.llm_engine
    assert engine.config.max_num_batched_tokens == 8192 and engine.block_manager.num_blocks > 1000
    gen = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(0, 151936, (int(n),), generator=gen).tolist()}
               for n in torch.randint(16, 600, (48,), generator=gen)]
    params = [SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.95, top_k=40, max_tokens=32, ignore_eos=True, logprobs=2)]
    outs = llm.generate(prompts, [params[i % 2] for i in range(len(prompts))], use_tqdm=False)
    for i, out in enumerate(outs):
        c = out.outputs[0]
        assert len(c.token_ids) == 32 and c.finish_reason == "length"
        assert all(0 <= t < 151936 for t in c.token_ids)
        if i % 2:
            assert len(c.logprobs) == 32
    # Served again from the prefix cache (dummy logits are too flat to compare greedy tokens across batches).
    again = llm.generate(prompts[0], params[0], use_tqdm=False)[0]
    assert again.num_cached_tokens >= 16 and len(again.outputs[0].token_ids) == 32
