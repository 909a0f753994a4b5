"""Batch/single decode over paged KV: against flash_attn_func on the same data laid out contiguously
(CPU path here, the Triton kernels under @gpu), options, validation, CUDA-graph replay."""
import math

import pytest
import torch

import pagoda
from pagoda.ops import decode as dec
from pagoda.ops import rope
from pagoda.reference import decode as ref
from tests.helpers import assert_finite_lse_close, fake_fast_launch, rel_err
from tests.paged_utils import empty_cache, fill_cache, random_page_table


def _batch(lens, page_size, hq, hk, d, layout, dtype, device="cpu", tuple_form=False):
    indptr, indices, last, max_pages = random_page_table(lens, page_size, device=device)
    cache = empty_cache(max_pages, page_size, hk, d, layout, dtype, device=device, tuple_form=tuple_form)
    keys = [torch.randn(n, hk, d, dtype=dtype, device=device) for n in lens]
    vals = [torch.randn(n, hk, d, dtype=dtype, device=device) for n in lens]
    fill_cache(cache, keys, vals, indptr.cpu(), indices.cpu(), page_size, layout)
    q = torch.randn(len(lens), hq, d, dtype=dtype, device=device)
    return q, cache, keys, vals, (indptr, indices, last)


LOG2E = 1.0 / math.log(2.0)


def _dense(q, keys, vals, **kw):
    """Per request: pagoda.flash_attn_func on contiguous k/v (1 query, no mask): the independent oracle. Its
    natural-log LSE is returned in base 2, the convention of the FlashInfer API under test."""
    outs, lses = [], []
    for b, (k, v) in enumerate(zip(keys, vals)):
        if k.shape[0] == 0:
            outs.append(torch.zeros_like(q[b]))
            lses.append(torch.full((q.shape[1],), -math.inf, device=q.device))
            continue
        o, l, _ = pagoda.flash_attn_func(q[b][None, None], k[None], v[None], return_attn_probs=True, **kw)
        outs.append(o[0, 0])
        lses.append(l[0, :, 0])
    return torch.stack(outs), torch.stack(lses) * LOG2E


def _wrapper(layout, device="cpu", **kw):
    return dec.BatchDecodeWithPagedKVCacheWrapper(torch.empty(32 << 20, dtype=torch.uint8, device=device), layout,
                                                  **kw)


LENS = [0, 1, 300, 17, 0, 64, 129]


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("page_size", [1, 7, 16, 64])
@pytest.mark.parametrize("hq,hk", [(4, 4), (8, 2), (16, 2)])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_cpu_batch_decode_matches_contiguous_attention(layout, page_size, hq, hk, d):
    q, cache, keys, vals, (indptr, indices, last) = _batch(LENS, page_size, hq, hk, d, layout, torch.float32)
    w = _wrapper(layout)
    w.plan(indptr, indices, last, hq, hk, d, page_size, q_data_type=torch.float32)
    out, lse = w.run(q, cache, return_lse=True)
    want, want_lse = _dense(q, keys, vals)
    assert out.shape == q.shape and lse.shape == (len(LENS), hq) and lse.dtype == torch.float32
    assert rel_err(out, want) < 1e-5
    assert_finite_lse_close(lse, want_lse, atol=1e-4)
    assert (out[0] == 0).all() and torch.isneginf(lse[4]).all()


def test_cpu_tuple_cache_and_plan_reuse_across_layers():
    q, cache, keys, vals, meta = _batch([5, 40], 4, 8, 2, 64, "NHD", torch.bfloat16, tuple_form=True)
    w = _wrapper("NHD")
    w.plan(*meta, 8, 2, 64, 4, data_type=torch.bfloat16)
    for _ in range(2):  # plan once, run per layer
        out = w.run(q, cache)
        assert out.dtype == torch.bfloat16
        assert rel_err(out, _dense(q, keys, vals)[0]) < 1e-2


def test_cpu_options_window_softcap_scale():
    q, cache, keys, vals, meta = _batch([1, 50, 33], 16, 4, 2, 64, "HND", torch.float32)
    w = _wrapper("HND")
    w.plan(*meta, 4, 2, 64, 16, window_left=9, logits_soft_cap=5.0, sm_scale=0.3, q_data_type="float32")
    out, lse = w.run(q, cache, return_lse=True)
    want, want_lse = _dense(q, keys, vals, window_size=(9, -1), softcap=5.0, softmax_scale=0.3)
    assert rel_err(out, want) < 1e-5
    assert_finite_lse_close(lse, want_lse, atol=1e-4)


def test_cpu_alibi_matches_flash_attn_alibi():
    q, cache, keys, vals, meta = _batch([12, 40], 8, 8, 4, 64, "NHD", torch.float32)
    w = _wrapper("NHD")
    w.plan(*meta, 8, 4, 64, 8, pos_encoding_mode="ALIBI", q_data_type=torch.float32)
    want, _ = _dense(q, keys, vals, alibi_slopes=ref.alibi_slopes(8))
    assert rel_err(w.run(q, cache), want) < 1e-5


def test_alibi_slopes_values():
    assert ref.alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    s = ref.alibi_slopes(12)
    assert s[:8].tolist() == [2.0 ** -i for i in range(1, 9)]
    torch.testing.assert_close(s[8:], torch.tensor([2.0 ** -x for x in (0.5, 1.5, 2.5, 3.5)]))


def test_cpu_rope_llama_equals_pre_rotated_attention():
    lens = [20, 1, 45]
    q, cache, keys, vals, meta = _batch(lens, 16, 4, 2, 64, "NHD", torch.float32)
    w = _wrapper("NHD")
    w.plan(*meta, 4, 2, 64, 16, pos_encoding_mode="ROPE_LLAMA", rope_theta=5e5, rope_scale=2.0,
           q_data_type=torch.float32)
    out = w.run(q, cache)
    rot_k, rot_q = [], []
    for b, k in enumerate(keys):
        qr, kr = rope.apply_rope_pos_ids(q[b][None].expand(k.shape[0], -1, -1).contiguous(), k,
                                         torch.arange(k.shape[0]), rope_scale=2.0, rope_theta=5e5)
        rot_q.append(qr[-1])  # the query sits at position kv_len - 1
        rot_k.append(kr)
    want, _ = _dense(torch.stack(rot_q), rot_k, vals)
    assert rel_err(out, want) < 1e-5


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_cpu_single_decode(layout):
    q = torch.randn(8, 128)
    k, v = torch.randn(77, 2, 128), torch.randn(77, 2, 128)
    want, want_lse = _dense(q[None], [k], [v])
    kk, vv = (k, v) if layout == "NHD" else (k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous())
    out, lse = dec.single_decode_with_kv_cache(q, kk, vv, kv_layout=layout, return_lse=True)
    assert out.shape == (8, 128) and lse.shape == (8,)
    assert rel_err(out, want[0]) < 1e-5
    assert_finite_lse_close(lse, want_lse[0], atol=1e-4)


def test_cpu_cuda_graph_mode_pads_smaller_batches_as_empty():
    hq, hk, d, ps = 4, 2, 64, 8
    bufs = dict(paged_kv_indptr_buffer=torch.zeros(5, dtype=torch.int32),
                paged_kv_indices_buffer=torch.zeros(64, dtype=torch.int32),
                paged_kv_last_page_len_buffer=torch.zeros(4, dtype=torch.int32))
    w = _wrapper("NHD", use_cuda_graph=True, **bufs)
    q, cache, keys, vals, meta = _batch([9, 30], ps, hq, hk, d, "NHD", torch.float32)
    w.plan(*meta, hq, hk, d, ps, q_data_type=torch.float32)
    assert bufs["paged_kv_indptr_buffer"].tolist()[3:] == [meta[0][-1].item()] * 2
    assert bufs["paged_kv_last_page_len_buffer"].tolist()[2:] == [0, 0]
    q4 = torch.cat([q, torch.randn(2, hq, d)])
    out, lse = w.run(q4, cache, return_lse=True)
    assert rel_err(out[:2], _dense(q, keys, vals)[0]) < 1e-5
    assert (out[2:] == 0).all() and torch.isneginf(lse[2:]).all()
    with pytest.raises(ValueError, match="batch size"):
        w.plan(*_batch([1] * 5, ps, hq, hk, d, "NHD", torch.float32)[4], hq, hk, d, ps, q_data_type=torch.float32)


# ------------------------------------------------------------------------------------------- validation

def _planned(**plan_kw):
    q, cache, _, _, meta = _batch([5, 9], 4, 4, 2, 64, "NHD", torch.float16)
    w = _wrapper("NHD")
    w.plan(*meta, 4, 2, 64, 4, **plan_kw)
    return w, q, cache, meta


@pytest.mark.parametrize("kw,err,match", [
    (dict(num_qo_heads=3), ValueError, "num_qo_heads"),
    (dict(head_dim=60), ValueError, "head_dim"),
    (dict(page_size=0), ValueError, "page_size"),
    (dict(pos_encoding_mode="ROPE"), ValueError, "pos_encoding_mode"),
    (dict(window_left=-2), ValueError, "window_left"),
    (dict(logits_soft_cap=-1.0), ValueError, "logits_soft_cap"),
    (dict(sm_scale=0.0), ValueError, "sm_scale"),
    (dict(rope_theta=float("inf")), ValueError, "rope_theta"),
    (dict(q_data_type="int8"), TypeError, "q_data_type"),
    (dict(last_page_len=torch.tensor([2, 0], dtype=torch.int32)), ValueError, "last_page_len"),
    (dict(last_page_len=torch.tensor([2, 5], dtype=torch.int32)), ValueError, "last_page_len"),
    (dict(indptr=torch.tensor([0, 3, 1], dtype=torch.int32)), ValueError, "indptr"),
    (dict(indptr=torch.tensor([0, 2, 4], dtype=torch.int64)), TypeError, "indptr"),
    (dict(indices=torch.tensor([0, 1], dtype=torch.int32)), ValueError, "indptr"),
])
def test_plan_validation(kw, err, match):
    _, _, _, (indptr, indices, last) = _planned()
    args = dict(indptr=indptr, indices=indices, last_page_len=last, num_qo_heads=4, num_kv_heads=2, head_dim=64,
                page_size=4)
    args.update(kw)
    with pytest.raises(err, match=match):
        _wrapper("NHD").plan(**args)


def test_run_validation():
    w, q, cache, _ = _planned()
    with pytest.raises(RuntimeError, match="plan"):
        _wrapper("NHD").run(q, cache)
    with pytest.raises(ValueError, match="q must have shape"):
        w.run(q[:, :2], cache)
    with pytest.raises(TypeError, match="q_data_type"):
        w.run(q.float(), cache.float())
    with pytest.raises(ValueError, match="page_size"):
        w.run(q, cache[:, :, :2])
    with pytest.raises(ValueError, match="pages"):
        w.run(q, cache[:1])
    with pytest.raises(ValueError, match="window_left"):
        w.run(q, cache, window_left=3)
    with pytest.raises(ValueError, match="out"):
        w.run(q, cache, out=torch.empty(2, 4, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match="kv_layout"):
        _wrapper("NDH")
    with pytest.raises(ValueError, match="paged_kv_indptr_buffer"):
        _wrapper("NHD", use_cuda_graph=True)
    with pytest.raises(ValueError, match="k and v"):
        dec.single_decode_with_kv_cache(q[0], torch.randn(5, 2, 64).half(), torch.randn(6, 2, 64).half())


# ------------------------------------------------------------------------------------------- GPU

GPU_LENS = [0, 1, 4096, 37, 0, 1000, 2, 513]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("page_size", [1, 7, 16, 64])
@pytest.mark.parametrize("hq,hk", [(8, 8), (32, 8), (32, 4)])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("split", ["auto", "off", "fixed"])
def test_cuda_batch_decode_bf16(layout, page_size, hq, hk, d, split):
    q, cache, keys, vals, meta = _batch(GPU_LENS, page_size, hq, hk, d, layout, torch.bfloat16, device="cuda")
    w = _wrapper(layout, device="cuda")
    w.plan(*meta, hq, hk, d, page_size, q_data_type=torch.bfloat16, disable_split_kv=split == "off",
           fixed_split_size=-(-300 // page_size) if split == "fixed" else None)
    if split == "fixed":
        assert w._splits > 1
    out, lse = w.run(q, cache, return_lse=True)
    if w._splits:
        assert not w._counters.any(), "split merge tickets must be back at zero after a run"
    want, want_lse = _dense(q, keys, vals)
    assert rel_err(out, want) < 1e-2
    assert_finite_lse_close(lse, want_lse, atol=2e-2)
    assert (out[0] == 0).all() and torch.isneginf(lse[4]).all()
    # A repeat with new q, cache memory and outputs replays the recorded launches with those swapped in.
    q2, cache2 = torch.randn_like(q), cache.clone()
    out2, lse2 = w.run(q2, cache2, return_lse=True)
    want2, want_lse2 = _dense(q2, keys, vals)
    assert rel_err(out2, want2) < 1e-2
    assert_finite_lse_close(lse2, want_lse2, atol=2e-2)
    if w._splits:
        assert not w._counters.any()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["ALIBI", "ROPE_LLAMA"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_options_match_reference(mode, dtype):
    q, cache, _, _, meta = _batch([1, 700, 33, 0], 16, 8, 2, 128, "NHD", dtype, device="cuda")
    w = _wrapper("NHD", device="cuda")
    w.plan(*meta, 8, 2, 128, 16, pos_encoding_mode=mode, window_left=300, logits_soft_cap=20.0,
           q_data_type=dtype, fixed_split_size=8)
    out, lse = w.run(q, cache, return_lse=True)
    want, want_lse = ref.batch_decode_with_paged_kv_cache(
        q.cpu(), cache.cpu(), *(t.cpu() for t in meta), "NHD", window_left=300, logits_soft_cap=20.0,
        pos_encoding_mode=mode, compute_dtype=torch.float64)
    assert rel_err(out.cpu(), want) < (2e-3 if dtype == torch.float16 else 1e-4)
    assert_finite_lse_close(lse.cpu(), want_lse.float() * LOG2E, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_len", [1, 100, 32768])
def test_cuda_single_decode(kv_len):
    q = torch.randn(32, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(kv_len, 8, 128, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(kv_len, 8, 128, dtype=torch.bfloat16, device="cuda")
    out, lse = dec.single_decode_with_kv_cache(q, k, v, return_lse=True)
    want, want_lse = _dense(q[None], [k], [v])
    assert rel_err(out, want[0]) < 1e-2
    assert_finite_lse_close(lse, want_lse[0], atol=2e-2)


@pytest.mark.gpu
def test_cuda_graph_capture_replay_equals_eager():
    hq, hk, d, ps, max_batch = 32, 8, 128, 16, 8
    bufs = dict(paged_kv_indptr_buffer=torch.zeros(max_batch + 1, dtype=torch.int32, device="cuda"),
                paged_kv_indices_buffer=torch.zeros(4096, dtype=torch.int32, device="cuda"),
                paged_kv_last_page_len_buffer=torch.zeros(max_batch, dtype=torch.int32, device="cuda"))
    w = _wrapper("HND", device="cuda", use_cuda_graph=True, **bufs)
    eager = _wrapper("HND", device="cuda")
    q_static = torch.zeros(max_batch, hq, d, dtype=torch.bfloat16, device="cuda")
    q, cache, _, _, meta = _batch([5, 2000, 1, 0, 300, 77, 16, 4000], ps, hq, hk, d, "HND", torch.bfloat16, "cuda")
    w.plan(*meta, hq, hk, d, ps, q_data_type=torch.bfloat16)
    q_static.copy_(q)
    w.run(q_static, cache)  # warm-up: compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static, lse_static = w.run(q_static, cache, return_lse=True)
    for lens in ([5, 2000, 1, 0, 300, 77, 16, 4000], [3000, 1, 1], [0, 0, 6000, 9, 1, 1, 1, 1]):
        q, cache2, _, _, meta = _batch(lens, ps, hq, hk, d, "HND", torch.bfloat16, "cuda")
        cache.zero_()
        cache[:cache2.shape[0]].copy_(cache2)
        w.plan(*meta, hq, hk, d, ps, q_data_type=torch.bfloat16)
        q_static.zero_()
        q_static[:len(lens)].copy_(q)
        graph.replay()
        eager.plan(*meta, hq, hk, d, ps, q_data_type=torch.bfloat16)
        want, want_lse = eager.run(q, cache, return_lse=True)
        torch.cuda.synchronize()
        assert rel_err(out_static[:len(lens)], want) < 2e-3
        assert_finite_lse_close(lse_static[:len(lens)], want_lse, atol=2e-3)
        assert (out_static[len(lens):] == 0).all()


@pytest.mark.gpu
def test_cuda_run_does_not_sync():
    q, cache, _, _, meta = _batch([100, 3000], 16, 32, 8, 128, "NHD", torch.float16, device="cuda")
    w = _wrapper("NHD", device="cuda")
    w.plan(*meta, 32, 8, 128, 16)
    w.run(q, cache)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        w.run(q, cache, return_lse=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_graph_mode_replan_must_keep_options():
    bufs = dict(paged_kv_indptr_buffer=torch.zeros(3, dtype=torch.int32),
                paged_kv_indices_buffer=torch.zeros(64, dtype=torch.int32),
                paged_kv_last_page_len_buffer=torch.zeros(2, dtype=torch.int32))
    w = _wrapper("NHD", use_cuda_graph=True, **bufs)
    _, _, _, _, meta = _batch([9, 30], 8, 4, 2, 64, "NHD", torch.float32)
    w.plan(*meta, 4, 2, 64, 8, q_data_type=torch.float32)
    w.plan(*meta, 4, 2, 64, 8, q_data_type=torch.float32)  # same options: fine
    with pytest.raises(ValueError, match="first plan"):
        w.plan(*meta, 4, 2, 64, 8, q_data_type=torch.float32, window_left=5)


def test_split_merge_is_fused_only_for_few_splits():
    from pagoda.kernels.attention import decode as kd

    assert kd.merge_is_fused(3, True) and kd.merge_is_fused(kd.FUSED_MAX_SPLITS, True)
    assert not kd.merge_is_fused(kd.FUSED_MAX_SPLITS + 1, True)      # a serial merge of many splits is slower
    assert not kd.merge_is_fused(3, False) and not kd.merge_is_fused(0, True)


def test_repeat_runs_replay_the_recorded_launch_with_the_new_tensors(monkeypatch):
    """A second `run` with the same layouts, alignments and scale re-launches the recorded kernel with only q,
    the caches and out/lse swapped; a re-plan or another layout launches through `decode_fwd` again. The
    recording keeps none of the caller's tensors."""
    from pagoda.kernels.attention import decode as kdecode
    from pagoda.kernels.launch import fast as _launch
    from pagoda.ops import _decode_plan

    log = []
    kernel = fake_fast_launch(monkeypatch, log, ["Q", "K", "V", "O", "L", "chunk", "scale"])

    fwd_calls = []

    def fake_decode_fwd(q, k, v, ks, vs, indptr, indices, last, page_size, hk, out, lse, **kw):
        fwd_calls.append(out.stride())
        _launch.launch(kernel, (q.shape[0], hk), q, k, v, out, lse, kw["chunk"], kw["sm_scale"])

    monkeypatch.setattr(_decode_plan, "num_sms", lambda device: 1)
    monkeypatch.setattr(kdecode, "decode_fwd", fake_decode_fwd)
    indptr, indices, last, max_pages = random_page_table([5, 9], 4)
    w = pagoda.BatchDecodeWithPagedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8), "NHD")
    w.plan(indptr, indices, last, 4, 2, 16, 4, q_data_type=torch.float32, kv_data_type=torch.float32,
           disable_split_kv=True)
    c1, c2 = empty_cache(max_pages, 4, 2, 16, "NHD", torch.float32), empty_cache(max_pages, 4, 2, 16, "NHD",
                                                                               torch.float32)
    q1, q2 = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    w.run(q1, c1)
    out2, lse2 = w.run(q2, c2, return_lse=True)
    assert [e[0] for e in log] == ["planned", "replay"] and len(fwd_calls) == 1, "the 2nd run must be a replay"
    replayed = log[1][1]
    assert replayed[0] is q2 and replayed[3] is out2 and replayed[4] is lse2
    assert replayed[1].data_ptr() == c2[:, 0].data_ptr() and replayed[2].data_ptr() == c2[:, 1].data_ptr()
    assert replayed[5] is log[0][1][5] and replayed[6] == log[0][1][6]     # planned chunk buffer and scale kept
    kept = next(iter(w._bound.values())).calls[0][1][9:]
    assert kept[:5] == [None] * 5, "the first run's q/caches/out/lse must not be held between runs"
    w.run(q2, c2, out=torch.empty(2, 8, 16)[:, ::2])                        # another out layout: launched again
    w.plan(indptr, indices, last, 4, 2, 16, 4, q_data_type=torch.float32, kv_data_type=torch.float32,
           disable_split_kv=True)
    w.run(q1, c1)                                                          # a re-plan forgets the recordings
    assert len(fwd_calls) == 3 and fwd_calls[1] == (128, 32, 1)
    w.run(q2, c2)
    assert len(fwd_calls) == 3 and len(log) == 5
