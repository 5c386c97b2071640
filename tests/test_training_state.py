"""A checkpoint is "finished" (convergent.training_state) exactly when Lightning, resumed from it
under the same limits, trains no further step: the rule is checked against real Lightning fits."""

from __future__ import annotations

import pytest
import torch

from convergent.training_state import finished, limits
from tests.test_training import ensemble, synthetic, trainer


def fit_steps_after(ckpt, **limits_) -> int:
    """Optimizer steps a Lightning fit resumed from `ckpt` runs under these limits."""
    dm = synthetic(train_size=128)  # 4 steps per epoch
    t = trainer(limit_val_batches=0, **limits_)
    t.fit(ensemble(k=2), datamodule=dm, ckpt_path=str(ckpt), weights_only=True)
    return int(t.global_step) - int(torch.load(ckpt, weights_only=True)["global_step"])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """End-of-fit checkpoints: stopped by max_epochs (8 steps, 2 epochs) and by max_steps mid-epoch (6)."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("state")
    out = {}
    for name, lim in (("epochs", {"max_epochs": 2}), ("steps", {"max_steps": 6, "max_epochs": 5})):
        t = trainer(limit_val_batches=0, **lim)
        t.fit(ensemble(k=2), datamodule=synthetic(train_size=128))
        t.save_checkpoint(tmp / f"{name}.ckpt", weights_only=False)
        out[name] = tmp / f"{name}.ckpt"
    return out


@pytest.mark.parametrize(
    "name,lim",
    [
        ("epochs", {"max_epochs": 2}),
        ("epochs", {"max_epochs": 3}),
        ("epochs", {"max_epochs": 2, "max_steps": 20}),
        ("epochs", {"max_epochs": -1, "max_steps": 8}),
        ("epochs", {"max_epochs": -1, "max_steps": 10}),
        ("steps", {"max_steps": 6, "max_epochs": 5}),
        ("steps", {"max_steps": 7, "max_epochs": 5}),
        ("steps", {"max_steps": 10, "max_epochs": 2}),  # Lightning counts the cut epoch as processed
    ],
)  # finished: lim0, lim2, lim3, lim5, lim7; not: lim1, lim4, lim6
def test_finished_exactly_when_lightning_trains_no_further(checkpoints, name, lim):
    ckpt = checkpoints[name]
    said_finished = finished(torch.load(ckpt, weights_only=True), lim) is not None
    assert said_finished == (fit_steps_after(ckpt, **lim) == 0), (name, lim)


def test_limits_resolve_as_lightning_does():
    assert limits({"max_steps": -1, "max_epochs": None}) == (-1, 1000)
    assert limits({"max_steps": 50, "max_epochs": None}) == (50, -1)
    assert limits({"max_steps": None, "max_epochs": 3}) == (-1, 3)
    assert finished({"global_step": 10**6, "loops": {}}, {"max_time": "00:01:00:00", "max_steps": 5}) is None
