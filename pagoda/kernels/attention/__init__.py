"""Triton attention kernels for every GPU: dense and ragged prefill (`fwd`), paged prefill (`prefill_paged`),
paged decode (`decode`), their shared paged-tile helpers (`paged_tile`) and the merge of partial states
(`merge`)."""
