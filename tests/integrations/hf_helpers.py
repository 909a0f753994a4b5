"""Oracles shared by the HF sampling tests: HF's own warper chain (with the stable sort CUDA uses, the definite
tie rule pagoda follows) and a seeded ``generate`` call."""
import torch
from transformers import LogitsProcessorList
from transformers.generation import logits_process as lp


def hf_chain(temperature, top_k, top_p, min_p) -> LogitsProcessorList:
    """HF's ``Temperature -> TopK -> TopP -> MinP`` warpers (None / 0 leaves one out), in generate's order."""
    chain = LogitsProcessorList()
    if temperature is not None:
        chain.append(lp.TemperatureLogitsWarper(temperature))
    if top_k:
        chain.append(lp.TopKLogitsWarper(top_k))
    if top_p is not None:
        chain.append(lp.TopPLogitsWarper(top_p))
    if min_p is not None:
        chain.append(lp.MinPLogitsWarper(min_p))
    return chain


def stable_sort(monkeypatch) -> None:
    """HF's top-p warper with a stable sort (what CUDA's sort of a long row does): a tie group straddling the
    boundary is then cut at its lowest indices, a definite oracle (the CPU's unstable sort cuts it anywhere)."""
    real = torch.sort
    monkeypatch.setattr(torch, "sort", lambda x, *a, **kw: real(x, *a, **{**kw, "stable": True}))


def generate(model, seed: int, max_new_tokens: int, **kw):
    """``model.generate`` on three fixed random prompts of 7 ids, the global RNG seeded with ``seed``."""
    ids = torch.randint(2, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              pad_token_id=0, **kw)
