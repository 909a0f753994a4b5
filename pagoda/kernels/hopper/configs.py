"""Launch configurations of the warp-specialised Gluon sm_90 attention kernels, and which one a call takes.

A name selects the kernel (``ws*``: `ws`, one CTA per query tile; ``pws*``: `pws`, a persistent grid striding over
the work items) and its tile shape. `default_config` picks one per (head_dim, causal, seqlen_k); `ws_params`
turns a name into launch parameters (register caps included). Plain data and arithmetic: importable without
Gluon (the CPU tests read it). The measurements behind each choice (H200, TF/s) are in docs/hopper-attention.md.
"""
from __future__ import annotations

HEAD_DIMS = (64, 128)

# name -> (BLOCK_M, BLOCK_N, STAGES, consumer registers, ping-pong, consumer warpgroups); BLOCK_M = 64 x consumer
# warpgroups. Only the configurations that `default_config` selects are kept.
WS_CONFIGS = {
    # Two consumer warpgroups taking turns for the tensor cores (ping-pong): d=128 causal past 2k keys.
    "wspp-m128n128s2": (128, 128, 2, 240, True, 2),
    # Three consumer warpgroups (FA3's head_dim-64 layout; BLOCK_N 128, Gluon shapes being powers of two): ~160
    # registers each + the loader fit 64K registers at d=64 only (WS3_HEAD_DIMS): at d=128 a thread holds S (64
    # registers), O (64) and P (32) before any softmax temporaries and ptxas spills; at d=64 S 64 + O 32 + P 32
    # fit. d=64 past 8k keys (full) / 2k (causal).
    "ws3-m192n128s2": (192, 128, 2, 160, False, 3),
    # Persistent (`pws`): grid min(#items, #SMs), items (batch, head) major so a head's K/V stays in L2; the loader
    # prefetches the next item's Q / K / V during the current item's tail and O stores drain in the background
    # (own smem boxes: 192 KB at d=128, so STAGES 2 only). pwspp: d=128 full attention at every length; pws: d=128
    # causal 1k-2k; pws3: d=64 full 2k-8k (each consumer keeps 160 registers; ptxas spills a few words without a
    # mask and 63-83 with the causal one, where ws3 and the one-consumer configs are ahead).
    "pws-m128n128s2": (128, 128, 2, 240, False, 2),
    "pwspp-m128n128s2": (128, 128, 2, 240, True, 2),
    "pws3-m192n128s2": (192, 128, 2, 160, False, 3),
    # Short sequences: one consumer warpgroup per CTA (BLOCK_M 64) and several CTAs per SM ("x2" / "x3",
    # WS_CTAS_PER_SM). A CTA there runs only 4-8 key tiles, so its launch, Q / K_0 latency and O store are a
    # large share; the SM overlaps one CTA's prologue and epilogue with the others' loops. The launch caps
    # registers so that that many CTAs fit (x2: 128, x3: 80 per thread), and setmaxnreg gives the consumer what
    # the loader leaves (x2: 232, x3: 136); CONSUMER_REGS records that budget. ws1x3: d=64 up to 1k (full) and
    # 1k-2k (causal); the persistent pws1x3 d=64 causal up to 512, pws1x2 d=128 causal up to 512.
    "ws1x3-m64n64s2": (64, 64, 2, 136, False, 1),
    "pws1x2-m64n64s2": (64, 64, 2, 232, False, 1),
    "pws1x3-m64n64s2": (64, 64, 2, 136, False, 1),
}
WS3_HEAD_DIMS = (64,)
WS_CTAS_PER_SM = {"ws1x3-m64n64s2": 3, "pws1x2-m64n64s2": 2, "pws1x3-m64n64s2": 3}
# Head dims at which a config fits its CTAs per SM (shared memory: Q + STAGES x (K + V) boxes per CTA,
# 228 KB per SM; registers: at d=128 O alone is 64 per thread) when not every head dim does.
_WS_HEAD_DIMS = {"ws1x3-m64n64s2": (64,), "pws1x3-m64n64s2": (64,)}


def ws_persistent(config: str) -> bool:
    """Whether a WS_CONFIGS entry is the persistent kernel of `pws`."""
    return config.startswith("pws")


# Per (head_dim, causal), the config of calls longer than every CONFIG_BY_LENGTH entry.
DEFAULT_CONFIG = {(64, False): "ws3-m192n128s2", (64, True): "ws3-m192n128s2",
                  (128, False): "pwspp-m128n128s2", (128, True): "wspp-m128n128s2"}
# Per (head_dim, causal): ((longest seqlen_k, config), ...) in increasing length; longer calls take
# DEFAULT_CONFIG. A CTA of a short call runs few key tiles, so its launch, Q / K_0 latency and O store weigh:
# the persistent configs (pws*) overlap them with the previous item's work, the one-consumer ones (x2 / x3)
# run several programs per SM.
CONFIG_BY_LENGTH = {
    (64, False): ((1024, "ws1x3-m64n64s2"), (8192, "pws3-m192n128s2")),
    (64, True): ((512, "pws1x3-m64n64s2"), (2048, "ws1x3-m64n64s2")),
    (128, True): ((512, "pws1x2-m64n64s2"), (2048, "pws-m128n128s2")),
}


def default_config(head_dim: int, causal: bool, seqlen_k: int) -> str:
    """The config a call takes by default: the first CONFIG_BY_LENGTH entry whose length it does not exceed, else
    DEFAULT_CONFIG."""
    for longest, name in CONFIG_BY_LENGTH.get((head_dim, bool(causal)), ()):
        if seqlen_k <= longest:
            return name
    return DEFAULT_CONFIG[head_dim, bool(causal)]


# Kernel-wide register cap of the warp-specialised launch, per consumer-warpgroup count: all warps (the
# consumers' plus one warpgroup for the loader warp and its padding) must fit 64K registers before
# setmaxnreg moves the loader's share to the consumers: 12 warps x 32 x 168, 16 warps x 32 x 128 <= 65536.
WS_MAXNREG = {2: 168, 3: 128}


def config_head_dims(config: str) -> tuple:
    """Head dims a named config compiles for: the 3-consumer ``ws3`` ones and the 3-CTA ones only 64."""
    if WS_CONFIGS[config][5] == 3:
        return WS3_HEAD_DIMS
    return _WS_HEAD_DIMS.get(config, HEAD_DIMS)


def ws_params(config: str, head_dim: int):
    """(BLOCK_M, BLOCK_N, STAGES, consumer regs, ping-pong, consumers, maxnreg) of a WS_CONFIGS entry;
    ValueError for an unknown name or a head dim it does not fit (ws3 and ws1x3 at d=128: register or
    shared-memory budget)."""
    if config not in WS_CONFIGS:
        raise ValueError(f"attention config {config!r} is not one of {sorted(WS_CONFIGS)}")
    bm, bn, stages, regs, pingpong, nc = WS_CONFIGS[config]
    if head_dim not in config_head_dims(config):
        why = ("S, O and P alone take 160 registers per thread at d=128" if nc == 3 else
               f"its {WS_CTAS_PER_SM.get(config, 1)} CTAs per SM do not fit the SM's registers or shared memory")
        raise ValueError(f"attention config {config!r} ({nc} consumer warpgroups of {regs} registers) supports "
                         f"head_dim {config_head_dims(config)}, not {head_dim}: {why}")
    assert bm == 64 * nc, config
    if config in WS_CTAS_PER_SM:  # several CTAs per SM: every warp (consumers + loader warpgroup) under the cap
        maxnreg = 65536 // (WS_CTAS_PER_SM[config] * 4 * (nc + 1) * 32) // 8 * 8
        assert nc > 1 or (regs == 2 * maxnreg - 24 and not pingpong), config
        return bm, bn, stages, regs, pingpong, nc, maxnreg
    return bm, bn, stages, regs, pingpong, nc, WS_MAXNREG[nc]
