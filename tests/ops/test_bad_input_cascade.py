"""Bad inputs to the cascade ops and level builder: clear TypeError/ValueError naming the argument."""
import math

import pytest
import torch

import pagoda
from pagoda.ops.cascade_levels import build_cascade_levels

WS = torch.empty(1 << 20, dtype=torch.uint8)


def i32(*a):
    return torch.tensor(a, dtype=torch.int32)


def test_merge_states_zero_states_is_empty_segment():
    v, s = pagoda.merge_states(torch.randn(3, 0, 2, 16), torch.randn(3, 0, 2))
    assert v.shape == (3, 2, 16) and not v.any()
    assert s.shape == (3, 2) and (s == -math.inf).all()


def test_cascade_wrapper_use_cuda_graph_bool():
    with pytest.raises(TypeError, match="use_cuda_graph"):
        pagoda.MultiLevelCascadeAttentionWrapper(2, WS, use_cuda_graph="no")


@pytest.mark.parametrize("bad,err", [(i32(), ValueError), (None, TypeError), ([0, 4], TypeError),
                                     (i32(0, 4)[None], ValueError)])
def test_cascade_plan_qo_indptr_checked(bad, err):
    w = pagoda.MultiLevelCascadeAttentionWrapper(2, WS)
    with pytest.raises(err, match=r"qo_indptr_arr\[0\]"):
        w.plan([bad, i32(0, 2, 4)], [i32(0, 1), i32(0, 1, 2)], [i32(0), i32(1, 2)], [i32(4), i32(2, 3)], 4, 2, 16, 4,
               q_data_type=torch.float32)


@pytest.mark.parametrize("kw,err,name", [
    (dict(page_size=0), ValueError, "page_size"),
    (dict(page_lists=[[0, -1], [0, 2]]), ValueError, "page_lists"),
    (dict(page_lists=[["a"], [0, 2]]), TypeError, "page_lists"),
    (dict(page_lists=None), TypeError, "page_lists"),
    (dict(qo_lens=[-1, 1]), ValueError, "qo_lens"),
    (dict(qo_lens=[1.5, 1]), TypeError, "qo_lens"),
])
def test_build_cascade_levels_checks(kw, err, name):
    args = dict(page_lists=[[0, 1], [0, 2]], last_page_lens=[2, 3], qo_lens=[1, 1], page_size=4)
    args.update(kw)
    with pytest.raises(err, match=name):
        build_cascade_levels(**args)
