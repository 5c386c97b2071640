"""What the calibration of a measure means, on data whose answer is known: the null sits at the
value of randomly re-paired images (also where class structure would fool a shifted null), the
interval covers the population value, the score above chance is 0 at chance and 1 when perfect."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats
from torch.utils.data import TensorDataset

from convergent.analysis.builtin.correlation import max_match_score, semi_match_score
from convergent.analysis.calibration import Calibrated, calibrate, jackknife_interval
from convergent.analysis.config import AnalysisConfig, IntervalConfig, NullConfig
from convergent.analysis.measures import linear_cka
from convergent.analysis.plan import Plan
from convergent.data.base import ClassificationData
from convergent.monitor.probe import ProbeRunner
from convergent.stats import Moments
from convergent.stats.layer import LayerStats, MomentViews

pytestmark = pytest.mark.usefixtures("one_thread")


class Replay(torch.nn.Module):
    """A "member" whose fc6 activations are given: `images` are probe indices [N, 1, 1, 1]."""

    def __init__(self, acts: torch.Tensor) -> None:
        super().__init__()
        self.acts = acts

    def layer_width(self, layer: str) -> int:
        return self.acts.shape[1]

    def forward(self, images, taps=None):
        index = images.flatten().long()
        return torch.zeros(len(index), 10), {"fc6": self.acts[index]}


def class_detectors(labels: np.ndarray, units: int, noise: float, seed: int) -> torch.Tensor:
    """Unit c fires (~1) on images of class c, plus noise: a class-selective layer."""
    rng = np.random.default_rng(seed)
    x = (labels[:, None] == np.arange(units)[None, :]).astype(np.float64) + noise * rng.standard_normal((len(labels), units))
    return torch.from_numpy(np.maximum(x, 0)).float()


def numpy_semi_match(x: np.ndarray, y: np.ndarray) -> float:
    c = np.corrcoef(x.T, y.T)[: x.shape[1], x.shape[1] :]
    return float(np.nan_to_num(c).max(axis=1).mean())


class InterleavedClasses(ClassificationData):
    """A validation split that interleaves classes (0, 1, ..., 9, 0, 1, ...), as mnist5k's does; an
    image is its own index (the Replay members look their activations up by it)."""

    num_classes, in_channels, input_size = 10, 1, 1

    def __init__(self, n: int) -> None:
        super().__init__(batch_size=100)
        self.n = n

    def build(self) -> None:
        images = torch.arange(self.n, dtype=torch.float32).view(-1, 1, 1, 1)
        self.train_set = self.val_set = TensorDataset(images, torch.arange(self.n) % 10)


def test_the_null_sits_at_random_re_pairing_where_a_shift_would_not():
    """Two nets of class detectors on a class-interleaved validation split. Shifting b's images by
    one place in the split's order (the old null) pairs class c with class c - 1, and the detectors
    still 'match' (semi-match ~0.65, as on the true pairing). The null - the probe set is a seeded
    random sample in random order, re-paired inside each batch - equals, within its own spread, the
    semi-match of globally random re-pairings computed here in numpy (~0.07)."""
    n, classes = 500, 10
    labels = np.arange(n) % classes
    a, b = class_detectors(labels, classes, 0.3, 1), class_detectors(labels, classes, 0.3, 2)
    xa, xb = a.double().numpy(), b.double().numpy()
    shifted = numpy_semi_match(xa, np.roll(xb, 1, axis=0))  # what the old shift null measured
    rng = np.random.default_rng(0)
    random_pairings = [numpy_semi_match(xa, xb[rng.permutation(n)]) for _ in range(200)]
    reference, spread = float(np.mean(random_pairings)), float(np.std(random_pairings))

    config = AnalysisConfig(layers=["fc6"], analyses=["correlation"], probe_size=n, batch_size=100,
                            null=NullConfig(draws=8), interval=IntervalConfig(groups=10))  # fmt: skip
    plan = Plan.build(config, 2)
    data = InterleavedClasses(n)
    loader = data.probe_dataloader(n, 100)
    ls = ProbeRunner(plan, {"fc6": classes}).run([Replay(a), Replay(b)], loader, "cpu").layers["fc6"]
    cal = calibrate(semi_match_score, MomentViews(ls, 10, 8), [(0, 1)], [(0, 1)])
    assert shifted > 0.5 and cal.value > 0.5  # the detectors really do match, and a shift fools itself
    assert reference < 0.15
    assert abs(cal.null - reference) < 4 * spread / np.sqrt(8) + 1e-3, (cal.null, reference, spread)
    assert cal.null <= cal.null_p95 and cal.null_p95 < 0.2
    assert cal.above_null == pytest.approx((cal.value - cal.null) / (1 - cal.null))
    order = [int(i) for batch in loader for i in batch[0].flatten()]
    assert sorted(order) == list(range(n)) and order != list(range(n))  # every image once, in a random order


def population_pair(units: int, rho: float, seed: int):
    """A joint Gaussian of two nets: unit i of a correlates rho with unit i of b, nothing else."""
    rng = np.random.default_rng(seed)
    scale_a, scale_b = rng.uniform(0.5, 2, units), rng.uniform(0.5, 2, units)
    cov = np.zeros((2 * units, 2 * units))
    cov[:units, :units] = np.diag(scale_a**2)
    cov[units:, units:] = np.diag(scale_b**2)
    cross = np.diag(rho * scale_a * scale_b)
    cov[:units, units:], cov[units:, :units] = cross, cross.T
    return cov


def interval_of(measure, x: np.ndarray, y: np.ndarray, groups: int = IntervalConfig().groups) -> Calibrated:
    m = Moments([x.shape[1], y.shape[1]], groups=groups)
    m.update(torch.from_numpy(x), torch.from_numpy(y), group=0)
    return calibrate(measure, MomentViews(LayerStats(groups=m.compute_groups()), groups, 0), [(0, 1)])


@pytest.mark.parametrize("name", ["linear_cka", "max_match"])
def test_the_interval_covers_the_population_value(name):
    """200 probe sets of 400 samples from a known joint Gaussian: the 95 % jackknife interval (the
    default number of groups) covers the population value in at least 90 % of them (and is not vacuous: narrower than 0.3)."""
    units, rho, n = 6, 0.6, 400
    cov = population_pair(units, rho, seed=3)
    if name == "linear_cka":
        caa, cbb, cab = cov[:units, :units], cov[units:, units:], cov[:units, units:]
        population = float((cab**2).sum() / (np.linalg.norm(caa) * np.linalg.norm(cbb)))
        measure = linear_cka
    else:
        population = rho  # each unit's partner correlates rho; every other pair 0
        measure = max_match_score
    rng = np.random.default_rng(11)
    covered, widths = [], []
    for _ in range(200):
        z = rng.multivariate_normal(np.zeros(2 * units), cov, size=n)
        cal = interval_of(measure, z[:, :units], z[:, units:])
        assert cal.ci_lo <= cal.value <= cal.ci_hi
        covered.append(cal.ci_lo <= population <= cal.ci_hi)
        widths.append(cal.ci_hi - cal.ci_lo)
    assert np.mean(covered) >= 0.90, np.mean(covered)
    assert np.median(widths) < 0.3


def test_jackknife_interval_is_the_delete_a_group_formula():
    replicates = [0.50, 0.52, 0.47, 0.55, 0.49]
    lo, hi = jackknife_interval(0.5, replicates, level=0.9)
    g = len(replicates)
    se = np.sqrt((g - 1) / g * np.sum((np.array(replicates) - np.mean(replicates)) ** 2))
    t = scipy_stats.t.ppf(0.95, g - 1)
    assert (lo, hi) == pytest.approx((0.5 - t * se, 0.5 + t * se), rel=1e-12)
    assert jackknife_interval(0.3, [0.3]) == (0.3, 0.3)  # one group: no spread to estimate


def test_score_above_chance_is_zero_at_chance_and_one_when_perfect():
    at_chance = Calibrated({(0, 1): 0.2, (0, 2): 0.2}, 0.1, 0.3, null_draws=[0.18, 0.22])
    perfect = Calibrated({(0, 1): 1.0}, 1.0, 1.0, null_draws=[0.4])
    error = Calibrated({(0, 1): 0.25}, 0.2, 0.3, null_draws=[1.0, 1.0], perfect=0.0)  # lower is better
    assert at_chance.above_null == pytest.approx(0.0) and perfect.above_null == pytest.approx(1.0)
    assert error.above_null == pytest.approx(0.75)
    assert at_chance.pairs_sd == 0.0 and Calibrated({(0, 1): 0.1, (1, 2): 0.3}, 0, 1).pairs_sd == pytest.approx(
        np.std([0.1, 0.3], ddof=1)
    )
