"""Plan/run checks shared by the prefill wrappers (`pagoda.ops.prefill`)."""
from __future__ import annotations

import torch

from pagoda.ops import _checks, _lse, _mask, _paged
from pagoda.ops import _decode_plan as _plan


def options(head_dim_qk, head_dim_vo, custom_mask, packed_custom_mask, causal, pos_encoding_mode,
             use_fp16_qk_reduction, window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta) -> dict:
    """Validate the shared plan options; return them resolved to defaults."""
    if head_dim_vo is not None and head_dim_vo != head_dim_qk:
        raise NotImplementedError(f"head_dim_vo ({head_dim_vo}) different from head_dim_qk ({head_dim_qk})")
    if _mask.check_mask_args(custom_mask, packed_custom_mask):
        causal = False   # FlashInfer: causal applies only without a custom mask (plan builds it: `_mask.plan_mask`)
    for name, flag in (("causal", causal), ("use_fp16_qk_reduction", use_fp16_qk_reduction)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    return dict(causal=causal, pos_encoding_mode=_plan.check_pos_encoding(pos_encoding_mode),
                window_left=_plan.check_window_left(window_left),
                logits_soft_cap=_plan.optional_positive("logits_soft_cap", logits_soft_cap, 0.0, allow_zero=True),
                sm_scale=_plan.optional_positive("sm_scale", sm_scale, head_dim_qk ** -0.5),
                rope_scale=_plan.optional_positive("rope_scale", rope_scale, 1.0),
                rope_theta=_plan.optional_positive("rope_theta", rope_theta, 1e4))


def dtypes(q_data_type, kv_data_type, o_data_type):
    q_dtype = _plan.canonical_dtype("q_data_type", q_data_type if q_data_type is not None else "float16")
    kv_dtype = _plan.canonical_dtype("kv_data_type", kv_data_type if kv_data_type is not None else q_dtype)
    if o_data_type is not None and _plan.canonical_dtype("o_data_type", o_data_type) != q_dtype:
        raise NotImplementedError("o_data_type different from q_data_type is not supported")
    return q_dtype, kv_dtype


def check_indptr(name: str, indptr, device, host_ok: bool = False) -> list:
    """An int32 ``[batch + 1]`` indptr on ``device`` (also on the host with ``host_ok``: a wrapper's `plan`,
    `pagoda.ops._paged.check_plan_device`), starting at 0 and non-decreasing: its values as a host list."""
    _checks.check_tensor(name, indptr, ndim=1, dtypes=(torch.int32,))
    if indptr.shape[0] < 1:
        raise ValueError(f"{name} must have length batch_size + 1 >= 1")
    if host_ok:
        _paged.check_plan_device(name, indptr, device)
    elif indptr.device != device:
        raise ValueError(f"{name} must be on {device}, got {indptr.device}")
    ptr = indptr.tolist()
    if ptr[0] != 0 or any(b < a for a, b in zip(ptr, ptr[1:])):
        raise ValueError(f"{name} must start at 0 and be non-decreasing, got {ptr[:16]}")
    return ptr


def run_checks(q, hq, d, nnz, q_dtype, device, out, lse):
    _checks.check_tensor("q", q, ndim=3)
    if tuple(q.shape[1:]) != (hq, d) or q.shape[0] < nnz:
        raise ValueError(f"q must have shape [>= {nnz}, {hq}, {d}] (qo_indptr[-1], num_qo_heads, head_dim), "
                         f"got {tuple(q.shape)}")
    if q.dtype != q_dtype:
        raise TypeError(f"q has dtype {q.dtype}, the plan's q_data_type is {q_dtype}")
    if q.device != device:
        raise ValueError(f"q must be on {device}, got {q.device}")
    if out is not None:
        _checks.check_tensor("out", out, ndim=3)
    if lse is not None:
        _checks.check_tensor("lse", lse, ndim=2)
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
                            or out.stride(-1) != 1):
        raise ValueError(f"out must be a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}")
    if lse is not None and (tuple(lse.shape) != (q.shape[0], hq) or lse.dtype != torch.float32
                            or lse.device != q.device):
        raise ValueError(f"lse must be a float32 [{q.shape[0]}, {hq}] tensor on {q.device}")


def finish(out, lse, v_scale, return_lse, lse_given=False):
    """v_scale: None or a value already checked by `pagoda.ops._decode_plan.run_scales`. The kernels write
    natural-log LSEs; what the caller sees (returned, or the ``lse`` buffer it passed) is FlashInfer's base 2."""
    if v_scale is not None:
        out.mul_(v_scale)
    if return_lse or lse_given:
        _lse.to_base2_(lse)
    return (out, lse) if return_lse else out


def check_constructor(float_workspace_buffer, kv_layout, use_cuda_graph, backend, jit_args, custom_mask_buf,
                      mask_indptr_buf) -> None:
    """Constructor arguments shared by the prefill wrappers (FlashInfer's), each checked by name."""
    _checks.check_tensor("float_workspace_buffer", float_workspace_buffer)
    _paged.check_kv_layout(kv_layout)
    if not isinstance(use_cuda_graph, bool):
        raise TypeError(f"use_cuda_graph must be a bool, got {type(use_cuda_graph).__name__}")
    check_backend(backend)
    if jit_args is not None:
        raise NotImplementedError("jit_args (custom attention variants) are not supported")
    # custom_mask_buf / mask_indptr_buf: FlashInfer reads them only under CUDA graphs, where pagoda's prefill
    # wrappers refuse a custom mask at plan (the mask's tile lists are sized per plan).


# FlashInfer's backend names (0.6): each selects one of its kernel families; pagoda runs its own kernel for all.
BACKENDS = ("auto", "fa2", "fa3", "trtllm-gen", "cudnn", "cutlass", "cute-dsl")


def check_backend(backend) -> str:
    """``backend`` one of FlashInfer's names (`BACKENDS`): accepted, pagoda's kernels serve every one."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (FlashInfer's names; pagoda runs its own kernel for "
                         f"each), got {backend!r}")
    return backend


def check_unsupported_plan_args(**kwargs) -> None:
    """FlashInfer plan arguments pagoda does not implement (trtllm-gen's block tables and sequence lengths):
    NotImplementedError naming those that were given (None means absent)."""
    given = [name for name, value in kwargs.items() if value is not None]
    if given:
        raise NotImplementedError(f"{', '.join(given)}: the trtllm-gen planning arguments are not supported by "
                                  "pagoda (pass the CSR page table)")


def forward_options(head_dim, causal, pos_encoding_mode, use_fp16_qk_reduction, window_left, logits_soft_cap,
                    sm_scale, rope_scale, rope_theta) -> dict:
    """The options of FlashInfer's deprecated ``forward`` / ``forward_return_lse``, which replace the planned ones."""
    return options(head_dim, None, None, None, causal, pos_encoding_mode, use_fp16_qk_reduction, window_left,
                   logits_soft_cap, sm_scale, rope_scale, rope_theta)
