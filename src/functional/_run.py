"""Running (parts of) an AlexNet layer by layer over a whole probe set.

The functional analyses evaluate many variants of two nets (interpolations, REPAIR, stitched
halves) on the same few probe batches. Running them one layer at a time over all batches lets a
layer's statistics over the whole probe set correct that layer before the next one runs (REPAIR),
lets a stitched net start at any layer, and lets conv1's output of an interpolated net be
interpolated from the endpoints' (conv1 is linear in its weights) instead of recomputed.
Peak memory: about three of one layer's activation maps over the probe set.

Copies of the nets run in channels_last memory format: on the CPU max-pooling a [N, C, H, W]
contiguous map is several times slower than in channels_last (the same values to rounding).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convergent.functional.permute import stage
from convergent.models.alexnet import LAYERS, AlexNet

Affine = tuple[Tensor, Tensor]  # per-channel (scale, shift) applied to a pre-ReLU activation


@dataclass
class Probe:
    """The probe batches, materialised once (inputs in channels_last, labels)."""

    xs: list[Tensor]
    ys: list[Tensor]

    @property
    def n(self) -> int:
        return sum(len(y) for y in self.ys)


def as_probe(batches: Iterable, device: torch.device) -> Probe:
    xs, ys = [], []
    for batch in batches:
        if isinstance(batch, Tensor) or len(batch) < 2:
            raise ValueError("probe batches must be (x, y, ...) with labels y; got a batch without labels")
        x, y = batch[0], batch[1]
        if len(x) == 0:
            continue
        x = x.to(device=device, dtype=torch.float32)
        xs.append(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)
        ys.append(torch.as_tensor(y).to(device=device, dtype=torch.long))
    if not xs:
        raise ValueError("no probe images: pass a non-empty iterable of batches (x, y, ...)")
    return Probe(xs, ys)


def working_copy(net: AlexNet) -> AlexNet:
    """A private eval-mode, float32, channels_last copy (the caller's net keeps its mode, dtype and
    layout: a bf16/fp16 member is evaluated in float32, like the probe images)."""
    import copy

    out = copy.deepcopy(net).eval().float()
    for p in out.parameters():
        p.requires_grad_(False)
    return out.to(memory_format=torch.channels_last)


def channels_last(v: Tensor) -> Tensor:
    """4-D maps in channels_last (a no-op when they are): a map in the other layout sends every
    following pool and elementwise op down a slow strided path (5-20x on the CPU)."""
    return v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v


def split_pre(st: nn.Module) -> tuple[nn.Module, list[nn.Module], bool]:
    """(conv/linear, modules between it and the ReLU (batch norm), has_relu)."""
    pre = list(st.pre)
    has_relu = isinstance(pre[-1], nn.ReLU)
    return pre[0], pre[1:-1] if has_relu else pre[1:], has_relu


@dataclass
class Step:
    """One layer of a layer-wise pass, every list one tensor per batch: the conv/linear output z,
    the pre-ReLU activation u (after batch norm and any correction) and the post-ReLU tap h.
    The last step is fc8: ``u`` holds the logits, ``z`` and ``h`` are None."""

    layer: str
    z: list[Tensor] | None
    u: list[Tensor]
    h: list[Tensor] | None


def layer_steps(
    net: AlexNet,
    xs: list[Tensor],
    *,
    start: str | None = None,
    conv1_z: list[Tensor] | None = None,
    correct: Callable[[str, list[Tensor]], Affine | None] | None = None,
    keep_pre: bool = True,
) -> Iterator[Step]:
    """Run `net` one layer at a time over all batches, yielding every hidden layer's `Step` and
    finally the logits (two nets can be advanced in lockstep with zip).

    start: begin with layer `start`'s ``post`` (pool / LRN / dropout), `xs` being that layer's
      post-ReLU activations (the upper part of a stitched net); None: `xs` are images.
    conv1_z: conv1's linear output per batch, used instead of running conv1.
    correct(layer, u): a per-channel (scale, shift) for the pre-ReLU activations u over the whole
      probe set (REPAIR), or None.
    keep_pre: False when only the logits are wanted: the ReLUs may overwrite the pre-activations
      and run after a following max-pool, so the Steps' z, u and h are not meaningful."""
    x = xs
    names = list(LAYERS)
    if start is not None:
        i = names.index(start)
        x = [stage(net, start).post(channels_last(h)) for h in xs]
        names = names[i + 1 :]
    for name in names:
        st = stage(net, name)
        if name == "fc6":
            x = [torch.flatten(v, 1) for v in x]
        lin, norms, has_relu = split_pre(st)
        if name == "conv1" and conv1_z is not None:
            conv1_z = z = [channels_last(v) for v in conv1_z]
        else:  # (a 1-channel input counts as contiguous, so conv1 returns the other layout)
            z = [channels_last(lin(v)) for v in x]
        x = []  # the input is no longer needed: free it before the next maps are made
        u = z
        for m in norms:
            u = [m(v) for v in u]
        if not has_relu:
            yield Step(name, None, u, None)
            return
        coef = correct(name, u) if correct is not None else None
        post = list(st.post)
        if not keep_pre and post and isinstance(post[0], nn.MaxPool2d) and (coef is None or bool((coef[0] >= 0).all())):
            # only the logits are wanted: max-pool first, then the correction and the ReLU on 4x
            # fewer values (max commutes with every non-decreasing per-channel map)
            yield Step(name, None, [], None)
            pooled = [post[0](v) for v in u]
            if coef is not None:
                pooled = [torch.addcmul(coef[1], v, coef[0]) for v in pooled]
            pooled = [v.relu_() for v in pooled]
            del z, u
            x = [nn.Sequential(*post[1:])(v) for v in pooled] if len(post) > 1 else pooled
            continue
        if coef is not None:
            u = [torch.addcmul(coef[1], v, coef[0]) for v in u]
        in_place = not keep_pre and u is not conv1_z  # never overwrite the caller's tensors
        h = [v.relu_() for v in u] if in_place else [F.relu(v) for v in u]
        yield Step(name, z, u, h)
        del z, u
        x = [st.post(v) for v in h]
        del h


def forward_layerwise(net: AlexNet, xs: list[Tensor], **options) -> list[Tensor]:
    """The logits (one tensor per batch) of a `layer_steps` pass (same options; the ReLUs work
    in place unless keep_pre=True)."""
    options.setdefault("keep_pre", False)
    *_, last = layer_steps(net, xs, **options)  # run every layer; the last step holds the logits
    return last.u


def channel_shape(v: Tensor) -> tuple[int, ...]:
    """[C] -> broadcastable over v's channel axis ([1, C, 1, 1] or [1, C])."""
    return (1, v.shape[1]) + (1,) * (v.dim() - 2)


def _samples(v: Tensor) -> Tensor:
    """[N, C] or [N, C, H, W] -> [samples, C] (a view for channels_last maps)."""
    return v if v.dim() == 2 else v.movedim(1, -1).reshape(-1, v.shape[1])


# Rows summed by one float32 product before the partial sums are added in float64 (a long float32
# product accumulates sequentially: over 200k rows it loses ~4 digits).
SUM_ROWS = 2048
# Channels whose squared mean exceeds this multiple of their variance are recomputed exactly in
# float64 (sum x^2 - n mean^2 cancels there); for the others the float32 products keep the mean
# and the variance to ~1e-5 of the std / variance.
ILL_CONDITIONED = 10.0


def _sums(r: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of rows, diagonal of r^T r) of r [n, C], float64, from float32 products of SUM_ROWS rows."""
    n, c = r.shape
    k, rest = divmod(n, SUM_ROWS)
    total, squares = r.new_zeros(c, dtype=torch.float64), r.new_zeros(c, dtype=torch.float64)
    if k:
        blocks = r[: k * SUM_ROWS].view(k, SUM_ROWS, c)
        total += torch.bmm(r.new_ones(k, 1, SUM_ROWS), blocks).double().sum((0, 1))
        squares += torch.diagonal(torch.bmm(blocks.transpose(1, 2), blocks), dim1=1, dim2=2).double().sum(0)
    if rest:
        tail = r[k * SUM_ROWS :]
        total += tail.sum(0).double()
        squares += torch.diagonal(tail.T @ tail).double()
    return total, squares


def channel_mean_var(vs: list[Tensor]) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean and population variance (float64) over every sample and position of the
    batches `vs` ([N, C] or [N, C, H, W]): blocked products with a ones vector and the Gram
    diagonal (no temporaries; torch.var_mean's Welford reduction is ~5x slower on the CPU),
    recomputed in float64 for the channels whose mean dwarfs their spread."""
    rows = [_samples(v) for v in vs]
    n = sum(r.shape[0] for r in rows)
    parts = [_sums(r) for r in rows]
    mean = sum(p[0] for p in parts) / n
    var = (sum(p[1] for p in parts) / n - mean.square()).clamp_min(0.0)
    bad = (mean.square() > ILL_CONDITIONED * var).nonzero().squeeze(1)
    if bad.numel():
        cols = [r[:, bad].double() for r in rows]
        exact_mean = sum(c.sum(0) for c in cols) / n
        exact_var = sum((c - exact_mean).square().sum(0) for c in cols) / n
        mean, var = mean.index_copy(0, bad, exact_mean), var.index_copy(0, bad, exact_var)
    return mean, var, n


def score(logits: list[Tensor], ys: list[Tensor]) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over all images, summed in float64."""
    loss, correct, n = 0.0, 0, 0
    for out, y in zip(logits, ys):
        loss += float(F.cross_entropy(out.double(), y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        n += len(y)
    if not math.isfinite(loss):
        loss = float("inf")
    return loss / n, correct / n
