"""`pagoda.ops.apply_logits_state`: the reference (float32) and the Triton kernel (interpreter on the CPU, CUDA
on a GPU) against a per-element Python oracle of vLLM's formulas in float64."""
from __future__ import annotations

import math
import os

import pytest
import torch

from pagoda.ops.logits import apply_logits_state
from pagoda.reference import logits as ref

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _state(S: int, V: int, M: int, W: int, L: int, gen: torch.Generator, device="cpu"):
    counts = torch.randint(0, 3, (S, V), generator=gen, dtype=torch.int32) * (torch.rand(S, V, generator=gen) < 0.2)
    prompt = (torch.rand(S, V, generator=gen) < 0.1).to(torch.uint8)
    pres = torch.rand(S, generator=gen) * 4 - 2
    freq = torch.rand(S, generator=gen) * 4 - 2
    rep = torch.rand(S, generator=gen) * 1.5 + 0.5
    pres[0], freq[0], rep[0] = 0.0, 0.0, 1.0          # slot 0 has no penalties
    add = torch.randn(S, V, generator=gen)
    add[torch.rand(S, V, generator=gen) < 0.3] = float("-inf")
    use_add = (torch.arange(S) % 2).to(torch.int32)
    num_out = torch.randint(0, 6, (S,), generator=gen, dtype=torch.int32)
    min_tok = torch.randint(0, 6, (S,), generator=gen, dtype=torch.int32)
    stop = torch.randint(-1, V, (S, M), generator=gen, dtype=torch.int32)
    words = torch.full((S, W, L), -1, dtype=torch.int32)
    last = torch.full((S, L), -1, dtype=torch.int32)
    for s in range(S):
        hist = torch.randint(0, 4, (L - 1,), generator=gen).tolist()    # small ids: prefixes match often
        n_hist = int(torch.randint(0, L, (1,), generator=gen))
        last[s, L - 1 - n_hist:L - 1] = torch.tensor(hist[:n_hist], dtype=torch.int32)
        for w in range(W - 1):                                          # the last word stays unused
            n = int(torch.randint(1, L + 1, (1,), generator=gen))
            words[s, w, L - n:] = torch.randint(0, 4 if n > 1 else V, (n,), generator=gen, dtype=torch.int32)
            words[s, w, L - 1] = int(torch.randint(0, V, (1,), generator=gen))
    t = dict(output_counts=counts, prompt_mask=prompt, presence_penalty=pres, frequency_penalty=freq,
             repetition_penalty=rep, logit_add=add, use_add=use_add, num_output=num_out, min_tokens=min_tok,
             stop_ids=stop, bad_words=words, last_tokens=last)
    return {k: v.to(device) for k, v in t.items()}


def _oracle(logits: torch.Tensor, row_slots: list[int], st: dict) -> torch.Tensor:
    """vLLM's steps, element by element in float64 (only the small shapes of these tests)."""
    out = logits.double().clone()
    S, W, L = st["bad_words"].shape
    for r, s in enumerate(row_slots):
        if s < 0:
            continue
        banned = set()
        if st["num_output"][s] < st["min_tokens"][s]:
            banned |= {t for t in st["stop_ids"][s].tolist() if t >= 0}
        n_out = [t for t in st["last_tokens"][s, :L - 1].tolist() if t >= 0]
        for w in range(W):
            word = [t for t in st["bad_words"][s, w].tolist() if t >= 0]
            if not word:
                continue
            prefix = word[:-1]
            if len(prefix) <= len(n_out) and (not prefix or n_out[len(n_out) - len(prefix):] == prefix):
                banned.add(word[-1])
        for v in range(out.shape[1]):
            x = out[r, v].item()
            if st["use_add"][s]:
                x += st["logit_add"][s, v].item()
            if v in banned:
                x = -math.inf
            c = int(st["output_counts"][s, v])
            if c > 0 or st["prompt_mask"][s, v]:
                rep = st["repetition_penalty"][s].item()
                x = x / rep if x > 0 else x * rep
            x -= st["frequency_penalty"][s].item() * c + st["presence_penalty"][s].item() * (c > 0)
            out[r, v] = x
    return out


def _check(got: torch.Tensor, want: torch.Tensor) -> None:
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got.double()), inf) and torch.equal(got.double()[inf], want[inf])
    torch.testing.assert_close(got.double()[~inf], want[~inf], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["reference", "kernel"])
def test_matches_oracle(path, request):
    if path == "kernel":
        if not INTERPRET:
            pytest.skip("the kernel path on the CPU needs TRITON_INTERPRET=1")
        request.getfixturevalue("triton_on_cpu")
    gen = torch.Generator().manual_seed(0)
    S, V = 5, 100                       # V not a multiple of the tile: the masked tail is exercised
    st = _state(S, V, M=4, W=4, L=4, gen=gen)
    row_slots = [3, -1, 0, 4, 1, 2, 4]   # a repeated slot (n > 1 shares nothing, but rows may) and a skipped row
    logits = torch.randn(len(row_slots), V, generator=gen) * 3
    want = _oracle(logits, row_slots, st)
    got = apply_logits_state(logits.clone(), torch.tensor(row_slots, dtype=torch.int32), **st)
    _check(got, want)
    assert torch.equal(got[1], logits[1])


def test_float64_reference_and_partial_groups():
    gen = torch.Generator().manual_seed(1)
    st = _state(3, 40, M=2, W=2, L=2, gen=gen)
    logits = torch.randn(3, 40, generator=gen)
    slots = torch.tensor([2, 0, 1], dtype=torch.int32)
    exact = ref.apply_logits_state(logits, slots, *(st[k] for k in ("output_counts", "prompt_mask", "presence_penalty",
                                                                  "frequency_penalty", "repetition_penalty")),
                                   logit_add=st["logit_add"], use_add=st["use_add"], num_output=st["num_output"],
                                   min_tokens=st["min_tokens"], stop_ids=st["stop_ids"], bad_words=st["bad_words"],
                                   last_tokens=st["last_tokens"], compute_dtype=torch.float64)
    assert exact.dtype == torch.float64
    _check(exact.float(), _oracle(logits, slots.tolist(), st))
    # Only the additive row: the penalties and bans are skipped.
    only_add = apply_logits_state(logits.clone(), slots, logit_add=st["logit_add"], use_add=st["use_add"])
    want = torch.where(st["use_add"][slots.long()][:, None] != 0, logits + st["logit_add"][slots.long()], logits)
    assert torch.equal(only_add, want)


def test_bad_input():
    logits = torch.zeros(2, 8)
    slots = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(TypeError, match="logits"):
        apply_logits_state(logits.double(), slots)
    with pytest.raises(ValueError, match="row_slots"):
        apply_logits_state(logits, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="given whole"):
        apply_logits_state(logits, slots, output_counts=torch.zeros(1, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="output_counts"):
        apply_logits_state(logits, slots, output_counts=torch.zeros(1, 9, dtype=torch.int32),
                           prompt_mask=torch.zeros(1, 8, dtype=torch.uint8), presence_penalty=torch.zeros(1),
                           frequency_penalty=torch.zeros(1), repetition_penalty=torch.ones(1))


@pytest.mark.gpu
def test_kernel_cuda_matches_oracle():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gen = torch.Generator().manual_seed(2)
    S, V = 6, 5000
    st = _state(S, V, M=4, W=4, L=4, gen=gen)
    row_slots = [5, 0, -1, 2, 3, 1]
    logits = torch.randn(len(row_slots), V, generator=gen) * 3
    want = ref.apply_logits_state(logits.clone(), torch.tensor(row_slots, dtype=torch.int32),
                                  *(st[k] for k in ("output_counts", "prompt_mask", "presence_penalty",
                                                    "frequency_penalty", "repetition_penalty")),
                                  logit_add=st["logit_add"], use_add=st["use_add"], num_output=st["num_output"],
                                  min_tokens=st["min_tokens"], stop_ids=st["stop_ids"], bad_words=st["bad_words"],
                                  last_tokens=st["last_tokens"], compute_dtype=torch.float64)
    cuda = {k: v.cuda() for k, v in st.items()}
    got = apply_logits_state(logits.cuda(), torch.tensor(row_slots, dtype=torch.int32, device="cuda"), **cuda)
    _check(got.cpu(), want)
