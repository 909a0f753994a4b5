"""Probes of the e2e study beyond tokens/s: pagoda vs sdpa agreement, and the largest batch before OOM.

Both run on the study's model through `pagoda.bench.e2e`'s helpers (implementation switching, generate).
"""
from __future__ import annotations

import torch

from pagoda.bench import e2e
from pagoda.bench.budget import CaseTimeout, Clock, free, is_oom, reason, time_limit


def agreement(model, device, caches=("dynamic", "static"), batch: int = 4, prompt_len: int = 24,
              steps: int = 4) -> dict:
    """pagoda vs sdpa on the same left-padded prompts (so both the dense and the ragged paths run): relative
    error of generate's scores over the steps up to the first differing greedy token, per cache."""
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), device=device, generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ids[mask == 0] = 0
    result = {}
    for cache in caches:
        outs = {}
        for impl in ("sdpa", "pagoda"):
            e2e._set_impl(model, impl)
            kw = dict(max_new_tokens=steps, do_sample=False, pad_token_id=0, output_scores=True,
                      return_dict_in_generate=True, **e2e.cache_kwargs(cache))
            with torch.no_grad():
                o = model.generate(input_ids=ids, attention_mask=mask, **kw)
            outs[impl] = (o.sequences[:, prompt_len:], torch.stack(o.scores).float())
        (t_ref, s_ref), (t_pg, s_pg) = outs["sdpa"], outs["pagoda"]
        same = (t_ref == t_pg).all(dim=0)
        n = steps if bool(same.all()) else int(same.int().argmin()) + 1
        rel = float((s_pg[:n] - s_ref[:n]).norm() / s_ref[:n].norm())
        result[cache] = {"rel_err_scores": round(rel, 6), "steps_compared": n, "tokens_equal": bool(same.all())}
    return result


def max_batch(model, impl: str, cfg: e2e.E2EConfig, device, clock: Clock | None = None, start: int = 128) -> dict:
    """Largest batch whose prefill of ``max_batch_prompt`` tokens + 2 decode steps runs without OOM:
    doubling from ``start``, then bisection to ``1/max_batch_resolution``; OOM is recovered. Stops early
    at the clock's end (``complete`` False, ``max_batch`` the largest batch that fitted so far)."""
    clock = clock or Clock(None)
    probes = []

    def fits(b):
        limit = clock.limit(None)
        if limit is not None and limit < 2.0:
            raise CaseTimeout("max-batch search: time budget exhausted")
        try:
            with time_limit(limit):
                e2e._generate_fn(model, impl, b, cfg.max_batch_prompt, 2, "dynamic", "none", device)()
            probes.append((b, True))
            return True
        except CaseTimeout:
            raise
        except Exception as exc:
            if not is_oom(exc):
                raise
            probes.append((b, False))
            return False
        finally:
            free(device)

    lo, hi, complete, note = 0, None, False, None
    try:
        if fits(1):
            lo, hi = 1, start
            while hi <= cfg.max_batch_limit and fits(hi):
                lo, hi = hi, hi * 2
            if hi > cfg.max_batch_limit:
                hi = None                      # never ran out of memory up to the limit
            else:
                while hi - lo > max(1, lo // cfg.max_batch_resolution):
                    mid = (lo + hi) // 2
                    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        complete = True
    except CaseTimeout as exc:
        note = str(exc)
    except Exception as exc:
        note = reason(exc)
    return {"max_batch": lo, "first_oom": hi, "complete": complete, "note": note, "prompt_len": cfg.max_batch_prompt,
            "probes": probes}
