"""convergent.functional on members trained like the default main job's (alexnet_small, width
0.25, dropout 0.5, LRN after the pool, MNIST5k), with its probe set (500 validation images in
batches of 250). Slow: two trainings of 600 steps (~1 min CPU) and the trained stitching map."""

from __future__ import annotations

import pytest
import torch

from convergent.data import MNIST5k
from convergent.functional import HIDDEN, align, evaluate_pair
from convergent.functional.permute import dense_tensors
from convergent.models import AlexNet
from tests.support import train_small_member

pytestmark = pytest.mark.slow


def train_member(seed: int, data: MNIST5k, steps: int = 600) -> AlexNet:
    """A member trained like the main job's model (SGD, momentum 0.9, batch 64) on MNIST5k."""
    return train_small_member(seed, data, steps, lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9), batch=64)


@pytest.fixture(scope="module")
def main_job_pair():
    torch.set_num_threads(1)
    data = MNIST5k()
    data.setup()
    a, b = train_member(0, data), train_member(1, data)
    return a, b, list(data.probe_dataloader(500, 250))


def l2(a, b) -> float:
    da, db = dense_tensors(a), dense_tensors(b)
    return float(sum((da[k].double() - db[k].double()).square().sum() for k in da).sqrt())


def test_main_job_members(main_job_pair):
    a, b, batches = main_job_pair
    r = evaluate_pair(a, b, batches, trained_steps=100)
    print("own accuracy", r.acc, "barriers", r.barrier, "midpoint accuracies", r.mid_acc)
    print("stitch", r.stitch_acc, "seconds", r.seconds)
    assert min(r.acc) > 0.8
    assert r.barrier["matched"] < r.barrier["naive"] and r.mid_acc["matched"] > r.mid_acc["naive"]
    assert r.barrier["repair"] < r.barrier["matched"]
    assert r.stitch_acc["conv1"]["perm"] > 0.3  # chance 0.1
    for layer in HIDDEN:
        assert r.stitch_acc[layer]["trained"] >= r.stitch_acc[layer]["lstsq"] - 0.02
    # the naive midpoint, independently: averaged state dicts through the module's own forward
    sa, sb = a.state_dict(), b.state_dict()
    mid = AlexNet.small(num_classes=10, in_channels=1, input_size=28, width=0.25, dropout=0.5, lrn="after_pool").eval()
    mid.load_state_dict({k: (sa[k] + sb[k]) / 2 if sa[k].is_floating_point() else sa[k] for k in sa})
    with torch.no_grad():
        correct = sum(int((mid(x).argmax(1) == y).sum()) for x, y, _ in batches)
    assert abs(r.mid_acc["naive"] - correct / 500) <= 1e-6
    before = l2(a, b)
    for method in ("activation", "weight"):
        after = l2(a, align(a, b, batches, method)[0])
        print(method, "L2", before, "->", after)
        assert after < before
