"""Layer-level checks: RoPE settings from both config spellings, window rules, the forward context, and the
tensor-parallel layers at two processes (gloo on the CPU) against one process."""
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from pagoda.models import build_model, load_weights
from pagoda.models.decoder import uniform_sliding_window
from pagoda.models.layers import (
    ForwardContext,
    PagedAttention,
    RopeConfig,
    forward_context,
    get_forward_context,
    set_forward_context,
)
from tests.models.driver import PagedDriver

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192)


def test_rope_config_both_spellings():
    new = SimpleNamespace(rope_parameters=dict(LLAMA3, rope_theta=500000.0))
    old = SimpleNamespace(rope_scaling=dict(LLAMA3), rope_theta=500000.0)
    older = SimpleNamespace(rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=1e6)
    plain = SimpleNamespace(rope_theta=1e6, rope_scaling=None)
    assert RopeConfig.from_hf_config(new, 128) == RopeConfig.from_hf_config(old, 128) == RopeConfig(
        128, 500000.0, "llama3", 8.0, 1.0, 4.0, 8192)
    assert RopeConfig.from_hf_config(new, 128).append_kwargs() == dict(
        rotary_dim=128, interleave=False, rope_theta=500000.0, rope_scale=8.0, llama31=True, low_freq_factor=1.0,
        high_freq_factor=4.0, old_context_len=8192)
    assert RopeConfig.from_hf_config(older, 64).append_kwargs()["rope_scale"] == 2.0
    assert RopeConfig.from_hf_config(plain, 64) == RopeConfig(64, 1e6)
    assert RopeConfig.from_hf_config(SimpleNamespace(), 64) == RopeConfig(64, 10000.0)
    partial = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5})
    assert RopeConfig.from_hf_config(partial, 64).rotary_dim == 32


def test_rope_config_rejects():
    with pytest.raises(ValueError, match=r"rope_type 'yarn' is not supported.*llama3"):
        RopeConfig.from_hf_config(SimpleNamespace(rope_parameters={"rope_type": "yarn", "factor": 4.0}), 64)
    with pytest.raises(ValueError, match="rotary_dim"):
        RopeConfig(15)
    with pytest.raises(ValueError, match="rope_theta"):
        RopeConfig(16, rope_theta=0)


def test_sliding_window_rules():
    base = dict(num_hidden_layers=2)
    assert uniform_sliding_window(SimpleNamespace(**base)) is None
    assert uniform_sliding_window(SimpleNamespace(**base, sliding_window=4096)) == 4096
    assert uniform_sliding_window(SimpleNamespace(**base, sliding_window=None)) is None
    off = SimpleNamespace(**base, sliding_window=8, use_sliding_window=False, layer_types=["sliding_attention"] * 2)
    assert uniform_sliding_window(off) is None
    mixed = SimpleNamespace(**base, sliding_window=8, layer_types=["full_attention", "sliding_attention"])
    with pytest.raises(NotImplementedError, match="different sliding windows"):
        uniform_sliding_window(mixed)
    legacy_mixed = SimpleNamespace(**base, sliding_window=8, use_sliding_window=True, max_window_layers=1)
    with pytest.raises(NotImplementedError, match="different sliding windows"):
        uniform_sliding_window(legacy_mixed)


def test_forward_context_is_set_and_cleared():
    with pytest.raises(RuntimeError, match="no ForwardContext"):
        get_forward_context()
    t = torch.zeros(1, dtype=torch.int32)
    ctx = ForwardContext(None, t, t, t, torch.zeros(2, dtype=torch.int32), t)
    with pytest.raises(KeyError):
        with forward_context(ctx):
            assert get_forward_context() is ctx
            raise KeyError("inside")
    with pytest.raises(RuntimeError):
        get_forward_context()
    with pytest.raises(TypeError, match="ForwardContext"):
        set_forward_context("ctx")


def test_attention_without_cache_is_a_profiling_no_op():
    attn = PagedAttention(4, 2, 16, RopeConfig(16))
    q = torch.randn(5, 4, 16)
    assert torch.equal(attn(q, torch.randn(5, 2, 16), torch.randn(5, 2, 16)), torch.zeros_like(q))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        PagedAttention(4, 3, 16, RopeConfig(16))


IDS = [5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 12]


def _tp_logits(path) -> torch.Tensor:
    import transformers

    model = build_model(transformers.AutoConfig.from_pretrained(path), torch.float32, "cpu")
    load_weights(model, path)
    driver = PagedDriver(model)
    prefill = driver.step({"a": IDS}, all_logits=True)
    decode = driver.step({"a": [int(prefill[-1].argmax())]})
    return torch.cat([prefill, decode])


def _tp_worker(rank: int, world: int, port: int, path, out_file) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        logits = _tp_logits(path)
        if rank == 0:
            torch.save(logits, out_file)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensor_parallel_two_processes_match_one(tiny_model, tmp_path):
    """Column/row/merged/QKV-parallel linears (biases included), the vocabulary-parallel embedding and
    tied LM head at tp=2: each rank loads its shards; the logits equal the single-process model's."""
    path = tiny_model("llama3.1", attention_bias=True, mlp_bias=True)
    out_file = tmp_path / "tp2.pt"
    # fork: the children inherit the imports (a spawned child would re-import torch and transformers)
    mp.start_processes(_tp_worker, args=(2, _free_port(), path, out_file), nprocs=2, join=True, start_method="fork")
    torch.testing.assert_close(torch.load(out_file), _tp_logits(path), atol=1e-4, rtol=0)
