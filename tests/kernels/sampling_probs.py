"""Random probability rows for the sampling kernel tests."""
import torch


def probs(batch: int, vocab: int, dtype=torch.float32, temp: float = 1.5) -> torch.Tensor:
    """``[batch, vocab]`` rows of ``softmax(randn * temp)`` in ``dtype`` (larger ``temp``: peakier rows)."""
    return torch.softmax(torch.randn(batch, vocab) * temp, -1).to(dtype)
