"""The permutation null's streaming cyclic shift equals np.roll of the whole probe sequence."""

import numpy as np
import pytest
import torch

from convergent.stats.shift import CyclicShift


def run_shift(k, m, batch_sizes):
    data = [torch.arange(m, dtype=torch.float64) * 10 + i for i in range(k)]  # member i, image t
    shift = CyclicShift(k)
    rows = [[] for _ in range(k)]
    start = 0
    for b in batch_sizes:
        out = shift.push([{"x": d[start : start + b, None]} for d in data])
        start += b
        if out:
            for i in range(k):
                rows[i].append(out[i]["x"][:, 0])
    tail = shift.finish()
    if tail:
        for i in range(k):
            rows[i].insert(0, tail[i]["x"][:, 0])
    return [torch.cat(r).numpy() for r in rows], data


@pytest.mark.parametrize("k,batches", [(2, [5, 5]), (4, [1, 1, 1, 7]), (4, [10]), (3, [2, 3, 1, 4, 2]), (4, [3, 3, 3])])
def test_rows_are_rolled_images(k, batches):
    m = sum(batches)
    got, data = run_shift(k, m, batches)
    for i in range(k):
        # rows come as [0..K-2] then [K-1..M-1]: row r holds member i's image (r - i) mod M
        expected = np.roll(data[i].numpy(), i)
        assert np.array_equal(np.sort(got[i]), np.sort(expected))
        order = list(range(k - 1)) + list(range(k - 1, m))
        assert np.array_equal(got[i], expected[order])
    for a in range(k):
        for b in range(a + 1, k):  # no row pairs the same image of two members
            assert not np.any(got[a] // 10 == got[b] // 10)


def test_too_few_images_is_a_clear_error():
    with pytest.raises(ValueError, match="more probe images"):
        run_shift(4, 3, [3])
