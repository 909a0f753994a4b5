"""FlashInfer-compatible speculative verification (``flashinfer.sampling.chain_speculative_sampling``).

Importable from `pagoda.ops.sampling` and `pagoda.sampling` as well. CUDA tensors run
`pagoda.kernels.sampling.speculative` (Philox state as in `pagoda.ops.sampling`'s samplers); other devices run
the reference (`pagoda.reference.sampling.chain_speculative_sampling`).
"""
from __future__ import annotations

import torch

from pagoda.ops import _checks
from pagoda.ops import _sampling_args as _a
from pagoda.ops._sampling_args import Philox, Tensor
from pagoda.reference import sampling as _ref

__all__ = ["chain_speculative_sampling"]


def chain_speculative_sampling(draft_probs: Tensor, draft_token_ids: Tensor, target_probs: Tensor,
                               maybe_output_accepted_token_num: Tensor | None = None,
                               maybe_output_emitted_draft_token_num: Tensor | None = None,
                               deterministic: bool = True, generator: torch.Generator | None = None,
                               seed: Philox = None, offset: Philox = None) -> tuple[Tensor, Tensor, Tensor]:
    """Verify a chain of ``n`` draft tokens per request against the target model (speculative sampling).

    Args:
        draft_probs: ``[batch, n, vocab]`` float; draft_token_ids: int32/int64 ``[batch, n]``;
        target_probs: ``[batch, n + 1, vocab]`` float (one extra row for the bonus token).
        maybe_output_accepted_token_num / maybe_output_emitted_draft_token_num: optional int
            ``[batch]`` tensors the counts are ADDED to in place (and returned).

    Returns:
        ``(output_token_ids [batch, n+1] int32`` (accepted drafts, then the corrected or bonus token,
        then -1 padding), ``output_accepted_token_num [batch]`` (positions passing their test,
        counted independently), ``output_emitted_draft_token_num [batch])`` (drafts emitted before
        the first rejection; bonus excluded). The emitted tokens follow the target distribution.
    """
    _checks.check_tensor("draft_probs", draft_probs, ndim=3, dtypes=_a.FLOAT_DTYPES)
    _checks.check_tensor("draft_token_ids", draft_token_ids, ndim=2, dtypes=_a.INDEX_DTYPES)
    _checks.check_tensor("target_probs", target_probs, ndim=3, dtypes=_a.FLOAT_DTYPES)
    b, n, vocab = draft_probs.shape
    if tuple(draft_token_ids.shape) != (b, n):
        raise ValueError(f"draft_token_ids must have shape ({b}, {n}), got {tuple(draft_token_ids.shape)}")
    if tuple(target_probs.shape) != (b, n + 1, vocab):
        raise ValueError(f"target_probs must have shape ({b}, {n + 1}, {vocab}), got {tuple(target_probs.shape)}")
    if vocab == 0:
        raise ValueError("draft_probs must have a non-empty vocabulary (last dimension)")
    _checks.check_same("draft_probs, draft_token_ids, target_probs", (draft_probs, draft_token_ids, target_probs),
                       "device")
    for name, t in (("maybe_output_accepted_token_num", maybe_output_accepted_token_num),
                    ("maybe_output_emitted_draft_token_num", maybe_output_emitted_draft_token_num)):
        if t is not None:
            _checks.check_tensor(name, t, ndim=1, dtypes=_a.INDEX_DTYPES)
            if t.shape[0] != b or t.device != draft_probs.device:
                raise ValueError(f"{name} must have shape ({b},) on {draft_probs.device}, got "
                                 f"{tuple(t.shape)} on {t.device}")
    if not draft_probs.is_cuda:
        if draft_token_ids.numel() and (int(draft_token_ids.min()) < 0 or int(draft_token_ids.max()) >= vocab):
            raise ValueError(f"draft_token_ids must lie in [0, {vocab}), got values in "
                             f"[{int(draft_token_ids.min())}, {int(draft_token_ids.max())}]")
        _a.check_generator_cpu(generator, seed, offset)
        return _ref.chain_speculative_sampling(draft_probs, draft_token_ids, target_probs,
                                               maybe_output_accepted_token_num,
                                               maybe_output_emitted_draft_token_num, deterministic, generator,
                                               seed, offset)
    from pagoda.kernels.sampling.speculative import chain_speculative

    dev = draft_probs.device
    s, o = _a.philox_seed_offset(generator, dev, b, b * max(vocab, 4) + b * n, seed, offset)  # as `sampling._launch`
    out = torch.empty(b, n + 1, dtype=torch.int32, device=dev)
    accepted = torch.empty(b, dtype=torch.int32, device=dev)
    emitted = torch.empty(b, dtype=torch.int32, device=dev)
    contig = [t if t.stride(-1) == 1 else t.contiguous() for t in (draft_probs, draft_token_ids, target_probs)]
    chain_speculative(*contig, out, accepted, emitted, s, o)
    if maybe_output_accepted_token_num is not None:
        maybe_output_accepted_token_num += accepted.to(maybe_output_accepted_token_num.dtype)
        accepted = maybe_output_accepted_token_num
    if maybe_output_emitted_draft_token_num is not None:
        maybe_output_emitted_draft_token_num += emitted.to(maybe_output_emitted_draft_token_num.dtype)
        emitted = maybe_output_emitted_draft_token_num
    return out, accepted, emitted
