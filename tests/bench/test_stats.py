"""The studies' shared percentile: linear between the nearest ranks, as numpy's default."""
import numpy as np
import pytest

from pagoda.bench.stats import percentile


@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 100])
def test_percentile_matches_numpy(q):
    values = [5.0, 1.0, 9.0, 3.0, 7.5, 2.25, 8.0]
    assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_percentile_of_nothing_is_none():
    assert percentile([], 50) is None
    assert percentile([4.0], 99) == 4.0
