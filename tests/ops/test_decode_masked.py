"""Decode with the visible keys given on the device (`decode_dense_masked`, the `pagoda::decode_hf` op): what HF's
compiled static-cache decode step runs. Kernel path in the interpreter, CPU reference path, the custom op's
fake, against a float64 attention over exactly the visible keys."""
import os

import pytest
import torch

from pagoda import _switches
from pagoda.ops import _decode_op, _decode_plan
from pagoda.ops import decode_dense as dd
from pagoda.reference import attention as ref
from pagoda.reference.decode import decode_masked
from tests.helpers import rel_err

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture(autouse=True)
def _fresh_caches(monkeypatch):
    for name in ("_static_cache", "_len_cache", "_chunk_cache", "_ws_cache", "_bound", "_hf", "_graph_meta"):
        monkeypatch.setattr(dd, name, {})


def _case(b, hq, hk, s, d, dtype, seed, holes=True):
    """q [b, hq, d]; k, v [b, s, hk, d] views of HF's [b, hk, s, d] cache; a mask with left padding, the
    static cache's empty tail and (holes) a few hidden keys inside; kv_len = one past the last seen key;
    one row sees nothing at all."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    k = torch.randn(b, hk, s, d, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(b, hk, s, d, generator=g).to(dtype).transpose(1, 2)
    mask = torch.zeros(b, s, dtype=torch.bool)
    for i in range(b - 1):
        start = int(torch.randint(0, s // 3, (1,), generator=g))
        end = int(torch.randint(start + 1, s + 1, (1,), generator=g))
        mask[i, start:end] = True
        if holes:
            mask[i, torch.randint(0, s, (3,), generator=g)] = False
    kv_len = (mask * torch.arange(1, s + 1)).amax(dim=1).to(torch.int32)
    return q, k, v, mask, kv_len


def _want(q, k, v, mask, scale, softcap=0.0):
    """float64 attention of each row over its seen keys (zeros when none)."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i in range(q.shape[0]):
        idx = mask[i].nonzero()[:, 0]
        if len(idx):
            out[i] = ref.flash_attn_func(q[i:i + 1, None].double(), k[i:i + 1, idx].double(), v[i:i + 1, idx].double(),
                                         softmax_scale=scale, softcap=softcap, compute_dtype=torch.float64)[0, 0]
    return out


@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_reference_path_matches_attention_over_the_seen_keys(softcap):
    q, k, v, mask, kv_len = _case(4, 8, 2, 40, 32, torch.float32, seed=1)
    out = dd.decode_dense_masked(q, k, v, 0.3, mask, kv_len, softcap)
    assert out.shape == q.shape and rel_err(out, _want(q, k, v, mask, 0.3, softcap)) < 1e-5
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))       # the row that sees nothing


def test_kv_len_alone_bounds_the_keys():
    """Without a key mask the first kv_len keys are seen (a static cache with no padding)."""
    q, k, v, _, _ = _case(3, 4, 4, 30, 16, torch.float32, seed=2)
    kv_len = torch.tensor([30, 7, 0], dtype=torch.int32)
    mask = torch.arange(30)[None, :] < kv_len[:, None]
    out = decode_masked(q, k, v, None, kv_len, sm_scale=0.25)
    assert rel_err(out, _want(q, k, v, mask, 0.25)) < 1e-5


@pytest.mark.skipif(not INTERPRET, reason="interpreter test (no CUDA)")
@pytest.mark.parametrize("hq,hk", [(4, 4), (8, 2)])
@pytest.mark.parametrize("sms", [1, 64])          # 64 SMs: each row split across programs (fused merge)
@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("pow2", [False, True])   # cache length a power of two (one page exactly) or not
def test_kernel_path_matches_reference(monkeypatch, hq, hk, sms, holes, pow2):
    monkeypatch.setattr(_switches, "TRITON_ON_CPU", True)
    monkeypatch.setattr(_decode_plan, "num_sms", lambda device: sms)
    b, s, d = 3, (512 if pow2 else 300) if sms > 1 else (128 if pow2 else 45), 32
    q, k, v, mask, kv_len = _case(b, hq, hk, s, d, torch.float16, seed=hq + sms + holes + 7 * pow2, holes=holes)
    from pagoda.kernels.attention import decode as kdecode
    # Any length takes the whole-tile key loop: the row's page is its length rounded up to a power of two.
    page = dd.page_for(s)
    assert page >= s and page & (page - 1) == 0 and (page == s) == pow2
    assert kdecode.whole_tiles(page, kdecode.addr_flags(page, k.stride()[:3], v.stride()[:3]))
    out = dd.decode_dense_masked(q, k, v, d ** -0.5, mask, kv_len)
    splits = dd._graph_safe_metadata(q.device, b, s, hk, hq, d)[-1]
    assert (splits > 1) == (sms > 1), "the split path was (not) taken"
    assert out.dtype == torch.float16 and out.shape == q.shape
    assert rel_err(out.float(), _want(q, k, v, mask, d ** -0.5)) < 2e-3
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))


@pytest.mark.skipif(not INTERPRET, reason="interpreter test (no CUDA)")
def test_kernel_reads_no_key_past_kv_len(monkeypatch):
    """Keys past kv_len are never read: NaN there (a static cache's garbage) leaves the output finite."""
    monkeypatch.setattr(_switches, "TRITON_ON_CPU", True)
    q, k, v, mask, kv_len = _case(2, 4, 2, 64, 16, torch.float16, seed=5, holes=False)
    kv_len = torch.tensor([20, 33], dtype=torch.int32)
    mask = torch.arange(64)[None, :] < kv_len[:, None]
    k, v = k.clone(), v.clone()
    for i, n in enumerate(kv_len.tolist()):
        k[i, n:] = float("nan")
        v[i, n:] = float("nan")
    out = dd.decode_dense_masked(q, k, v, 0.25, None, kv_len)
    assert torch.isfinite(out).all() and rel_err(out.float(), _want(q, k, v, mask, 0.25)) < 2e-3


@pytest.mark.skipif(not INTERPRET, reason="interpreter test (no CUDA)")
def test_kernel_reads_kv_len_of_any_stride(monkeypatch):
    """kv_len given as a strided view (a column of a bigger tensor): each row still reads its own length."""
    monkeypatch.setattr(_switches, "TRITON_ON_CPU", True)
    q, k, v, mask, kv_len = _case(3, 4, 2, 64, 16, torch.float16, seed=11)
    table = torch.stack([kv_len, torch.full_like(kv_len, 1000)], dim=1)      # [b, 2]: column 1 is garbage
    out = dd.decode_dense_masked(q, k, v, 0.25, mask, table[:, 0])
    assert rel_err(out.float(), _want(q, k, v, mask, 0.25)) < 2e-3


def test_custom_op_and_its_fake():
    """The op in HF's layout: same result as the function, and torch.library's checks of its registration
    (fake tensor shapes, schema, dispatch) pass."""
    q, k, v, mask, kv_len = _case(3, 8, 2, 24, 16, torch.float32, seed=7)
    query, key, value = q[:, :, None], k.transpose(1, 2), v.transpose(1, 2)   # [b, hq, 1, d], [b, hk, s, d]
    out = torch.ops.pagoda.decode_hf(query, key, value, mask, kv_len, 0.25, 0.0)
    assert out.shape == (3, 1, 8, 16) and torch.equal(out[:, 0], dd.decode_dense_masked(q, k, v, 0.25, mask, kv_len))
    torch.library.opcheck(_decode_op.decode_hf_op, (query, key, value, mask, kv_len, 0.25, 0.0))
    torch.library.opcheck(_decode_op.decode_hf_op, (query, key, value, None, kv_len, 0.25, 2.0))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,s", [(1, 1), (7, 17), (64, 1000), (2, 4100)])
@pytest.mark.parametrize("hq,hk,d", [(8, 8, 64), (32, 8, 128), (16, 2, 256), (8, 1, 80)])
def test_gpu_matches_reference(dtype, b, s, hq, hk, d):
    q, k, v, mask, kv_len = _case(b, hq, hk, s, d, dtype, seed=b * s + d)
    if b == 1:
        mask[:] = True
        kv_len[:] = s
    q, k, v, mask_d, kv_len_d = (t.cuda() for t in (q, k, v, mask, kv_len))
    out = dd.decode_dense_masked(q, k, v, d ** -0.5, mask_d, kv_len_d)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out.float().cpu(), _want(q.cpu(), k.cpu(), v.cpu(), mask, d ** -0.5)) < 2e-2
    if b > 1:
        assert torch.equal(out[-1].cpu(), torch.zeros_like(out[-1].cpu()))


@pytest.mark.gpu
@pytest.mark.parametrize("warm", [True, False])
def test_gpu_capturable_in_a_cuda_graph(warm):
    """Captured once, replayed after the mask and lengths changed in place: the new keys are seen. warm: the
    metadata was made (and kept, outside the graph's pool) by an earlier call; cold: made inside the capture."""
    b, hq, hk, s, d = 4, 16, 4, 512, 128
    q, k, v, mask, kv_len = (t.cuda() for t in _case(b, hq, hk, s, d, torch.bfloat16, seed=3))
    if warm:
        dd.decode_dense_masked(q, k, v, d ** -0.5, mask, kv_len)
        dd.decode_dense_masked(q, k[:, :s - 1], v[:, :s - 1], d ** -0.5, mask, kv_len.clamp(max=s - 1))
        assert len(dd._graph_meta) == 1         # keyed by the split plan: one length less shares it
    else:
        # The kernel compiled before the capture (a compile inside it would fail), through another shape.
        dd.decode_dense_masked(q[:, :8], k[:, :, :2], v[:, :, :2], d ** -0.5, mask, kv_len)
        dd._graph_meta.clear()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dd.decode_dense_masked(q, k, v, d ** -0.5, mask, kv_len)
    new_mask = torch.rand(b, s, device="cuda") > 0.5
    mask.copy_(new_mask)
    kv_len.copy_((new_mask * torch.arange(1, s + 1, device="cuda")).amax(dim=1).to(torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    want = _want(q.cpu(), k.cpu(), v.cpu(), new_mask.cpu(), d ** -0.5)
    assert rel_err(out.float().cpu(), want) < 2e-2
    assert len(dd._graph_meta) == (1 if warm else 0)          # nothing made inside a capture is kept


@pytest.mark.parametrize("bad,match", [
    ("query_rank", "query must be"), ("kv_shape", "key/value must be"), ("heads", "multiple of key/value heads"),
    ("dtype", "share a dtype"), ("kv_len_dtype", "kv_len must be int32"), ("mask_short", "key_mask must be"),
])
def test_custom_op_rejects_bad_arguments(bad, match):
    q, k, v, mask, kv_len = _case(2, 4, 2, 16, 16, torch.float32, seed=9)
    query, key, value = q[:, :, None], k.transpose(1, 2), v.transpose(1, 2)
    if bad == "query_rank":
        query = q
    elif bad == "kv_shape":
        value = value[:, :, :8]
    elif bad == "heads":
        query = torch.randn(2, 3, 1, 16)
    elif bad == "dtype":
        key = key.half()
    elif bad == "kv_len_dtype":
        kv_len = kv_len.long()
    else:
        mask = mask[:, :8]
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.pagoda.decode_hf(query, key, value, mask, kv_len, 0.25, 0.0)
    # The fake checks too: under torch.compile bad arguments fail while tracing, not at the first run.
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fakes = [None if t is None else mode.from_tensor(t) for t in (query, key, value, mask, kv_len)]
        with pytest.raises((ValueError, TypeError), match=match):
            torch.ops.pagoda.decode_hf(*fakes, 0.25, 0.0)


def test_custom_op_rejects_an_unsupported_dtype():
    q, k, v, mask, kv_len = _case(2, 4, 2, 16, 16, torch.float32, seed=9)
    query, key, value = (t.double() for t in (q[:, :, None], k.transpose(1, 2), v.transpose(1, 2)))
    with pytest.raises(TypeError, match="query must be float16, bfloat16 or float32"):
        torch.ops.pagoda.decode_hf(query, key, value, mask, kv_len, 0.25, 0.0)
