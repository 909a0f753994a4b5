"""Helpers of the sampler tests: generators, random probability rows, and the law check of many draws."""
import math

import torch

from pagoda.reference import sampling as ref


def assert_law(samples: torch.Tensor, want: torch.Tensor) -> None:
    """Empirical frequencies of ``samples`` match ``want`` (renormalised): support, cosine, chi-square."""
    want = want.double().cpu().clamp_min(0)
    want = want / want.sum()
    counts = torch.bincount(samples.long().cpu(), minlength=want.numel()).double()
    assert counts.numel() == want.numel(), "token id out of range"
    n = counts.sum()
    drawn_excluded = torch.nonzero((want == 0) & (counts > 0)).flatten().tolist()
    assert not drawn_excluded, f"drew excluded tokens {drawn_excluded}"
    cos = torch.nn.functional.cosine_similarity(counts / n, want, dim=0)
    assert cos > 0.99, f"cosine similarity {cos:.4f}"
    big = n * want >= 5  # chi-square over cells with enough expectation, the rest lumped together
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([n * want[big], (n * want[~big]).sum()[None]])
    keep = exp > 0
    chi2 = (((obs - exp) ** 2)[keep] / exp[keep]).sum().item()
    df = max(int(keep.sum()) - 1, 1)
    assert chi2 < df + 6 * math.sqrt(2 * df) + 10, f"chi2 {chi2:.1f} with {df} degrees of freedom"


def _gen(device, seed=1234):
    return torch.Generator(device=device).manual_seed(seed)


def _rows(vocab, n_rows=1, device="cpu", temp=1.0):
    return torch.softmax(torch.randn(n_rows, vocab) * temp, -1).to(device)


N = 20000


def _many(device, n=N):
    return torch.zeros(n, dtype=torch.int64, device=device)


def _k_first_keep(p64, k, tp):
    keep_k = ref.keep_top_k(p64, k)
    return keep_k & ref.keep_top_p(torch.where(keep_k, p64, 0.0), tp)
