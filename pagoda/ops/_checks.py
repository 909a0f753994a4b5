"""Argument validation shared by the public ops: every error names the argument and what was expected."""
from __future__ import annotations

import math
import operator
import weakref

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int (anything with ``__index__``, not a bool) within ``minimum..maximum``; TypeError /
    ValueError naming ``name`` otherwise."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_tensor(name: str, t, ndim: int | None = None, dtypes=None) -> torch.Tensor:
    """Raise TypeError/ValueError unless ``t`` is a tensor of rank ``ndim`` and one of ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    return t


def check_same(names: str, tensors, attr: str) -> None:
    """All tensors agree on ``attr`` ('dtype' or 'device')."""
    values = [getattr(t, attr) for t in tensors]
    if any(v != values[0] for v in values):
        err = TypeError if attr == "dtype" else ValueError
        raise err(f"{names} must all have the same {attr}, got {', '.join(str(v) for v in values)}")


def check_attention_dtypes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q, k, v: same dtype and device; fp16/bf16 on CUDA (fp32 also accepted on the CPU path)."""
    check_same("q, k, v", (q, k, v), "device")
    check_same("q, k, v", (q, k, v), "dtype")
    allowed = HALF_DTYPES if q.is_cuda else HALF_DTYPES + (torch.float32,)
    check_tensor("q", q, dtypes=allowed)


def check_head_dims(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shared head_dim (a multiple of 8, at most 256); nheads_q a multiple of nheads_kv."""
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(f"q, k, v must share head_dim, got {d}, {k.shape[-1]}, {v.shape[-1]}")
    if d == 0 or d % 8 != 0 or d > MAX_HEAD_DIM:
        raise ValueError(f"head_dim (last dimension of q) must be a multiple of 8 in 8..{MAX_HEAD_DIM}, got {d}")
    hq, hk = q.shape[-2], k.shape[-2]
    if v.shape[-2] != hk:
        raise ValueError(f"k and v must have the same number of heads, got {hk} and {v.shape[-2]}")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"nheads of q ({hq}) must be a positive multiple of nheads of k/v ({hk})")


def _window_entry(w) -> int | None:
    """An int, or a 0-d integer tensor (flash-attn's tests draw windows with ``torch.randint``); None otherwise."""
    if isinstance(w, torch.Tensor):
        if w.dim() != 0 or w.dtype.is_floating_point or w.dtype.is_complex or w.dtype == torch.bool:
            return None
        return int(w.item())
    if isinstance(w, bool):
        return None
    try:
        return operator.index(w)
    except TypeError:
        return None


def window_pair(window_size) -> tuple[int, int]:
    """``window_size`` as flash-attn takes it: a tuple, list or 1-D tensor of two ints (-1 = unbounded)."""
    if isinstance(window_size, torch.Tensor):
        entries = list(window_size) if window_size.dim() == 1 else [None]
    elif isinstance(window_size, (tuple, list)):
        entries = list(window_size)
    else:
        entries = [None]
    pair = [_window_entry(w) for w in entries]
    if len(pair) != 2 or None in pair:
        raise ValueError(f"window_size must be a pair of ints (left, right) as a tuple, list or tensor, "
                         f"got {window_size!r}")
    return pair[0], pair[1]


def check_options(dropout_p, softmax_scale, causal, window_size, softcap, seqlen_k: int | None = None
                  ) -> tuple[int, int]:
    """Validate the flash-attn option set; return the effective (window_left, window_right).

    As flash-attn does: ``causal=True`` sets the right window to 0 (whatever was given), and with ``seqlen_k``
    (the keys, or ``max_seqlen_k`` of a varlen call) a window bound ``>= seqlen_k`` becomes -1 (unbounded)."""
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1], got {dropout_p!r}")
    if dropout_p > 0.0:
        raise NotImplementedError("dropout_p > 0 is not supported: pagoda is an inference library "
                                  "(pass dropout_p=0.0)")
    if isinstance(softmax_scale, bool) or isinstance(softcap, bool):
        name = "softmax_scale" if isinstance(softmax_scale, bool) else "softcap"
        raise TypeError(f"{name} must be a float, got bool")
    if softmax_scale is not None and (not isinstance(softmax_scale, (int, float))
                                      or not math.isfinite(softmax_scale) or softmax_scale <= 0):
        raise ValueError(f"softmax_scale must be a finite float > 0 or None, got {softmax_scale!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    left, right = window_pair(window_size)
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 = unbounded), got {(left, right)}")
    if seqlen_k is not None:
        left = -1 if left >= seqlen_k else left
        right = -1 if right >= seqlen_k else right
    if causal:
        right = 0
    if not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be a finite float >= 0 (0 disables it), got {softcap!r}")
    return int(left), int(right)


def plain_dense_call(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes) -> bool:
    """True for the common `flash_attn_func` call that every check above accepts: plain fp16/bf16 tensors of
    rank 4 on one device, shared batch / head_dim (a multiple of 8 up to 256), k and v of one shape, nheads_q a
    multiple of nheads_k, no dropout, softcap, window or ALiBi, a bool ``causal`` and a finite positive (or
    no) softmax_scale. A few attribute reads and comparisons instead of the checks' calls; False means "run
    the checks" (which then raise or accept), never "invalid". The effective window is then ``(-1, 0 if causal else
    -1)``."""
    tensor = torch.Tensor
    if type(q) is not tensor or type(k) is not tensor or type(v) is not tensor or alibi_slopes is not None:
        return False
    qs, ks = q.shape, k.shape
    if len(qs) != 4 or len(ks) != 4 or ks != v.shape:
        return False
    b, _, hq, d = qs
    hk = ks[2]
    dt = q.dtype
    if (ks[0] != b or ks[3] != d or d % 8 or not 0 < d <= MAX_HEAD_DIM or hk == 0 or hq % hk
            or k.dtype is not dt or v.dtype is not dt or dt not in HALF_DTYPES):
        return False
    device = q.device
    if k.device != device or v.device != device:
        return False
    if type(causal) is not bool or type(window_size) is not tuple or window_size != (-1, -1):
        return False
    if type(dropout_p) not in (float, int) or dropout_p != 0 or type(softcap) not in (float, int) or softcap != 0:
        return False
    return softmax_scale is None or (type(softmax_scale) in (float, int) and 0 < softmax_scale < math.inf)


def check_alibi(alibi_slopes, batch_size: int, nheads: int, device) -> torch.Tensor | None:
    """alibi_slopes: None, or float32 ``[nheads]`` / ``[batch, nheads]`` on q's device."""
    if alibi_slopes is None:
        return None
    check_tensor("alibi_slopes", alibi_slopes, dtypes=(torch.float32,))
    if tuple(alibi_slopes.shape) not in ((nheads,), (batch_size, nheads)):
        raise ValueError(f"alibi_slopes must have shape ({nheads},) or ({batch_size}, {nheads}), "
                         f"got {tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes must be on {device}, got {alibi_slopes.device}")
    if alibi_slopes.stride(-1) != 1:
        alibi_slopes = alibi_slopes.contiguous()
    return alibi_slopes


# cu_seqlens tensors whose values passed the host checks: key -> (weakref to the tensor, version counter or
# None for inference tensors). A model calls the varlen op once per layer with the same cu_seqlens tensors:
# reading them once per forward, not once per layer, removes a host synchronisation per layer.
_CU_CHECKED: dict[tuple, tuple] = {}
_MAX_CU_CHECKED = 64


def _cu_version(cu: torch.Tensor):
    """The version counter (in-place edits bump it); None for inference tensors, which have none."""
    return None if cu.is_inference() else cu._version


def _host_values(cu: torch.Tensor) -> list:
    """The one host read (a device-to-host copy: it waits for the work queued before it)."""
    return cu.tolist()


def check_cu_seqlens(name: str, cu: torch.Tensor, batch_size: int | None, total: int, device,
                     max_seqlen=None, max_name: str = "") -> torch.Tensor:
    """cu_seqlens: int32 ``[batch+1]``, starts at 0, non-decreasing, ends at or below ``total``.

    Reads the values on the host (one small copy, which synchronises with the device) unless a CUDA graph
    is being captured; then the kernel's own bounds masks are what keeps memory access legal. A tensor
    whose values already passed these checks (same object, same version counter, same ``total`` /
    ``max_seqlen``) is not read again: the layers of one forward share their cu_seqlens. Inference
    tensors carry no version counter, so an in-place edit of one between calls is not re-read; the
    kernels' bounds masks still keep every access legal.
    """
    check_tensor(name, cu, ndim=1, dtypes=(torch.int32,))
    if cu.shape[0] < 1 or (batch_size is not None and cu.shape[0] != batch_size + 1):
        want = "at least 1" if batch_size is None else str(batch_size + 1)
        raise ValueError(f"{name} must have length batch_size + 1 ({want}), got {cu.shape[0]}")
    if cu.device != device:
        raise ValueError(f"{name} must be on {device}, got {cu.device}")
    if cu.is_cuda and torch.cuda.is_current_stream_capturing():
        return cu
    # Under torch.compile the memo is neither read nor written: Dynamo would trace the lookup and guard on
    # the remembered tensors, which under CUDA graphs (HF's compiled static-cache generate) are outputs of an
    # earlier replay that the next one overwrites (touching them raises).
    memo = not torch.compiler.is_compiling()
    key = (id(cu), cu.data_ptr(), cu.shape[0], cu.stride(0), total, max_seqlen)
    hit = _CU_CHECKED.get(key) if memo else None
    if hit is not None and hit[0]() is cu and hit[1] == _cu_version(cu):
        return cu
    vals = _host_values(cu)
    if vals[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {vals[0]}")
    if any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {vals if len(vals) <= 16 else vals[:16] + ['...']}")
    if vals[-1] > total:
        raise ValueError(f"{name}[-1] = {vals[-1]} exceeds the number of tokens ({total})")
    if max_seqlen is not None:
        longest = max((b - a for a, b in zip(vals, vals[1:])), default=0)
        if not isinstance(max_seqlen, int) or max_seqlen < longest:
            raise ValueError(f"{max_name} must be an int >= the longest sequence in {name} ({longest}), "
                             f"got {max_seqlen!r}")
    if memo:
        if len(_CU_CHECKED) >= _MAX_CU_CHECKED:
            _CU_CHECKED.clear()
        _CU_CHECKED[key] = (weakref.ref(cu), _cu_version(cu))
    return cu
