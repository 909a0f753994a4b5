"""SamplingParams: vLLM's defaults, and every wrong field is an error naming it."""
from __future__ import annotations

import pytest

from pagoda.engine import SamplingParams
from pagoda.engine.sampling_params import RequestOutputKind


def test_defaults_are_vllms():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1, 1.0, 1.0, -1, 0.0, None)
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.max_tokens, p.min_tokens, p.logprobs) == ([], [], False, 16,
                                                                                                 0, None)
    assert (p.include_stop_str_in_output, p.skip_special_tokens) == (False, True)
    assert p.output_kind is RequestOutputKind.CUMULATIVE
    assert not p.is_greedy and SamplingParams(temperature=0).is_greedy


def test_stop_forms():
    assert SamplingParams(stop="ab").stop == ["ab"]
    assert SamplingParams(stop=("a", "bc")).stop == ["a", "bc"]
    assert SamplingParams(stop=["abc", "d"]).output_text_buffer_length == 2
    assert SamplingParams(stop=["abc"], include_stop_str_in_output=True).output_text_buffer_length == 0
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]


def test_accepted_edges():
    SamplingParams(top_k=0)
    SamplingParams(top_k=1, top_p=1e-3, min_p=1.0, temperature=0.0, max_tokens=None, min_tokens=3, logprobs=0,
                   seed=-5, n=3)
    SamplingParams(max_tokens=4, min_tokens=4)


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", -0.1), ("min_p", 1.01), ("max_tokens", 0),
    ("min_tokens", -1), ("logprobs", -1), ("stop", [""]), ("stop_token_ids", [-1]),
])
def test_bad_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field, value", [
    ("n", 1.5), ("n", True), ("temperature", "hot"), ("top_p", None), ("top_k", 2.0), ("min_p", "0"),
    ("seed", 1.0), ("stop", 3), ("stop", ["a", 3]), ("stop_token_ids", 5), ("stop_token_ids", [1.0]),
    ("ignore_eos", 1), ("max_tokens", 2.0), ("min_tokens", None), ("logprobs", 1.0),
    ("include_stop_str_in_output", "yes"), ("skip_special_tokens", None), ("output_kind", 0),
])
def test_bad_type_names_the_field(field, value):
    with pytest.raises(TypeError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=3, min_tokens=4)


def test_keyword_only():
    with pytest.raises(TypeError):
        SamplingParams(2)   # keyword-only: the field order is not vLLM's (no penalties yet)
