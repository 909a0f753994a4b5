"""Per-row top_k / top_p / min_p tensors accepted and rejected as FlashInfer 0.6 does (its ``check_tensor_param``
wording, any real dtype converted by value) and the values reaching their rows (float64 oracle of the kept sets)."""
import pytest
import torch

from pagoda import sampling as S


def _probs(b=4, v=50):
    p = torch.rand(b, v, dtype=torch.float64) + 0.01
    return (p / p.sum(-1, keepdim=True)).float()


CALLS = {
    "top_p": lambda p, t: S.top_p_renorm_probs(p, t),
    "top_k": lambda p, t: S.top_k_renorm_probs(p, t),
    "top_k_mask": lambda p, t: S.top_k_mask_logits(p.log(), t),
    "min_p": lambda p, t: S.min_p_sampling_from_probs(p, t),
    "top_p_sample": lambda p, t: S.top_p_sampling_from_probs(p, t),
    "top_k_sample": lambda p, t: S.top_k_sampling_from_probs(p, t),
    "joint_k": lambda p, t: S.top_k_top_p_sampling_from_probs(p, t, 0.9),
    "joint_p": lambda p, t: S.top_k_top_p_sampling_from_probs(p, 5, t),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_flashinfer_errors_for_bad_parameter_tensors(call):
    fn, p = CALLS[call], _probs()
    with pytest.raises(ValueError, match=r"Expected a 1D tensor or scalar.*got a 2D tensor"):
        fn(p, torch.full((4, 50), 1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"Expected a 1D tensor of shape \(batch_size,\) or scalar.*got a "
                                         r"0-dimensional tensor"):
        fn(p, torch.tensor(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="Sampling parameter.*batch size mismatch"):
        fn(p, torch.tensor([1], dtype=torch.int32))
    with pytest.raises(TypeError):
        fn(p, torch.ones(4, dtype=torch.complex64))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float16, torch.float64, torch.bool])
def test_any_real_dtype_is_accepted_and_converted_by_value(dtype):
    p = _probs()
    # top_p as int32 ones (FlashInfer's test passes int tensors): value 1 keeps every token.
    torch.testing.assert_close(S.top_p_renorm_probs(p, torch.ones(4, dtype=dtype)), p / p.sum(-1, keepdim=True))
    k = torch.tensor([1, 3, 50, 7]).to(dtype) if dtype != torch.bool else torch.ones(4, dtype=torch.bool)
    got = S.top_k_renorm_probs(p, k)
    for r in range(4):
        kk = int(k[r])
        keep = p[r].double() >= p[r].double().topk(kk).values[-1]
        assert torch.equal(got[r] > 0, keep)


def test_float_top_k_tensor_truncates_as_int():
    p = _probs()
    torch.testing.assert_close(S.top_k_renorm_probs(p, torch.tensor([2.9, 2.2, 2.0, 2.5])), S.top_k_renorm_probs(p, 2))


def test_per_row_min_p_reaches_its_row():
    p = _probs(3, 40)
    mp = torch.tensor([0.0, 0.9, 1.0], dtype=torch.float64)
    for _ in range(20):
        tok = S.min_p_sampling_from_probs(p, mp)
        for r in (1, 2):
            assert p[r, tok[r]] >= mp[r] * p[r].max() - 1e-7


def test_indices_read_entry_i_for_output_i():
    """With indices FlashInfer checks the length against the input's rows and reads entry i for output i; a tensor
    of one value per output is also taken. More outputs than rows with a rows-long tensor: ValueError."""
    p = _probs(4, 30)
    idx = torch.tensor([3, 3], dtype=torch.int64)
    k_rows = torch.tensor([1, 30, 30, 30], dtype=torch.int32)          # entry 0 -> output 0 (row 3): top-1
    for _ in range(10):
        tok = S.top_k_sampling_from_probs(p, k_rows, indices=idx)
        assert tok[0] == p[3].argmax()
    tok = S.top_k_sampling_from_probs(p, torch.tensor([1, 1], dtype=torch.int32), indices=idx)
    assert torch.equal(tok, p[3].argmax().repeat(2).to(tok.dtype))
    with pytest.raises(ValueError, match="top_k"):
        S.top_k_sampling_from_probs(p[:1], torch.tensor([1], dtype=torch.int32), indices=torch.zeros(3,
                                                                                                   dtype=torch.int64))
