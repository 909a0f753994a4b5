"""A minimal step driver for pagoda's models over a paged KV cache: what the engine's model runner does,
without scheduling, sampling or CUDA graphs. Tests feed it each step's new tokens per sequence.

One step: extend each sequence's pages to its new length, build the CSR page table *after* the append
(``kv_indptr``, ``kv_indices``, ``kv_last_page_len``), the ragged query layout (``qo_indptr``) and each
token's request and position, plan one wrapper for all layers (the prefill wrapper with ``causal=True``
when any sequence brings more than one token, else the decode wrapper) with the model's
``attn_plan_kwargs``, and run the model inside a `ForwardContext`.
"""
from __future__ import annotations

import torch

import pagoda
from pagoda.models import ForwardContext, forward_context


class PagedDriver:
    """Holds a model's KV caches (``num_pages`` pages of ``page_size`` tokens per layer) and the pages
    of each sequence. Pages are handed out in a shuffled order, so a sequence's pages are scattered."""

    def __init__(self, model, page_size: int = 4, num_pages: int = 64, seed: int = 0):
        spec = model.kv_cache_spec
        attn = model.attention_layers()[0]
        self.model, self.page_size, self.dtype = model, page_size, spec.dtype
        self.device = next(model.parameters()).device
        self.heads = (attn.num_heads, spec.num_kv_heads, spec.head_dim)
        for layer in model.attention_layers():
            layer.kv_cache = torch.zeros(num_pages, 2, page_size, spec.num_kv_heads, spec.head_dim,
                                         dtype=spec.dtype, device=self.device)
        gen = torch.Generator().manual_seed(seed)
        self.free_pages = torch.randperm(num_pages, generator=gen).tolist()
        self.pages: dict[object, list[int]] = {}
        self.lens: dict[object, int] = {}
        workspace = torch.empty(1 << 20, dtype=torch.uint8, device=self.device)
        self.prefill = pagoda.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
        self.decode = pagoda.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")

    def free(self, seq_id) -> None:
        """Give a sequence's pages back."""
        self.free_pages += self.pages.pop(seq_id, [])
        self.lens.pop(seq_id, None)

    @torch.inference_mode()
    def step(self, chunks: dict, all_logits: bool = False, plan_kwargs: dict | None = None) -> torch.Tensor:
        """Run one step: ``chunks`` maps sequence id -> its new token ids (a prefill chunk or one decode
        token). Returns float32 logits of each sequence's last new token ``[len(chunks), vocab]`` (in
        the order of ``chunks``), or of every new token ``[total_new_tokens, vocab]`` with ``all_logits``.
        ``plan_kwargs`` replaces the model's ``attn_plan_kwargs``."""
        ps, dev = self.page_size, self.device
        qo_lens, kv_lens, page_lists = [], [], []
        for seq_id, tokens in chunks.items():
            n = self.lens.get(seq_id, 0) + len(tokens)
            pages = self.pages.setdefault(seq_id, [])
            while len(pages) * ps < n:
                pages.append(self.free_pages.pop())
            self.lens[seq_id] = n
            qo_lens.append(len(tokens))
            kv_lens.append(n)
            page_lists.append(pages)
        as_i32 = dict(dtype=torch.int32, device=dev)
        qo_indptr = torch.tensor([0] + qo_lens, **as_i32).cumsum(0, dtype=torch.int32)
        kv_indptr = torch.tensor([0] + [len(p) for p in page_lists], **as_i32).cumsum(0, dtype=torch.int32)
        kv_indices = torch.tensor([p for pages in page_lists for p in pages], **as_i32)
        last = [n - (len(p) - 1) * ps for n, p in zip(kv_lens, page_lists, strict=True)]
        kv_last_page_len = torch.tensor(last, **as_i32)
        nnz = sum(qo_lens)
        batch_indices, positions = pagoda.get_batch_indices_positions(qo_indptr, torch.tensor(kv_lens, **as_i32),
                                                                      nnz)
        hq, hk, d = self.heads
        kwargs = dict(self.model.attn_plan_kwargs if plan_kwargs is None else plan_kwargs)
        if max(qo_lens) == 1:
            self.decode.plan(kv_indptr, kv_indices, kv_last_page_len, hq, hk, d, ps, q_data_type=self.dtype,
                             kv_data_type=self.dtype, **kwargs)
            wrapper = self.decode
        else:
            self.prefill.plan(qo_indptr, kv_indptr, kv_indices, kv_last_page_len, hq, hk, d, ps, causal=True,
                              q_data_type=self.dtype, kv_data_type=self.dtype, **kwargs)
            wrapper = self.prefill
        input_ids = torch.tensor([t for tokens in chunks.values() for t in tokens], dtype=torch.int64, device=dev)
        ctx = ForwardContext(wrapper, batch_indices, positions, kv_indices, kv_indptr, kv_last_page_len)
        with forward_context(ctx):
            hidden = self.model(input_ids, positions)
        if not all_logits:
            hidden = hidden[qo_indptr[1:].long() - 1]
        return self.model.compute_logits(hidden)
