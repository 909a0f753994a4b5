"""Bad inputs to the samplers: clear TypeError/ValueError naming the argument (CPU path)."""
import pytest
import torch

from pagoda.ops import sampling as S


def test_cpu_seed_offset_types():
    p = torch.softmax(torch.randn(3, 10), -1)
    with pytest.raises(TypeError, match="seed"):
        S.sampling_from_probs(p, seed=1.5, offset=0)
    with pytest.raises(TypeError, match="offset"):
        S.top_p_sampling_from_probs(p, 0.5, seed=1, offset="0")
    S.sampling_from_probs(p, seed=1, offset=0)
    S.sampling_from_probs(p, seed=torch.tensor([1]), offset=torch.tensor([0]))


def test_huge_top_k_keeps_everything():
    p = torch.softmax(torch.randn(3, 10), -1)
    torch.testing.assert_close(S.top_k_renorm_probs(p, 10 ** 20), S.top_k_renorm_probs(p, 10))
    S.top_k_sampling_from_probs(p, 10 ** 20)


@pytest.mark.parametrize("fn,arg", [(S.top_k_renorm_probs, 2), (S.top_p_renorm_probs, 0.5)])
def test_renorm_zero_row_gives_zeros_not_nan(fn, arg):
    p = torch.softmax(torch.randn(2, 8), -1)
    p[1] = 0
    out = fn(p, arg)
    assert not out[1].any() and not torch.isnan(out).any()
    torch.testing.assert_close(out[0].sum(), torch.tensor(1.0))
