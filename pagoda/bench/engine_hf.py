"""HF transformers' ``generate`` on the engine benchmark's requests (`pagoda.bench.engine`): static batches
in arrival order, each left-padded to its longest prompt and run to its longest ``max_tokens`` (what static
batching costs), with HF's static KV cache, compiled as ``generate`` does by default on a GPU (the decode
step under torch.compile). The batch is as large as fits: the largest power of two up to 256 whose static
cache takes at most half of the free memory. Sampling as the engine's (temperature 0.6, no top-k), no EOS.

Only the tokens each request asked for count; a run stops past the time budget (``MaxTimeCriteria``), and
the figure then covers the tokens produced so far (``partial``). The compile happens in an untimed
generate of the same shapes stopped after a few tokens.
"""
from __future__ import annotations

import gc
import time

import torch

from pagoda.bench import report as _report

_sig = _report.significant


class _StopAfter:
    """A stopping criterion: stop after ``n`` generated tokens (the compile warm-up)."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        return torch.full((input_ids.shape[0],), self.calls >= self.n, dtype=torch.bool, device=input_ids.device)


def _batch_size(hf_config, itemsize: int, max_cache_len: int, device: torch.device, n: int) -> int:
    from pagoda.bench.engine import kv_bytes_per_token

    if device.type != "cuda":
        return min(n, 8)
    free = torch.cuda.mem_get_info(device)[0]
    per_seq = kv_bytes_per_token(hf_config, itemsize) * max_cache_len
    b = 256
    while b > 1 and b * per_seq > free // 2:
        b //= 2
    return min(b, n)


def _build(model_dir: str, hf_config, device, dtype, dummy: bool):
    import transformers

    with torch.device(device):
        if dummy:
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.generation_config.eos_token_id = None
    return model.to(device).eval()


def _generate_timed(model, batch, generate_kwargs: dict, temperature: float, device: torch.device, warm_up: bool,
                    left_s: float) -> tuple[int, float]:
    """One static batch through ``model.generate``: ``batch`` is ``[(prompt ids, max_tokens)]``, left-padded to
    its longest prompt and sampled (``temperature``, no top-k / top-p) to its longest ``max_tokens``, stopped past
    ``left_s`` seconds. ``warm_up``: first an untimed generate of the same shapes stopped after a few tokens (the
    compile). Returns (tokens generated per row, seconds of the timed generate)."""
    from transformers import MaxTimeCriteria, StoppingCriteriaList

    longest = max(len(p) for p, _ in batch)
    ids = torch.zeros(len(batch), longest, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for r, (p, _) in enumerate(batch):
        ids[r, longest - len(p):] = torch.tensor(p, device=device)
        mask[r, longest - len(p):] = 1
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=max(n for _, n in batch), do_sample=True,
              temperature=temperature, top_k=0, top_p=1.0, pad_token_id=0, **generate_kwargs)
    with torch.no_grad():
        if warm_up:
            model.generate(**kw, stopping_criteria=StoppingCriteriaList([_StopAfter(3)]))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = model.generate(**kw, stopping_criteria=StoppingCriteriaList([MaxTimeCriteria(left_s)]))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return out.shape[1] - longest, time.perf_counter() - t0


def run_hf(model_dir: str, hf_config, requests, cfg, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """One row per ``cfg.hf_impls`` entry (status "error: ..." when one fails)."""
    from pagoda.bench.budget import reason
    from pagoda.bench.e2e import _set_impl, cache_kwargs

    rows = []
    itemsize = torch.empty(0, dtype=dtype).element_size()
    try:
        model = _build(model_dir, hf_config, device, dtype, dummy=cfg.model is None)
    except Exception as exc:      # e.g. out of memory: named in the report, the engine's figure stands
        return [dict(system=f"hf-{impl}", status=f"error: {reason(exc)}") for impl in cfg.hf_impls]
    max_cache = max(len(p) for p, _ in requests) + max(n for _, n in requests)
    b = _batch_size(hf_config, itemsize, max_cache, device, len(requests))
    batches = [requests[i:i + b] for i in range(0, len(requests), b)]
    cache = cache_kwargs("compiled" if device.type == "cuda" else "static")
    for impl in cfg.hf_impls:
        try:
            torch._dynamo.reset()
            _set_impl(model, impl)
            done_out = done_in = done_req = 0
            elapsed = 0.0
            partial = False
            for j, batch in enumerate(batches):
                left = cfg.hf_budget_s - elapsed
                if left <= 0:
                    partial = True
                    break
                steps, seconds = _generate_timed(model, batch, cache, cfg.temperature, device, j == 0, left)
                elapsed += seconds
                partial = partial or steps < max(n for _, n in batch)
                done_out += sum(min(n, steps) for _, n in batch)
                done_in += sum(len(p) for p, _ in batch)
                done_req += len(batch)
                if partial:
                    break
            rows.append(dict(system=f"hf-{impl}", status="ok", requests=done_req,
                             elapsed_s=_sig(elapsed), output_tok_s=_sig(done_out / elapsed),
                             total_tok_s=_sig((done_out + done_in) / elapsed),
                             note=f"batch {b}, static cache{' compiled' if device.type == 'cuda' else ''}"
                                  + (", partial (budget)" if partial else "")))
        except Exception as exc:
            rows.append(dict(system=f"hf-{impl}", status=f"error: {reason(exc)}"))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows
