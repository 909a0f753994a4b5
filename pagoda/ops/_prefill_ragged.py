"""`BatchPrefillWithRaggedKVCacheWrapper` and `single_prefill_with_kv_cache` (exported by `pagoda.ops.prefill`).

The ragged wrapper runs pagoda's dense varlen kernel (`pagoda.kernels.attention.fwd`, bottom-right
causal alignment as FlashInfer's) on CUDA without host reads, the prefill reference elsewhere;
``ROPE_LLAMA`` rotates copies of q and k first, ``ALIBI`` passes the standard slopes with FlashInfer's signed
bias ``slope * (pos_k - pos_q)``. `single_prefill_with_kv_cache` runs the paged prefill kernel over a one-page table.
"""
from __future__ import annotations

import torch

from pagoda.ops import _checks, _lse, _mask, _paged, _workspace
from pagoda.ops import _decode_plan as _plan
from pagoda.ops import _prefill_common as _common
from pagoda.ops.rope import rotate_llama
from pagoda.reference import decode as _dref
from pagoda.reference import prefill as _ref


class BatchPrefillWithRaggedKVCacheWrapper(_workspace.RaggedWorkspace):
    """Prefill attention with ragged queries and ragged keys/values (FlashInfer's wrapper).

    k/v are ``[kv_indptr[-1], num_kv_heads, head_dim]`` (NHD) or ``[num_kv_heads, kv_indptr[-1], head_dim]``
    (HND). With ``use_cuda_graph=True`` the int32 ``qo_indptr_buf``/``kv_indptr_buf`` ``[max_batch+1]`` are
    required and plan only writes into them (smaller batches padded with empty requests).
    """

    def __init__(self, float_workspace_buffer, kv_layout="NHD", use_cuda_graph=False, qo_indptr_buf=None,
                 kv_indptr_buf=None, custom_mask_buf=None, mask_indptr_buf=None, backend="auto", jit_args=None):
        _common.check_constructor(float_workspace_buffer, kv_layout, use_cuda_graph, backend, jit_args,
                                  custom_mask_buf, mask_indptr_buf)
        self.device = float_workspace_buffer.device
        self._workspace = float_workspace_buffer
        self._kv_layout = kv_layout
        self._use_cuda_graph = use_cuda_graph
        if use_cuda_graph:
            for name, buf in (("qo_indptr_buf", qo_indptr_buf), ("kv_indptr_buf", kv_indptr_buf)):
                if buf is None:
                    raise ValueError(f"{name} is required when use_cuda_graph=True")
                _checks.check_tensor(name, buf, ndim=1, dtypes=(torch.int32,))
                if buf.device != self.device:
                    raise ValueError(f"{name} must be on {self.device}, got {buf.device}")
            if kv_indptr_buf.shape != qo_indptr_buf.shape:
                raise ValueError("qo_indptr_buf and kv_indptr_buf must have the same length (max_batch + 1)")
        self._bufs = (qo_indptr_buf, kv_indptr_buf)
        self._alibi = None
        self._planned = False

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return self._use_cuda_graph

    @property
    def _plan_info(self) -> tuple | None:
        """FlashInfer's name for a wrapper's plan state (callers test it against None after `plan`): None until
        `plan` runs, else pagoda's plan: ``(qo_indptr, kv_indptr)``, the device indptrs the kernels read."""
        return self._meta if self._planned else None

    def plan(self, qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, head_dim_qk, head_dim_vo=None, custom_mask=None,
             packed_custom_mask=None, causal=False, pos_encoding_mode="NONE", use_fp16_qk_reduction=False,
             window_left=-1, logits_soft_cap=None, sm_scale=None, rope_scale=None, rope_theta=None,
             q_data_type="float16", kv_data_type=None, o_data_type=None, non_blocking=True) -> None:
        """Plan: int32 ``qo_indptr``/``kv_indptr [batch+1]`` (each on the host or the device), head counts, head_dim
        and the options of `BatchPrefillWithPagedKVCacheWrapper.plan`. Reads the indptrs on the host."""
        hq, hk, d = _plan.check_heads(num_qo_heads, num_kv_heads, head_dim_qk)
        opts = _common.options(d, head_dim_vo, custom_mask, packed_custom_mask, causal, pos_encoding_mode,
                               use_fp16_qk_reduction, window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta)
        q_dtype, kv_dtype = _common.dtypes(q_data_type, kv_data_type, o_data_type)
        if q_dtype != kv_dtype:
            raise NotImplementedError("q_data_type and kv_data_type must be equal")
        qptr = _common.check_indptr("qo_indptr", qo_indptr, self.device, host_ok=True)
        kptr = _common.check_indptr("kv_indptr", kv_indptr, self.device, host_ok=True)
        if len(kptr) != len(qptr):
            raise ValueError(f"kv_indptr must have the same length as qo_indptr ({len(qptr)}), got {len(kptr)}")
        batch = len(qptr) - 1
        if self._use_cuda_graph:
            qb, kb = self._bufs
            if batch + 1 > qb.shape[0]:
                raise ValueError(f"batch {batch} exceeds the CUDA-graph buffers' {qb.shape[0] - 1}")
            qb[:batch + 1].copy_(qo_indptr, non_blocking=non_blocking)
            qb[batch + 1:].fill_(qptr[-1])
            kb[:batch + 1].copy_(kv_indptr, non_blocking=non_blocking)
            kb[batch + 1:].fill_(kptr[-1])
            self._meta = (qb, kb)
            self._grid_batch = qb.shape[0] - 1
        else:
            self._meta = (qo_indptr.to(self.device, non_blocking=non_blocking),
                          kv_indptr.to(self.device, non_blocking=non_blocking))
            self._grid_batch = batch
        self._host_ptrs = (qptr, kptr)
        self._rope_pos = self._rope_positions() if opts["pos_encoding_mode"] == "ROPE_LLAMA" else None
        if opts["pos_encoding_mode"] == "ALIBI" and (self._alibi is None or self._alibi.shape[0] != hq):
            self._alibi = _dref.alibi_slopes(hq, device=self.device)
        # A custom mask (FlashInfer's layouts): the masked paged kernel's bit words and tile lists.
        self._mask = _mask.plan_for_wrapper(custom_mask, packed_custom_mask, [b - a for a, b in zip(qptr, qptr[1:])],
                                            [b - a for a, b in zip(kptr, kptr[1:])], hq // hk, d, q_dtype,
                                            opts["window_left"], self.device, self._use_cuda_graph)
        self._nnz, self._nnz_kv = qptr[-1], kptr[-1]
        self._max_q = max((b - a for a, b in zip(qptr, qptr[1:])), default=0)
        self._max_k = max((b - a for a, b in zip(kptr, kptr[1:])), default=0)
        self._shape, self._q_dtype, self._opts = (hq, hk, d), q_dtype, opts
        self._planned = True

    begin_forward = plan

    def _rope_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE positions of the planned queries and keys: query t of request b sits at
        ``(t - qo_start) + kv_len - qo_len``, key t at ``t - kv_start``."""
        qptr, kptr = self._host_ptrs
        q_pos, k_pos = [], []
        for b in range(len(qptr) - 1):
            qo, kv = qptr[b + 1] - qptr[b], kptr[b + 1] - kptr[b]
            q_pos += range(kv - qo, kv)
            k_pos += range(kv)
        return (torch.tensor(q_pos, dtype=torch.int32).to(self.device),
                torch.tensor(k_pos, dtype=torch.int32).to(self.device))

    def run(self, q, k, v, *args, q_scale=None, k_scale=None, v_scale=None, out=None, lse=None, return_lse=False,
            enable_pdl=None, window_left=None):
        """``q [qo_indptr[-1], Hq, D]``, ``k``/``v`` ragged by kv_indptr -> ``out`` like q, or ``(out, lse)``
        with ``lse [nnz_qo, Hq]`` float32 base 2 (FlashInfer's convention)."""
        if not self._planned:
            raise RuntimeError("call plan() before run()")
        lse_given = lse is not None
        if args:
            raise TypeError(f"run() takes no extra positional arguments, got {len(args)}")
        opts = self._opts
        if window_left is not None and window_left != opts["window_left"]:
            raise ValueError(f"window_left={window_left} differs from the planned {opts['window_left']}; re-plan")
        hq, hk, d = self._shape
        _common.run_checks(q, hq, d, self._nnz, self._q_dtype, self.device, out, lse)
        for name, t in (("k", k), ("v", v)):
            _checks.check_tensor(name, t, ndim=3, dtypes=(self._q_dtype,))
        if self._kv_layout == "HND":
            k, v = k.transpose(0, 1), v.transpose(0, 1)
        if k.shape != v.shape or tuple(k.shape[1:]) != (hk, d) or k.shape[0] < self._nnz_kv:
            raise ValueError(f"k and v must be [>= {self._nnz_kv}, {hk}, {d}] in layout {self._kv_layout} "
                             f"(kv_indptr[-1], num_kv_heads, head_dim), got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.device != self.device or v.device != self.device:
            raise ValueError(f"k and v must be on {self.device}")
        if self._mask is not None:   # RoPE, ALiBi and the soft cap inside the masked kernel
            qk_factor, v_scale = _plan.run_scales(q_scale, k_scale, v_scale)
            out, lse = _mask.run_ragged(q, k, v, self._mask, self._meta[0], self._meta[1], hk,
                                        dict(opts, sm_scale=opts["sm_scale"] * qk_factor), self._alibi, out, lse)
            return _common.finish(out, lse, v_scale, return_lse, lse_given)
        if self._rope_pos is not None:
            n, m = self._nnz, self._nnz_kv
            q = torch.cat([rotate_llama(q[:n], self._rope_pos[0], opts["rope_scale"], opts["rope_theta"]), q[n:]])
            k = torch.cat([rotate_llama(k[:m], self._rope_pos[1], opts["rope_scale"], opts["rope_theta"]), k[m:]])
        qk_factor, v_scale = _plan.run_scales(q_scale, k_scale, v_scale)
        scale = opts["sm_scale"] * qk_factor
        alibi = self._alibi if opts["pos_encoding_mode"] == "ALIBI" else None
        if not _paged.use_triton(q):
            # The prefill reference (FlashInfer's signed ALiBi), on the copies RoPE already rotated.
            o, l = _ref.batch_prefill_with_ragged_kv_cache(
                q, k, v, self._meta[0], self._meta[1], causal=opts["causal"], sm_scale=scale,
                window_left=opts["window_left"], logits_soft_cap=opts["logits_soft_cap"],
                pos_encoding_mode="NONE" if alibi is None else "ALIBI")
            out = o if out is None else out.copy_(o)
            lse = l if lse is None else lse.copy_(l)
            return _common.finish(out, lse, v_scale, return_lse, lse_given)
        # The dense varlen kernel directly: plan validated the indptrs, so run reads nothing on the host
        # (and, with use_cuda_graph, the grid depends only on q's shape).
        if q.is_cuda and q.dtype == torch.float32:
            raise TypeError("q: the ragged prefill kernel takes float16/bfloat16 on CUDA (its dots run in tf32)")
        from pagoda.ops._dispatch import attention_fwd

        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out = torch.zeros_like(q, memory_format=torch.contiguous_format) if out is None else out.zero_()
        lse_t = torch.full((hq, q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
        if self._grid_batch:
            attention_fwd(q, k, v, out, lse_t, cu_seqlens_q=self._meta[0], cu_seqlens_k=self._meta[1],
                          max_seqlen_q=q.shape[0] if self._use_cuda_graph else max(self._max_q, 1),
                          batch_size=self._grid_batch, softmax_scale=scale, window_left=opts["window_left"],
                          window_right=0 if opts["causal"] else -1, softcap=opts["logits_soft_cap"],
                          alibi_slopes=alibi, alibi_signed=True)
        lse = lse_t.t().contiguous() if lse is None else lse.copy_(lse_t.t())
        return _common.finish(out, lse, v_scale, return_lse, lse_given)

    def run_return_lse(self, q, k, v, *args, **kwargs):
        """`run` with ``return_lse=True``: ``(out, lse)``, lse base 2."""
        return self.run(q, k, v, *args, **kwargs, return_lse=True)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False, window_left: int = -1,
                logits_soft_cap: float | None = None, sm_scale: float | None = None, rope_scale: float | None = None,
                rope_theta: float | None = None, *, _return_lse: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """FlashInfer's deprecated form of `run`: the options given here replace the planned ones for this call (a
        CUDA-graph wrapper must keep its planned options; a planned custom mask stays, and with it ``causal`` is
        ignored and ``window_left`` must be the planned one)."""
        if not self._planned:
            raise RuntimeError("call plan() before forward()")
        opts = _common.forward_options(self._shape[2], causal, pos_encoding_mode, use_fp16_qk_reduction, window_left,
                                       logits_soft_cap, sm_scale, rope_scale, rope_theta)
        planned = (self._opts, self._alibi, self._rope_pos)
        if self._mask is not None:
            if opts["window_left"] != self._opts["window_left"]:
                raise ValueError(f"window_left={window_left} differs from the planned {self._opts['window_left']}, "
                                 "which the custom mask's tiles were planned with; re-plan")
            opts["causal"] = False   # FlashInfer: the custom mask replaces causal
        if self._use_cuda_graph and opts != self._opts:
            raise ValueError("forward() options differ from the plan's; a CUDA-graph wrapper keeps its planned "
                             "options (re-plan, or call run())")
        if opts["pos_encoding_mode"] == "ALIBI" and (self._alibi is None or self._alibi.shape[0] != self._shape[0]):
            self._alibi = _dref.alibi_slopes(self._shape[0], device=self.device)
        if opts["pos_encoding_mode"] == "ROPE_LLAMA":
            self._rope_pos = self._rope_pos if self._rope_pos is not None else self._rope_positions()
        else:
            self._rope_pos = None
        self._opts = opts
        try:
            return self.run(q, k, v, return_lse=_return_lse)
        finally:
            self._opts, self._alibi, self._rope_pos = planned

    def forward_return_lse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                           pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False,
                           window_left: int = -1, logits_soft_cap: float | None = None,
                           sm_scale: float | None = None, rope_scale: float | None = None,
                           rope_theta: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` returning ``(out, lse)`` (lse base 2), FlashInfer's deprecated ``forward_return_lse``."""
        return self.forward(q, k, v, causal, pos_encoding_mode, use_fp16_qk_reduction, window_left, logits_soft_cap,
                            sm_scale, rope_scale, rope_theta, _return_lse=True)

    def end_forward(self) -> None:
        """Kept for compatibility; nothing to release."""


def single_prefill_with_kv_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 scale_q: torch.Tensor | None = None, scale_k: torch.Tensor | None = None,
                                 scale_v: torch.Tensor | None = None, o_dtype: torch.dtype | None = None,
                                 custom_mask: torch.Tensor | None = None,
                                 packed_custom_mask: torch.Tensor | None = None, causal: bool = False,
                                 kv_layout: str = "NHD", pos_encoding_mode: str = "NONE",
                                 use_fp16_qk_reduction: bool = False, sm_scale: float | None = None,
                                 window_left: int = -1, logits_soft_cap: float | None = None,
                                 rope_scale: float | None = None, rope_theta: float | None = None,
                                 backend: str = "auto", return_lse: bool = False
                                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Prefill for one request, FlashInfer 0.6's signature: q ``[qo_len, Hq, D]``; k, v ``[kv_len, Hk, D]`` (NHD)
    or ``[Hk, kv_len, D]`` (HND); fp16/bf16/fp32, all one dtype. Query i sits at key position ``i + kv_len - qo_len``.
    ``backend``: any of FlashInfer's names (pagoda's kernel runs for each); ``scale_q/k/v`` (FP8 per-head scales)
    raise NotImplementedError, ``o_dtype`` must be None or q's dtype.
    Returns ``out [qo_len, Hq, D]``, or ``(out, lse [qo_len, Hq] float32 base 2)`` with return_lse."""
    _common.check_backend(backend)
    given = [n for n, t in (("scale_q", scale_q), ("scale_k", scale_k), ("scale_v", scale_v)) if t is not None]
    if given:
        raise NotImplementedError(f"{', '.join(given)}: FP8 per-head scales are not supported (pagoda's attention "
                                  "takes fp16/bf16/fp32 q, k, v)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.check_tensor(name, t, ndim=3, dtypes=_paged.CACHE_DTYPES)
    _checks.check_same("q, k, v", (q, k, v), "dtype")
    _checks.check_same("q, k, v", (q, k, v), "device")
    if o_dtype is not None and o_dtype != q.dtype:
        raise NotImplementedError(f"o_dtype={o_dtype} different from q's dtype {q.dtype} is not supported")
    _paged.check_kv_layout(kv_layout)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    kv_len, hk = (k.shape[0], k.shape[1]) if kv_layout == "NHD" else (k.shape[1], k.shape[0])
    hq, _, d = _plan.check_heads(q.shape[1], hk, q.shape[2])
    if k.shape[2] != d:
        raise ValueError(f"k/v head_dim ({k.shape[2]}) must equal q's ({d})")
    opts = _common.options(d, None, custom_mask, packed_custom_mask, causal, pos_encoding_mode, use_fp16_qk_reduction,
                           window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta)
    if _mask.check_mask_args(custom_mask, packed_custom_mask):   # causal is ignored with a mask (FlashInfer's rule)
        out, lse = _mask.run_single(q, k, v, kv_layout, custom_mask, packed_custom_mask, opts)
        return (out, _lse.to_base2_(lse)) if return_lse else out
    qo_len = q.shape[0]
    if not _paged.use_triton(q) or kv_len == 0 or qo_len == 0:
        kk, vv = (k, v) if kv_layout == "NHD" else (k.transpose(0, 1), v.transpose(0, 1))
        out, lse = _ref.prefill_one(q, kk, vv, **opts)
        return (out, _lse.to_base2_(lse)) if return_lse else out
    from pagoda.ops._dispatch import prefill_paged

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    dev = q.device
    qo_indptr = torch.arange(2, dtype=torch.int32, device=dev) * qo_len
    kv_indptr = torch.arange(2, dtype=torch.int32, device=dev)
    indices = torch.zeros(1, dtype=torch.int32, device=dev)
    last = torch.full((1,), kv_len, dtype=torch.int32, device=dev)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(qo_len, hq, dtype=torch.float32, device=dev)
    kc, vc = k[None], v[None]
    mode = opts["pos_encoding_mode"]
    prefill_paged(q, kc, vc, _paged.cache_strides(kc, kv_layout), _paged.cache_strides(vc, kv_layout), qo_indptr,
                  kv_indptr, indices, last, kv_len, hk, qo_len, out, lse, sm_scale=opts["sm_scale"],
                  causal=opts["causal"], window_left=opts["window_left"], logits_soft_cap=opts["logits_soft_cap"],
                  alibi_slopes=_dref.alibi_slopes(hq, device=dev) if mode == "ALIBI" else None, alibi_signed=True,
                  rope=(opts["rope_scale"], opts["rope_theta"]) if mode == "ROPE_LLAMA" else None)
    return (out, _lse.to_base2_(lse)) if return_lse else out
