"""Compile the Gluon Hopper attention kernel for sm_90 ahead of time, on the CPU (no GPU needed).

Checks every shipped configuration (head_dim 64/128 where the config supports it, causal or not, fp16/bf16)
lowers through Triton's Gluon pipeline and the bundled ptxas, that its shared memory fits an H100/H200 SM,
and for the warp-specialised configs (2 or 3 consumer warpgroups) the register plan: kernel-wide maxnreg and
the per-partition setmaxnreg budgets in the PTX (and USETMAXREG in the SASS). The persistent warp-specialised
configs (``pws*``: own O staging boxes) compile for every head dim / dtype / mask, without local-memory spills.
"""
import pytest

from tests.helpers import run_aot_script

pytest.importorskip("triton")

_AOT = r'''
import itertools, re, sys
from pagoda.kernels.hopper import configs as H
from pagoda.kernels.hopper.aot import compile_sm90
from pagoda.kernels.hopper.gluon import GLUON_OK
if not GLUON_OK:
    print("NO_GLUON"); sys.exit(0)
from triton.tools.disasm import get_sass
cases = [(d, dt, c, None) for d, dt, c in itertools.product((64, 128), ("bf16", "fp16"), (True, False))]
cases += [(d, "bf16", True, name) for name in H.WS_CONFIGS for d in H.config_head_dims(name)]
cases += [(d, "fp16", False, name) for d in (64, 128) for name in ("wspp-m128n128s2", "pwspp-m128n128s2")]
ws3 = [name for name, c in H.WS_CONFIGS.items() if c[5] == 3]
assert ws3 and {H.DEFAULT_CONFIG[64, c] for c in (False, True)} <= set(ws3), "ws3 is the long head_dim 64 default"
assert not set(ws3) & {H.DEFAULT_CONFIG[128, c] for c in (False, True)}
cases += [(64, dt, c, name) for name in ws3 for dt, c in itertools.product(("bf16", "fp16"), (True, False))
          if (dt, c) != ("bf16", True)]
pws = [name for name in H.WS_CONFIGS if H.ws_persistent(name)]
assert pws
cases += [(d, dt, c, name) for name in pws for d in H.config_head_dims(name)
          for dt, c in itertools.product(("bf16", "fp16"), (True, False)) if (dt, c) != ("bf16", True)]
sass_done = set()
for d, dt, causal, cfg in cases:
    name = cfg or H.DEFAULT_CONFIG[d, causal]
    k = compile_sm90(d, dt, causal, cfg)
    smem, ptx = k.metadata.shared, k.asm["ptx"]
    regs = sorted(set(re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+);", ptx)), key=lambda r: int(r[1]))
    print(f"d={d} {dt} causal={causal} cfg={name} smem={smem} warps={k.metadata.num_warps} "
          f"maxnreg={k.metadata.maxnreg} setmaxnreg={[' '.join(r) for r in regs]}")
    assert smem <= 227 * 1024, smem
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx
    if name in H.WS_CONFIGS:
        bm, bn, stages, cregs, pingpong, nc, maxnreg = H.ws_params(name, d)
        # 4 warps per consumer warpgroup + the loader warp padded to a warpgroup, all under the kernel-wide cap.
        assert k.metadata.num_warps == 4 * (nc + 1) and k.metadata.maxnreg == maxnreg, k.metadata
        assert f".maxnreg {maxnreg}" in ptx and 4 * (nc + 1) * 32 * maxnreg <= 65536
        # setmaxnreg budgets: worker consumers raise to CONSUMER_REGS, the loader drops to 24, consumer 0 (the
        # default partition) gets what is left (Triton's AllocateWarpGroups), and the sum fits 64K registers.
        default = (maxnreg + (nc - 1) * (maxnreg - cregs) + (maxnreg - 24)) // 8 * 8
        assert ("inc", str(cregs)) in regs and ("dec", "24") in regs, regs
        assert any(r[1] == str(default) for r in regs), (default, regs)
        assert 128 * (default + (nc - 1) * cregs + 24) <= 65536
        if (name, causal) not in sass_done:  # the SASS keeps them (USETMAXREG), once per config and mask
            sass = get_sass(k.asm["cubin"])
            assert "USETMAXREG" in sass and "HGMMA" in sass and "UTMALDG" in sass
            if name in pws:  # Q + O boxes + the K/V ring; no spills to local memory in any partition but pws3's
                # 3 x 160-register consumers (64K registers exactly): without a mask (its default use) 6 words
                # with Triton 3.6, none with 3.9; with the causal one (no default) 63 / 83.
                spills = len(re.findall(r"\bSTL\b", sass))
                assert "UTMASTG" in sass and spills <= (0 if nc < 3 else 128 if causal else 8), (name, causal, spills)
                assert smem >= 2 * nc * 64 * d * 2 + 2 * stages * bn * d * 2, smem
            sass_done.add((name, causal))
print("COMPILED")
'''


def test_hopper_attention_compiles_for_sm90():
    run_aot_script(_AOT)


def test_hopper_supported_is_false_on_cpu():
    import torch

    from pagoda.kernels.hopper import attention as H
    q = torch.randn(1, 8, 2, 64, dtype=torch.bfloat16)
    assert not H.hopper_supported(q, q, q)


def test_default_dispatch_policy():
    """Each (head_dim, causal) takes the CONFIG_BY_LENGTH entries in increasing length up to their bounds
    (inclusive), then DEFAULT_CONFIG; every default config compiles for its head dim, and every kept config is
    some call's default."""
    from pagoda.kernels.hopper import configs as H
    assert H.default_config(64, False, 1) == H.default_config(64, False, 1024) == "ws1x3-m64n64s2"
    assert H.default_config(64, False, 1025) == H.default_config(64, False, 8192) == "pws3-m192n128s2"
    assert H.default_config(64, False, 8193) == H.DEFAULT_CONFIG[64, False] == "ws3-m192n128s2"
    assert H.default_config(64, True, 512) == "pws1x3-m64n64s2" and H.default_config(64, True, 513) == "ws1x3-m64n64s2"
    assert H.default_config(64, True, 2049) == H.DEFAULT_CONFIG[64, True] == "ws3-m192n128s2"
    assert H.default_config(128, True, 512) == "pws1x2-m64n64s2"
    assert H.default_config(128, True, 2048) == "pws-m128n128s2"
    assert H.default_config(128, True, 2049) == H.DEFAULT_CONFIG[128, True] == "wspp-m128n128s2"
    assert H.default_config(128, False, 1) == H.default_config(128, False, 1 << 20) == "pwspp-m128n128s2"
    for (d, _causal), entries in H.CONFIG_BY_LENGTH.items():
        assert [n for n, _ in entries] == sorted(n for n, _ in entries), "entries in increasing length"
        assert all(d in H.config_head_dims(name) for _, name in entries)
    for (d, _causal), name in H.DEFAULT_CONFIG.items():
        assert d in H.config_head_dims(name)
    reached = set(H.DEFAULT_CONFIG.values()) | {n for entries in H.CONFIG_BY_LENGTH.values() for _, n in entries}
    assert reached == set(H.WS_CONFIGS)


def test_persistent_ws_configs_fit_shared_memory():
    """pws* configs: 1 to 3 consumer warpgroups; the Q and O boxes of every consumer plus the K/V ring fit the
    SM's 227 KB as many times as the config has programs per SM, at every head dim it accepts."""
    from pagoda.kernels.hopper import configs as H
    pws = [n for n in H.WS_CONFIGS if H.ws_persistent(n)]
    assert set(pws) >= {"pws-m128n128s2", "pwspp-m128n128s2", "pws1x3-m64n64s2", "pws3-m192n128s2"}
    for name in pws:
        bm, bn, stages, regs, pingpong, nc = H.WS_CONFIGS[name]
        assert nc in (1, 2, 3) and bm == 64 * nc
        for d in H.config_head_dims(name):
            smem = 2 * nc * 64 * d * 2 + 2 * stages * bn * d * 2 + 1024
            assert H.WS_CTAS_PER_SM.get(name, 1) * smem <= 227 * 1024, (name, d)


def test_ws1_configs_fit_their_ctas_per_sm():
    """One consumer warpgroup per CTA, several CTAs per SM: at every head dim a config accepts, the launch's
    register cap times the CTA's 8 warps, and its shared memory (Q box + STAGES K/V boxes + barriers), fit the
    SM that many times; the consumer's setmaxnreg budget is what the loader's 24 leave; no ping-pong; opt-in."""
    from pagoda.kernels.hopper import configs as H
    ws1 = [n for n, c in H.WS_CONFIGS.items() if c[5] == 1]
    assert ws1 and set(ws1) <= set(H.WS_CTAS_PER_SM)
    for name in ws1:
        ctas = H.WS_CTAS_PER_SM[name]
        for d in H.config_head_dims(name):
            bm, bn, stages, regs, pingpong, nc, maxnreg = H.ws_params(name, d)
            assert bm == 64 and nc == 1 and not pingpong
            assert ctas * 8 * 32 * maxnreg <= 65536 and regs == 2 * maxnreg - 24
            o_box = 64 * d * 2 if H.ws_persistent(name) else 0  # the persistent kernel stages O on its own
            smem = 64 * d * 2 + o_box + stages * 2 * bn * d * 2 + 1024
            assert ctas * (smem + 1024) <= 228 * 1024, (name, d, smem)
        for d in set(H.HEAD_DIMS) - set(H.config_head_dims(name)):
            with pytest.raises(ValueError, match="head_dim"):
                H.ws_params(name, d)


def test_ws3_configs_are_head_dim_64_only():
    """3 consumer warpgroups of 160 registers cannot hold a d=128 tile: a clear error, not a spilling kernel."""
    from pagoda.kernels.hopper import configs as H
    from pagoda.kernels.hopper.aot import compile_sm90
    from pagoda.kernels.hopper.gluon import GLUON_OK
    ws3 = [n for n, c in H.WS_CONFIGS.items() if c[5] == 3]
    assert ws3 and all(H.config_head_dims(n) == (64,) for n in ws3)
    assert all(H.config_head_dims(n) == (64, 128) for n in H.WS_CONFIGS if n not in ws3 and n not in H.WS_CTAS_PER_SM)
    for name in ws3:
        assert H.WS_CONFIGS[name][0] == 192
        with pytest.raises(ValueError, match="head_dim"):
            H.ws_params(name, 128)
        if GLUON_OK:
            with pytest.raises(ValueError, match="head_dim"):
                compile_sm90(128, "bf16", True, name)


def test_persistent_program_count():
    """Persistent ws launches: at most the items and the programs the SMs hold; under a causal mask coprime with
    the query tiles per head, so that each program's items w, w + P, ... cycle through every tile height (their
    key-tile counts differ) instead of repeating one or two."""
    import math

    from pagoda.kernels.hopper.attention import _pws_programs
    for items, num_m, most in ((8192, 8, 396), (4096, 16, 264), (5, 8, 396), (100, 1, 396), (2048, 12, 132)):
        full = _pws_programs(items, num_m, False, most)
        assert full == min(items, most)
        p = _pws_programs(items, num_m, True, most)
        assert 1 <= p <= min(items, most) and math.gcd(p, num_m) == 1
        assert p >= min(items, most) - num_m  # never far below what fits
        heights = {(w % num_m) for w in range(0, items, p)}
        assert len(heights) == min(num_m, len(range(0, items, p)))
