"""Private Triton and Gluon kernels with their launch configurations, grouped by family. Only `pagoda.ops` imports
from here; which kernel serves a call is decided there (`pagoda.ops._dispatch`).

    attention/   Triton attention for every GPU: dense/varlen prefill, paged prefill, paged decode, state merge
    hopper/      Gluon attention for sm_90 (warp-specialised, TMA): dense and paged prefill, configs, AOT compile
    sampling/    sorting-free samplers: one program per row, split rows, filters, speculative
    layers/      fused layer ops: RMSNorm, activations
    launch/      cheap repeat launches (Triton kernels; Gluon kernels with host TMA descriptors)
    rope.py      RoPE;  page.py  appends into a paged KV cache
    _common.py   what the families share: base-2 constants, soft cap, online-softmax step, SM count
"""
