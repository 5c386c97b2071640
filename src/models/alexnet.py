"""AlexNet variants with named post-ReLU taps.

Both variants have the paper's topology and layer names: conv1..conv5, fc6, fc7, fc8.
Each layer is a `Stage`: ``pre`` (conv or linear, optional batch norm, ReLU) and ``post``
(LRN, max-pool, dropout). The tap of a layer is the output of ``pre``: the post-ReLU activation
before pooling, LRN and dropout (the paper's convention). fc8 has no ReLU: its tap is the logits.

    model = AlexNet.small(num_classes=10, in_channels=1, input_size=28)
    logits = model(x)
    logits, taps = model(x, taps=["conv1", "fc6"])   # taps["conv1"]: [N, C, H, W]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from convergent.errors import ConfigError

CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")
FC_LAYERS = ("fc6", "fc7", "fc8")
LAYERS = CONV_LAYERS + FC_LAYERS
LRN_CHOICES = ("none", "before_pool", "after_pool")
INIT_CHOICES = ("torch", "paper", "kaiming", "centred")
# Krizhevsky et al. (2012), section 5: weights N(0, 0.01^2); biases 1 in conv2, conv4, conv5 and the
# hidden fc layers ("to accelerate the early stages of learning by providing the ReLUs with positive
# inputs"), 0 in the others.
PAPER_WEIGHT_STD = 0.01
PAPER_BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7")


@dataclass(frozen=True)
class ConvSpec:
    """One conv layer: its width and geometry, and the max-pool that follows it (if any)."""

    out: int
    kernel: int
    stride: int = 1
    padding: int = 0
    grouped: bool = False  # split in `groups` when the net is built with groups=2
    pool: bool = False  # max-pool 3/2 after the ReLU
    lrn: bool = False  # local response normalisation (conv1, conv2)


# ImageNet AlexNet in Caffe's CaffeNet order (227 or 224 px input).
ALEXNET_CONVS = (
    ConvSpec(96, 11, stride=4, pool=True, lrn=True),
    ConvSpec(256, 5, padding=2, grouped=True, pool=True, lrn=True),
    ConvSpec(384, 3, padding=1),
    ConvSpec(384, 3, padding=1, grouped=True),
    ConvSpec(256, 3, padding=1, grouped=True, pool=True),
)
ALEXNET_FC = (4096, 4096)

# The same 5-conv / 3-fc topology for 28-64 px inputs: stride-1 conv1, narrower layers.
SMALL_CONVS = (
    ConvSpec(64, 5, padding=2, pool=True, lrn=True),
    ConvSpec(128, 5, padding=2, grouped=True, pool=True, lrn=True),
    ConvSpec(192, 3, padding=1),
    ConvSpec(192, 3, padding=1, grouped=True),
    ConvSpec(128, 3, padding=1, grouped=True, pool=True),
)
SMALL_FC = (512, 512)

POOL_KERNEL, POOL_STRIDE = 3, 2


def _scaled(width: int, multiplier: float, groups: int) -> int:
    """Width times the multiplier, at least `groups` and a multiple of it."""
    w = max(groups, int(round(width * multiplier)))
    return w - w % groups


def channel_window(sq: Tensor, size: int, position: Tensor | None = None) -> Tensor:
    """Sum of `sq` [N, C, H, W] over each channel's `size` neighbours (size // 2 before,
    (size - 1) // 2 after, fewer at the ends). Neighbours are taken in the order `position`
    (stored channel c sits at position[c]); None: the stored order."""
    if position is not None:
        order = torch.argsort(position)  # order[p]: the stored channel at position p
        return channel_window(sq[:, order], size)[:, position]
    channels = sq.shape[1]
    sq = nn.functional.pad(sq.unsqueeze(1), (0, 0, 0, 0, size // 2, (size - 1) // 2)).squeeze(1)
    return sum(sq[:, d : d + channels] for d in range(size))


class LocalResponseNorm(nn.Module):
    """Cross-channel LRN, the same function as `torch.nn.LocalResponseNorm` (and Caffe's):
    x / (k + alpha / size * sum of x^2 over `size` neighbouring channels) ** beta.

    Written as a sum of shifted slices because torch's version (avg_pool3d on a 5-D view) is
    several times slower than the convolutions around it on the CPU.

    "Neighbouring" depends on the channel order, so the order is state: buffer `position` holds
    the original index of every stored channel. Permuting a net's units (convergent.functional)
    permutes it with the channels (`reorder`) and the net computes the same function; in the
    original order (`in_order`) the window is the plain shifted-slice sum, no gather.

    The buffer is persistent: a saved permuted net must come back permuted (a non-persistent
    buffer would reload as the identity and silently change the function). State dicts saved
    before it existed (module version 1) load as the stored order, see `_load_from_state_dict`."""

    _version = 2  # 2: the `position` buffer

    def __init__(self, channels: int, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k
        self.register_buffer("position", torch.arange(channels))
        self.in_order = True  # position is 0..C-1 (a Python flag: no tensor test in forward, vmap-safe)

    def reorder(self, perm: Tensor) -> None:
        """Stored channel c becomes the old stored channel perm[c] (with its position)."""
        self.position = self.position[perm.to(self.position.device)]
        self.in_order = bool(torch.equal(self.position, torch.arange(len(self.position), device=self.position.device)))

    def forward(self, x: Tensor) -> Tensor:
        window = channel_window(x * x, self.size, None if self.in_order else self.position)
        return x / (self.k + (self.alpha / self.size) * window).pow(self.beta)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "position"
        version = local_metadata.get("version")
        if (version is None or version < 2) and key not in state_dict:  # saved before the buffer: stored order
            state_dict[key] = torch.arange(len(self.position))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if key in state_dict and not state_dict[key].is_meta:
            loaded = state_dict[key].cpu()
            self.in_order = bool(torch.equal(loaded, torch.arange(len(loaded))))


class Stage(nn.Module):
    """``pre`` produces the tap (post-ReLU), ``post`` the input of the next stage."""

    def __init__(self, pre: nn.Sequential, post: nn.Sequential) -> None:
        super().__init__()
        self.pre = pre
        self.post = post

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        tap = self.pre(x)
        return tap, self.post(tap)


class AlexNet(nn.Module):
    """An AlexNet variant; build with `AlexNet.imagenet(...)` or `AlexNet.small(...)`."""

    def __init__(
        self,
        convs: Sequence[ConvSpec],
        fc: Sequence[int],
        num_classes: int,
        in_channels: int = 3,
        input_size: int = 227,
        width: float = 1.0,
        groups: int = 1,
        lrn: str = "after_pool",
        dropout: float = 0.5,
        batch_norm: bool = False,
        init: str = "torch",
    ) -> None:
        super().__init__()
        if groups not in (1, 2):
            raise ValueError(f"groups must be 1 or 2 (the original two-GPU split), got {groups}")
        if lrn not in LRN_CHOICES:
            raise ValueError(f"lrn must be one of {LRN_CHOICES}, got {lrn!r}")
        if width <= 0:
            raise ValueError(f"width multiplier must be positive, got {width}")
        if init not in INIT_CHOICES:
            raise ValueError(f"init must be one of {INIT_CHOICES}, got {init!r}")
        self.convs = tuple(convs)
        self.input_size = int(input_size)
        self.in_channels = int(in_channels)
        stages: dict[str, Stage] = {}
        channels = in_channels
        for name, spec in zip(CONV_LAYERS, self.convs):
            g = groups if spec.grouped else 1
            out = _scaled(spec.out, width, groups)  # every conv width divides into the groups
            pre = [nn.Conv2d(channels, out, spec.kernel, spec.stride, spec.padding, groups=g)]
            if batch_norm:
                pre.append(nn.BatchNorm2d(out))
            pre.append(nn.ReLU())
            post: list[nn.Module] = []
            norm = [LocalResponseNorm(out, 5, alpha=1e-4, beta=0.75, k=1.0)] if spec.lrn else []
            if lrn == "before_pool":
                post += norm
            if spec.pool:
                post.append(nn.MaxPool2d(POOL_KERNEL, POOL_STRIDE))
            if lrn == "after_pool":
                post += norm
            stages[name] = Stage(nn.Sequential(*pre), nn.Sequential(*post))
            channels = out
        self.conv_stages = nn.ModuleDict(stages)
        flat = self._flat_features(channels)
        fc_stages: dict[str, Stage] = {}
        features = flat
        for name, units in zip(FC_LAYERS[:2], fc):
            out = _scaled(units, width, 1)
            pre = [nn.Linear(features, out)]
            if batch_norm:
                pre.append(nn.BatchNorm1d(out))
            pre.append(nn.ReLU())
            post = [nn.Dropout(dropout)] if dropout > 0 else []
            fc_stages[name] = Stage(nn.Sequential(*pre), nn.Sequential(*post))
            features = out
        fc_stages["fc8"] = Stage(nn.Sequential(nn.Linear(features, num_classes)), nn.Sequential())
        self.fc_stages = nn.ModuleDict(fc_stages)
        initialize(self, init)

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def imagenet(cls, num_classes: int = 1000, **options) -> AlexNet:
        options.setdefault("input_size", 227)
        return cls(ALEXNET_CONVS, ALEXNET_FC, num_classes, **options)

    @classmethod
    def small(cls, num_classes: int = 10, **options) -> AlexNet:
        options.setdefault("input_size", 28)
        options.setdefault("in_channels", 1)
        return cls(SMALL_CONVS, SMALL_FC, num_classes, **options)

    def _flat_features(self, channels: int) -> int:
        side = self.input_size
        for spec in self.convs:
            side = (side + 2 * spec.padding - spec.kernel) // spec.stride + 1
            if spec.pool:
                side = (side - POOL_KERNEL) // POOL_STRIDE + 1
            if side < 1:
                raise ConfigError(
                    f"input size {self.input_size} px is too small for this model: the feature map "
                    "vanishes before fc6; use larger images (data.crop / data.input_size) or model=alexnet_small"
                )
        return channels * side * side

    # --- introspection -----------------------------------------------------------------------
    @property
    def layer_names(self) -> tuple[str, ...]:
        return LAYERS

    def layer_width(self, name: str) -> int:
        """Number of units (channels for conv layers) of a named layer."""
        self._check_layers([name])
        if name in self.conv_stages:
            return self.conv_stages[name].pre[0].out_channels
        return self.fc_stages[name].pre[0].out_features

    def _check_layers(self, names: Iterable[str]) -> None:
        unknown = [n for n in names if n not in LAYERS]
        if unknown:
            raise ValueError(f"unknown layer {unknown[0]!r}; valid layers: {', '.join(LAYERS)}")

    # --- forward -----------------------------------------------------------------------------
    def forward(self, x: Tensor, taps: Iterable[str] | None = None):
        """Logits, or ``(logits, {layer: post-ReLU activation})`` when `taps` is given."""
        wanted = None if taps is None else list(taps)
        if wanted is not None:
            self._check_layers(wanted)
        collected: dict[str, Tensor] = {}
        for name, stage in self.conv_stages.items():
            tap, x = stage(x)
            if wanted is not None and name in wanted:
                collected[name] = tap
        x = torch.flatten(x, 1)
        for name, stage in self.fc_stages.items():
            tap, x = stage(x)
            if wanted is not None and name in wanted:
                collected[name] = tap
        if wanted is None:
            return x
        return x, {name: collected[name] for name in wanted}


def weight_layers(model: AlexNet) -> dict[str, nn.Conv2d | nn.Linear]:
    """The conv or linear layer of every stage, by layer name (conv1..fc8)."""
    stages = {**model.conv_stages, **model.fc_stages}
    return {name: stage.pre[0] for name, stage in stages.items()}


def initialize(model: AlexNet, init: str) -> None:
    """Redraw every conv/linear layer's weights and biases by the scheme `init`, from the global RNG
    (a member seeds it: the same seed gives the same weights).

    torch:   PyTorch's layer defaults, left as built (weights and biases U(+-1/sqrt(fan_in)) in effect).
    paper:   Krizhevsky et al. (2012): weights N(0, 0.01^2), biases 1 in conv2/conv4/conv5/fc6/fc7, 0 elsewhere.
    kaiming: He et al. (2015) normal weights, std sqrt(2 / fan_in) (fc8, no ReLU: sqrt(1 / fan_in)), biases 0.
    centred: kaiming, then each unit's incoming weights shifted to mean 0 (rescaled by sqrt(n / (n - 1)),
             n = fan_in, so the std stays the same), biases 0. Post-ReLU inputs share a large positive
             mean over all images; a unit whose weights do not sum to ~0 takes its sign from that mean
             on every image and may never fire (about 27 % of fc6 at step 0 with `kaiming` on mnist5k).
    """
    if init == "torch":
        return
    for name, layer in weight_layers(model).items():
        weight = layer.weight.data
        if init == "paper":
            nn.init.normal_(weight, 0.0, PAPER_WEIGHT_STD)
            nn.init.constant_(layer.bias, 1.0 if name in PAPER_BIAS_ONE else 0.0)
            continue
        nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="linear" if name == "fc8" else "relu")
        if init == "centred":
            rows = weight.view(weight.shape[0], -1)  # [units, fan_in] (a grouped conv: its group's inputs)
            rows.sub_(rows.mean(1, keepdim=True)).mul_((rows.shape[1] / (rows.shape[1] - 1)) ** 0.5)
        nn.init.zeros_(layer.bias)


def build_model(name: str, num_classes: int, in_channels: int, input_size: int, **options) -> AlexNet:
    """Build a variant by its config name (`alexnet` or `alexnet_small`)."""
    builders = {"alexnet": AlexNet.imagenet, "alexnet_small": AlexNet.small}
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(builders)}")
    return builders[name](num_classes=num_classes, in_channels=in_channels, input_size=input_size, **options)
