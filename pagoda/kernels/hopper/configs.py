"""Launch configurations of the Gluon sm_90 attention kernels and the default-dispatch policy.

Names select a kernel and its tile shape: ``CONFIGS`` the single-partition kernel (`attention_hopper`),
``WS_CONFIGS`` the warp-specialised ones (`attention_hopper_ws`; ``pws*`` persistent, `attention_hopper_pws`).
`default_config` picks one per (head_dim, causal, seqlen_k) and `prefer_hopper` decides whether a call takes
the Gluon kernels at all; `_ws_params` turns a name into launch parameters (register caps included). Plain
data and arithmetic: importable without Gluon (the CPU tests read it).
"""
from __future__ import annotations

HEAD_DIMS = (64, 128)

# Launch configurations (BLOCK_M, BLOCK_N, STAGES, num_warps), selectable by name (the probe sweeps them).
# "p-" configs launch a persistent grid (one program per SM striding over the work items).
CONFIGS = {
    "m128n128s2w8": (128, 128, 2, 8),
    "m128n128s3w8": (128, 128, 3, 8),
    "m128n64s3w8": (128, 64, 3, 8),
    "m64n128s2w4": (64, 128, 2, 4),
    "p-m128n128s2w8": (128, 128, 2, 8),
    "p-m128n128s3w8": (128, 128, 3, 8),
}
# Warp-specialised variant (attention_hopper_ws): (BLOCK_M, BLOCK_N, STAGES, consumer registers, ping-pong,
# consumer warpgroups); BLOCK_M = 64 x consumer warpgroups.
# "ws3" (FA3's head_dim-64 layout, BLOCK_N 128 as Gluon shapes are powers of two): 3 consumer warpgroups of
# ~160 registers + the loader fit 64K registers, so head_dim 64 only (WS3_HEAD_DIMS): at d=128 a thread
# holds S (64 regs), O (64) and P (32) before any softmax temporaries (ptxas 12.8: 832 bytes of spills per
# thread); at d=64 S 64 + O 32 + P 32 fit without spills. The d=64 default since the H200 probe of
# 2026-12-01 (benchmarks/results/2026-12-01-h200-hopper): 1.02x / 1.10x cuDNN non-causal at s = 4k / 16k
# (2-consumer ws: 0.94x / 0.97x), causal 0.94x / 1.09x (ws: 0.94x / 1.01x).
WS_CONFIGS = {
    "ws-m128n128s2": (128, 128, 2, 240, False, 2),
    "ws-m128n128s3": (128, 128, 3, 240, False, 2),
    "ws-m128n64s3": (128, 64, 3, 240, False, 2),
    "wspp-m128n128s2": (128, 128, 2, 240, True, 2),
    "wspp-m128n128s3": (128, 128, 3, 240, True, 2),
    "ws3-m192n128s2": (192, 128, 2, 160, False, 3),
    "ws3pp-m192n128s2": (192, 128, 2, 160, True, 3),
    "ws3pp-m192n128s3": (192, 128, 3, 160, True, 3),
    # Persistent warp-specialised (attention_hopper_pws): grid min(#items, #SMs), the loader prefetches the
    # next item's Q / K / V during the current item's tail, O stores drain in the background (own smem
    # boxes: 192 KB at d=128, so STAGES 2 only). Items (batch, head) major since session 13 (K/V reuse in
    # L2): pwspp the default of d=128 full attention, the others of some lengths (CONFIG_BY_LENGTH).
    "pws-m128n128s2": (128, 128, 2, 240, False, 2),
    "pwspp-m128n128s2": (128, 128, 2, 240, True, 2),
    # ws3's tile (3 consumer warpgroups, head_dim 64), persistent: Q, O 3 x 8 KB + K/V ring 64 KB. Each
    # consumer keeps 160 registers; ptxas spills there: without a mask 6 words (Triton 3.6; none with 3.9),
    # with the causal one 63 / 83 (that variant is no default: ws3 and ws1x3 beat it at every causal length).
    "pws3-m192n128s2": (192, 128, 2, 160, False, 3),
    # Short sequences: one consumer warpgroup per CTA (BLOCK_M 64) and several CTAs per SM ("x2" / "x3",
    # WS_CTAS_PER_SM). A CTA there runs only 4-8 key tiles, so its launch, Q / K_0 latency and O store are a
    # large share; the SM overlaps one CTA's prologue and epilogue with the others' loops. The launch caps
    # registers so that that many CTAs fit (x2: 128, x3: 80 per thread), and setmaxnreg gives the consumer
    # what the loader leaves (x2: 232, x3: 136); CONSUMER_REGS records that budget (there is no worker
    # consumer to raise). Also probed on the H200 (2026-12-02) and dropped:
    # ws1x2-m64n128s2, ws1x3-m64n64s3, ws1x4-m64n64s2 (x4: cap 64, ptxas spills), and two consumers at two
    # CTAs per SM (ws2x2[pp]-m128n64s2, cap 80). Against ws1x3-m64n64s2: ws1x4 1% above at d=64 causal s512
    # and 4-17% below elsewhere, the others 0-17% below everywhere.
    "ws1x2-m64n64s2": (64, 64, 2, 232, False, 1),
    "ws1x3-m64n64s2": (64, 64, 2, 136, False, 1),
    # The same, persistent (`attention_hopper_pws` with one consumer): a grid of that many programs per SM,
    # each striding over the work items, so the loader brings the next item's Q and K_0 while the consumer
    # finishes the current one and the O store drains in the background (O in its own box: d=64 48 KB per
    # CTA; d=128 96 KB). H200, 2026-12-02: ahead of ws1x2 / ws1x3 at every short shape probed (session 13);
    # STAGES 3 (pws1x3-m64n64s3) read the same as 2 at d=64 s512 (361 against 360 TF/s) and was dropped.
    "pws1x2-m64n64s2": (64, 64, 2, 232, False, 1),
    "pws1x3-m64n64s2": (64, 64, 2, 136, False, 1),
}
WS3_HEAD_DIMS = (64,)
WS_CTAS_PER_SM = {"ws1x2-m64n64s2": 2, "ws1x3-m64n64s2": 3, "pws1x2-m64n64s2": 2, "pws1x3-m64n64s2": 3}
# Head dims at which a config fits its CTAs per SM (shared memory: Q + STAGES x (K + V) boxes per CTA,
# 228 KB per SM; registers: at d=128 O alone is 64 per thread) when not every head dim does.
_WS_HEAD_DIMS = {"ws1x3-m64n64s2": (64,), "pws1x3-m64n64s2": (64,)}


def _ws_persistent(config: str) -> bool:
    """Whether a WS_CONFIGS entry is the persistent kernel of `attention_hopper_pws`."""
    return config.startswith("pws")


# Per (head_dim, causal), the config of calls longer than every CONFIG_BY_LENGTH entry. The warp-specialised
# kernel has won every s >= 4096 case of the probes on an H200 since 2026-11-30; at d=64 three consumer
# warpgroups (BLOCK_M 192) beat two (2026-12-01); at d=128 full attention the persistent ping-pong kernel, at
# d=128 causal the ping-pong one. H200 probes of 2026-12-02 (session 13, `results/2026-12-02-h200-session13/`,
# TF/s, 4k / 8k / 16k; without the LSE, as `flash_attn_func` runs, `hopper-probe-nolse.txt`, and with it,
# `hopper-probe-long.txt`): d=128 full pwspp 612 / 621 / 599 (wspp 549 / 541 / 599, ws 582 / 592 / 599);
# with LSE 608 / 621 / 628 (wspp 594 / 613 / 563). d=128 causal wspp 516 / 552 / 556 against ws 506 / 544 /
# 590; with LSE 531 / 566 / 610 against 529 / 505 / 555 (the persistent kernels' static striding over the
# items balances long causal rows badly: pws 495 / 478 / 415).
DEFAULT_CONFIG = {(64, False): "ws3-m192n128s2", (64, True): "ws3-m192n128s2",
                  (128, False): "pwspp-m128n128s2", (128, True): "wspp-m128n128s2"}
# Shortest key length that the Gluon kernel takes per head_dim by default (`prefer_hopper`). Until 2026-12-02
# d=64 took it only from 2048 keys (the autotuned Triton kernel was ahead below: 320 against 290 TF/s at b32
# s512, H200 bench of 2026-11-30); the short-sequence configs below are ahead of it at every length at both
# head dims.
MIN_SEQLEN_K = {64: 0, 128: 0}
# Per (head_dim, causal): ((longest seqlen_k, config), ...) in increasing length; longer calls take
# DEFAULT_CONFIG. A CTA of a short call runs few key tiles, so its launch, Q / K_0 latency and O store weigh:
# the persistent configs (pws*) overlap them with the previous item's work, the one-consumer ones (x2 / x3)
# run several programs per SM. H200 probe without the LSE of 2026-12-02 (session 13, `hopper-probe-nolse.txt`;
# TF/s, the next best in brackets):
#   d=64 full     s512 ws1x3 364 (pws1x3 362), 1k 394 (pwspp 391); 2k / 4k / 8k pws3 459 / 485 / 518 (ws3 440 /
#                 479 / 510); 16k ws3 519 (pws3 496)
#   d=64 causal   s512 pws1x3 270 (ws1x3 254); 1k / 2k ws1x3 323 / 364 (pws1x3 316, pws 361); 4k+ ws3
#   d=128 causal  s512 pws1x2 324 (pws 278); 1k / 2k pws 416 / 506 (wspp 377 / 461); 4k+ wspp
CONFIG_BY_LENGTH = {
    (64, False): ((1024, "ws1x3-m64n64s2"), (8192, "pws3-m192n128s2")),
    (64, True): ((512, "pws1x3-m64n64s2"), (2048, "ws1x3-m64n64s2")),
    (128, True): ((512, "pws1x2-m64n64s2"), (2048, "pws-m128n128s2")),
}


def prefer_hopper(head_dim: int, seqlen_k: int) -> bool:
    """Default-dispatch policy: whether a supported call should take the Gluon kernel."""
    return seqlen_k >= MIN_SEQLEN_K.get(head_dim, 1 << 62)


def default_config(head_dim: int, causal: bool, seqlen_k: int) -> str:
    """The Gluon config a call takes by default: the first CONFIG_BY_LENGTH entry whose length it does not
    exceed, else DEFAULT_CONFIG."""
    for longest, name in CONFIG_BY_LENGTH.get((head_dim, bool(causal)), ()):
        if seqlen_k <= longest:
            return name
    return DEFAULT_CONFIG[head_dim, bool(causal)]


# Kernel-wide register cap of the warp-specialised launch, per consumer-warpgroup count: all warps (the
# consumers' plus one warpgroup for the loader warp and its padding) must fit 64K registers before
# setmaxnreg moves the loader's share to the consumers: 12 warps x 32 x 168, 16 warps x 32 x 128 <= 65536.
_WS_MAXNREG = {2: 168, 3: 128}


def config_head_dims(config: str) -> tuple:
    """Head dims a named config (CONFIGS / WS_CONFIGS) compiles for: the 3-consumer ``ws3`` ones only 64."""
    if config in WS_CONFIGS and WS_CONFIGS[config][5] == 3:
        return WS3_HEAD_DIMS
    return _WS_HEAD_DIMS.get(config, HEAD_DIMS)


def _ws_params(config: str, head_dim: int):
    """(BLOCK_M, BLOCK_N, STAGES, consumer regs, ping-pong, consumers, maxnreg) of a WS_CONFIGS entry;
    ValueError for a head dim it does not fit (ws3 and ws1x3 at d=128: register or shared-memory budget)."""
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
    return bm, bn, stages, regs, pingpong, nc, _WS_MAXNREG[nc]
