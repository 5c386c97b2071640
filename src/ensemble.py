"""K networks that differ only in their seed, trained side by side in one LightningModule.

Members stay independent: the loss is the plain sum of member losses (member i's gradient is
exactly what it would get alone), optimisers act per parameter, and gradient clipping is done per
member, never on a global norm across members.

Load member i of a trained checkpoint and read its taps:

    ens = Ensemble.load_from_checkpoint("run/checkpoints/last.ckpt", map_location="cpu")
    net = ens.members[i].eval()
    logits, taps = net(images, taps=["conv1", "fc6"])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from convergent.errors import ConfigError
from convergent.models import build_model
from convergent.vectorized import StackedMembers

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("none", "cosine", "step")


def warmup_steps(value) -> int:
    """optim.warmup_steps: a whole number of optimizer steps >= 0 (0 or 1: no warm-up)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"optim.warmup_steps={value!r} must be a whole number of steps >= 0 (0: no warm-up)")
    return value


def member_seeds(seed: int, k: int, seeds: Sequence[int] | None = None) -> list[int]:
    """Explicit seeds, or K seeds derived from the run's seed (seed*1000 + i)."""
    if seeds:
        if len(seeds) != k:
            raise ConfigError(f"ensemble.seeds has {len(seeds)} entries but ensemble.k={k}; give one seed per member")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"ensemble.seeds must differ between members, got {list(seeds)}")
        return [int(s) for s in seeds]
    return [int(seed) * 1000 + i for i in range(k)]


def build_member(model: dict, seed: int, num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """One member, its weights drawn from its own seed (the global RNG is restored afterwards)."""
    options = dict(model)
    name = options.pop("name")
    options.pop("input_size", None)
    options.pop("in_channels", None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(name, num_classes=num_classes, in_channels=in_channels, input_size=input_size, **options)


class Ensemble(pl.LightningModule):
    def __init__(
        self,
        model: dict,
        num_classes: int,
        in_channels: int,
        input_size: int,
        k: int = 4,
        seeds: Sequence[int] | None = None,
        seed: int = 0,
        data_order: str = "shared",
        optim: dict | None = None,
        clip_grad_norm: float | None = None,
        vectorize: bool = False,
    ) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"ensemble.k must be at least 1, got {k}")
        self.seeds = member_seeds(seed, k, seeds)
        self.save_hyperparameters()
        self.hparams["seeds"] = self.seeds  # the checkpoint records the resolved member seeds
        self.k = k
        self.data_order = data_order
        self.optim = dict(optim or {"name": "sgd", "lr": 0.01})
        warmup_steps(self.optim.get("warmup_steps", 0))  # a bad value fails before training starts
        self.clip_grad_norm = clip_grad_norm
        self.members = nn.ModuleList(build_member(model, s, num_classes, in_channels, input_size) for s in self.seeds)
        self.val_acc = nn.ModuleList(MulticlassAccuracy(num_classes, average="micro") for _ in range(k))
        self.val_loss = nn.ModuleList(MeanMetric() for _ in range(k))
        self.vectorize = bool(vectorize)
        # vectorize: all members in one vmapped call (convergent.vectorized); same results as the loop.
        self.stacked = StackedMembers(self.members) if self.vectorize else None

    # --- forward -----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> list[Tensor]:
        """Logits of every member for the same images."""
        return [m(x) for m in self.members]

    def member_inputs(self, x: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
        """`independent` batches carry one image set per member ([B, K, ...])."""
        if self.data_order == "independent" and self.training:
            return [(x[:, i], y[:, i]) for i in range(self.k)]
        return [(x, y)] * self.k

    def member_logits(self, x: Tensor) -> Tensor:
        """Logits of all members at once, [K, B, classes] (vectorize=true); `independent`
        training batches are [B, K, ...], one image set per member."""
        independent = self.data_order == "independent" and self.training
        return self.stacked(self.members, x, member_dim=1 if independent else None)

    def member_losses(self, batch) -> list[Tensor]:
        x, y = batch[0], batch[1]
        if self.vectorize:
            logits = self.member_logits(x)
            return [F.cross_entropy(logits[i], yi) for i, (_, yi) in enumerate(self.member_inputs(x, y))]
        return [F.cross_entropy(m(xi), yi) for m, (xi, yi) in zip(self.members, self.member_inputs(x, y))]

    # --- steps -------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> Tensor:
        losses = self.member_losses(batch)
        for i, loss in enumerate(losses):
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"member {i} has a non-finite loss ({loss.item()}) at step {self.global_step}; "
                    "lower optim.lr or enable ensemble.clip_grad_norm (the last good checkpoint is kept)"
                )
            self.log(f"member{i}/train/loss", loss, on_step=True, on_epoch=False)
        total = torch.stack(losses).sum()
        self.log("train/loss", total.detach() / self.k, on_step=True, on_epoch=False, prog_bar=True)
        return total

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        stacked = self.member_logits(x) if self.vectorize else None
        for i, member in enumerate(self.members):
            logits = stacked[i] if stacked is not None else member(x)
            self.val_loss[i].update(F.cross_entropy(logits, y, reduction="none"))
            self.val_acc[i].update(logits, y)

    def on_validation_epoch_end(self) -> None:
        losses = [m.compute() for m in self.val_loss]
        accs = [m.compute() for m in self.val_acc]
        for i, (loss, acc) in enumerate(zip(losses, accs)):
            self.log(f"member{i}/val/loss", loss)
            self.log(f"member{i}/val/acc", acc)
        self.log("val/loss", torch.stack(losses).mean(), prog_bar=True)
        self.log("val/acc", torch.stack(accs).mean(), prog_bar=True)
        for metric in (*self.val_loss, *self.val_acc):
            metric.reset()

    # --- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        cfg = dict(self.optim)
        name = cfg.pop("name", "sgd")
        schedule = cfg.pop("schedule", "none")
        step_size = cfg.pop("step_size", 30)
        gamma = cfg.pop("gamma", 0.1)
        warmup = warmup_steps(cfg.pop("warmup_steps", 0))
        cfg = {k: v for k, v in cfg.items() if v is not None}  # momentum: null for adam
        if name == "sgd":
            opt = torch.optim.SGD(self.parameters(), **cfg)
        elif name == "adam":
            opt = torch.optim.Adam(self.parameters(), **cfg)
        else:
            raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
        if schedule == "none":
            schedulers = []
        elif schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.estimated_stepping_batches))
            schedulers = [{"scheduler": sched, "interval": "step"}]
        elif schedule == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)
            schedulers = [{"scheduler": sched, "interval": "epoch"}]
        else:
            raise ValueError(f"unknown optim.schedule {schedule!r}; choose one of {SCHEDULES}")
        if warmup > 1:
            # Step t (from 0) runs at (t + 1) / warmup of the scheduled rate until t = warmup - 1.
            # LinearLR, CosineAnnealingLR (eta_min 0) and StepLR all scale the rate multiplicatively,
            # so the chained rate is the product of the warm-up factor and the schedule's.
            ramp = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup - 1)
            schedulers.append({"scheduler": ramp, "interval": "step"})
        if not schedulers:
            return opt
        return [opt], schedulers

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Per member: a global norm over all members would couple them.
        if self.clip_grad_norm:
            for member in self.members:
                torch.nn.utils.clip_grad_norm_(member.parameters(), self.clip_grad_norm)
