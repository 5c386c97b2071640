"""One-to-one matching on planted structure, against brute force and scipy."""

import itertools

import numpy as np
import pytest
import torch

from convergent.analysis import matching
from convergent.stats import Moments


def planted(n=4000, c=12, noise=0.3, seed=0):
    """Net b's units are a permutation of net a's plus noise."""
    rng = np.random.default_rng(seed)
    a = np.maximum(rng.normal(size=(n, c)) + 0.5, 0)
    perm = rng.permutation(c)
    b = a[:, perm] + noise * rng.normal(size=(n, c))
    m = Moments([c, c])
    m.update(torch.from_numpy(a), torch.from_numpy(b))
    return m.compute(), perm


def test_max_match_recovers_the_planted_permutation():
    st, perm = planted()
    index, value = matching.max_match(st.corr(0, 1))
    # unit u of a appears in b at position where perm == u
    expected = np.argsort(perm)
    assert np.array_equal(index.numpy(), expected)
    assert (value > 0.8).all()


def test_semi_match_degrades_gracefully_with_noise():
    st, perm = planted(noise=2.0, seed=3)
    semi_index, _ = matching.semi_match(st.corr(0, 1))
    max_index, _ = matching.max_match(st.corr(0, 1))
    expected = np.argsort(perm)
    semi_ok = np.mean(semi_index.numpy() == expected)
    assert 0.5 <= semi_ok <= 1.0
    assert np.mean(max_index.numpy() == expected) >= semi_ok - 1e-9


def test_max_match_equals_brute_force_on_small_matrices():
    rng = np.random.default_rng(0)
    for _ in range(20):
        c = rng.uniform(-1, 1, size=(5, 5))
        best = max(itertools.permutations(range(5)), key=lambda p: sum(c[i, p[i]] for i in range(5)))
        index, value = matching.max_match(c)
        assert np.isclose(value.sum(), sum(c[i, best[i]] for i in range(5)))
        assert isinstance(index, np.ndarray)  # numpy in, numpy out


@pytest.mark.parametrize("shape", [(3, 7), (7, 3)])
def test_rectangular_matrices_match_min_rows_cols(shape):
    rng = np.random.default_rng(1)
    c = torch.from_numpy(rng.uniform(-1, 1, size=shape))
    index, value = matching.max_match(c)
    matched = index[index >= 0]
    assert len(matched) == min(shape) and len(set(matched.tolist())) == min(shape)
    assert (value[index < 0] == 0).all()


def test_within_max_and_same_pair():
    c = torch.tensor([[1.0, 0.2, 0.9], [0.2, 1.0, -0.5], [0.9, -0.5, 1.0]])
    assert matching.within_max(c).tolist() == pytest.approx([0.9, 0.2, 0.9])
    assert matching.same_pair_fraction(torch.tensor([0, 1, 2]), torch.tensor([0, 2, 2])) == pytest.approx(2 / 3)


def test_permute_to_matching_puts_pairs_on_the_diagonal():
    st, perm = planted(c=6)
    corr = st.corr(0, 1)
    index, value = matching.max_match(corr)
    permuted = matching.permute_to_matching(corr, index)
    torch.testing.assert_close(torch.diagonal(permuted), value)


def test_dead_units_produce_no_nan():
    rng = np.random.default_rng(2)
    a = np.maximum(rng.normal(size=(500, 6)), 0)
    a[:, 1] = 0
    b = a.copy()
    b[:, 3] = 0
    m = Moments([6, 6])
    m.update(torch.from_numpy(a), torch.from_numpy(b))
    corr = m.compute().corr(0, 1)
    for fn in (matching.semi_match, matching.max_match):
        index, value = fn(corr)
        assert torch.isfinite(value).all()
    assert torch.isfinite(matching.within_max(m.compute().corr(0, 0))).all()


def test_nan_input_is_a_clear_error():
    with pytest.raises(ValueError, match="NaN or inf"):
        matching.max_match(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]))
