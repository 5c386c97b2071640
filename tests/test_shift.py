"""The permutation null's streaming cyclic shift equals np.roll of the whole probe sequence."""

import numpy as np
import pytest
import torch

from convergent.stats.shift import CyclicShift, _rows


def run_shift(k, m, batch_sizes):
    data = [torch.arange(m, dtype=torch.float64) * 10 + i for i in range(k)]  # member i, image t
    shift = CyclicShift(k)
    rows = [[] for _ in range(k)]
    start, next_row = 0, k - 1
    for b in batch_sizes:
        for first, chunk in shift.push([{"x": d[start : start + b, None]} for d in data]):
            assert first == next_row  # chunks come in row order, each with its first row
            next_row += _rows(chunk[0])
            for i in range(k):
                rows[i].append(chunk[i]["x"][:, 0])
        start += b
    for first, chunk in shift.finish():
        assert first == 0 and _rows(chunk[0]) == k - 1
        for i in range(k):
            rows[i].insert(0, chunk[i]["x"][:, 0])
    assert next_row == m
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


def test_holds_k_minus_1_images_and_emits_the_batch_interior_as_views():
    k, n = 4, 50
    shift = CyclicShift(k)
    for step in range(3):
        batch = [{"x": torch.randn(n, 8, 3, 3)} for _ in range(k)]
        chunks = shift.push(batch)
        interior = chunks[-1][1]
        for i in range(k):  # the interior rows are views of member i's batch, not copies
            assert interior[i]["x"].untyped_storage().data_ptr() == batch[i]["x"].untyped_storage().data_ptr()
        del batch, chunks, interior
        held = [t["x"] for t in shift.head + shift.tail if t is not None]
        # nothing the shift keeps refers to a whole batch: k - 1 images per member at most
        assert all(x.untyped_storage().nbytes() <= (k - 1) * 8 * 3 * 3 * 4 for x in held)
