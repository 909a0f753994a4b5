"""Offsets past 2^31 elements: head-major views (HF's ``[b, h, s, d]`` transposed, or a cache stored heads
outermost) have a head stride of ``s * d`` elements, so ``head * stride`` wraps in int32 once
``(heads - 1) * s * d >= 2^31`` (32 heads, d 128: s >= 524k). Each kernel runs in the Triton interpreter on
such a view of a large buffer (allocated, mostly never touched) and must read/write the right head's row: a
wrapped offset is an out-of-bounds access (the child process dies) or the wrong row.

Each case runs in a child process, so a crash fails the test instead of the test run."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_PRELUDE = r'''
import torch
def i32(*a):
    return torch.tensor(a, dtype=torch.int32)
def head_major(heads, s, d, n, dtype=torch.float16):
    """[n, heads, d] view of the last n rows of a [heads, s, d] buffer: head stride s * d."""
    try:
        big = torch.empty(heads, s, d, dtype=dtype)
    except RuntimeError:
        print("NO_MEMORY")
        raise SystemExit(0)
    big[:, s - n:] = 0
    return big.transpose(0, 1)[s - n:]
S, H, HK, D, N = 600_000, 32, 8, 128, 8        # (H - 1) * S * D = 2.38e9 > 2^31
torch.manual_seed(0)
'''

_CASES = {
    "prefill_paged_q_and_out": r'''
from pagoda.kernels.attention.prefill_paged import prefill_paged_fwd
q = head_major(H, S, D, N); q.copy_(torch.randn(N, H, D).half())
out = head_major(H, S, D, N)
k = torch.randn(1, 16, HK, D).half(); v = torch.randn_like(k); lse = torch.empty(N, H)
prefill_paged_fwd(q, k, v, k.stride()[:3], v.stride()[:3], i32(0, N), i32(0, 1), i32(0), i32(16), 16, HK, N, out,
                  lse, sm_scale=D ** -0.5, causal=False,
                  config=dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1))
for h in (0, 27, 31):
    g = h // (H // HK)
    want = torch.softmax(q[:, h].float() @ k[0, :, g].float().T * D ** -0.5, -1) @ v[0, :, g].float()
    assert torch.allclose(out[:, h].float(), want, atol=2e-2), h
print("OK")
''',
    "rope": r'''
from pagoda.kernels.rope import rope_fwd
x = head_major(H, S, D, N); x.copy_(torch.randn(N, H, D).half())
o = torch.zeros(N, H, D, dtype=torch.float16)
pos = torch.arange(S - N, S, dtype=torch.int32); freqs = torch.rand(D // 2) * 1e-5
rope_fwd(x, o, pos, freqs, False)
ang = pos.float()[:, None] * freqs
for h in (0, 27, 31):
    x1, x2 = x[:, h, :D // 2].float(), x[:, h, D // 2:].float()
    want = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)
    assert torch.allclose(o[:, h].float(), want, atol=2e-2), h
print("OK")
''',
    "append_heads_outermost_cache": r'''
from pagoda.kernels.page import append_paged_kv
P, PS, HC = 200_000, 16, 8                      # (HC - 1) * P * PS * D = 2.87e9 elements of int8
try:
    k_cache = torch.empty(HC, P, PS, D, dtype=torch.int8).permute(1, 2, 0, 3)   # [pages, slot, head, d]
except RuntimeError:
    print("NO_MEMORY"); raise SystemExit(0)
k_cache[P - 1] = 0
v_cache = torch.zeros(1, PS, HC, D, dtype=torch.int8).expand(P, PS, HC, D)
k_new = torch.randint(1, 100, (1, HC, D), dtype=torch.int8)
append_paged_kv(k_new, k_new.clone(), i32(0), i32(5), k_cache, v_cache, i32(P - 1), i32(0, 1), k_cache.stride()[:3],
                v_cache.stride()[:3], PS)
for h in (0, 6, 7):
    assert torch.equal(k_cache[P - 1, 5, h], k_new[0, h]), h
print("OK")
''',
    "merge_out": r'''
from pagoda.kernels.attention.merge import merge_state_fwd
out = head_major(H, S, D, N)
v = torch.randn(N, H, D).half(); s = torch.randn(N, H); lse = torch.empty(N, H)
merge_state_fwd(v, s, v, s, out, lse)
for h in (0, 27, 31):
    assert torch.allclose(out[:, h], v[:, h]), h
print("OK")
''',
    "decode_hf_layout": r'''
from pagoda import _switches
_switches.TRITON_ON_CPU = True
from pagoda.ops.decode_dense import decode_dense_masked
SK, HKV, n = 1_200_000, 16, 8                  # 15 * 1.2e6 * 128 = 2.30e9 > 2^31
try:
    cache = torch.empty(1, HKV, SK, D, dtype=torch.float16)                     # HF's [b, h, s, d]
except RuntimeError:
    print("NO_MEMORY"); raise SystemExit(0)
cache[:, :, :n] = torch.randn(1, HKV, n, D).half()
k = v = cache.transpose(1, 2)                    # [1, SK, HKV, D]; only the first n keys are read
q = torch.randn(1, HKV, D).half()
kv_len = i32(n)
out = decode_dense_masked(q, k, v, D ** -0.5, None, kv_len)
for h in (0, 14, 15):
    kk = k[0, :n, h].float()
    want = torch.softmax(q[0, h].float() @ kk.T * D ** -0.5, -1) @ kk
    assert torch.allclose(out[0, h].float(), want, atol=2e-2), h
print("OK")
''',
}


@pytest.mark.parametrize("case", sorted(_CASES))
def test_head_major_offsets_past_2_31_elements(case):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _PRELUDE + _CASES[case]], capture_output=True, text=True, env=env,
                       timeout=600, cwd=ROOT)
    if "NO_MEMORY" in r.stdout:
        pytest.skip("this machine cannot reserve the large (untouched) buffer")
    assert r.returncode == 0 and "OK" in r.stdout, f"rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
