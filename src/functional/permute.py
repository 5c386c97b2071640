"""Permuting an AlexNet's hidden units without changing its function, and finding the permutation
that aligns one member with another (activation matching or Git Re-Basin's weight matching).

A permutation of layer L is a LongTensor `perm` over L's units: unit i of the permuted net is unit
perm[i] of the original. It moves together: the output channels (rows) of L's conv/linear weight
and bias, L's batch-norm weight, bias, running mean and running variance, L's LRN channel
positions, and the input channels (columns) of layer L+1's weight. conv5 -> fc6: fc6's inputs
are conv5's flattened [C, H, W] output, so every conv5 channel owns a block of H * W columns.
fc8 (the logits) is never permuted.

Grouped convolutions (groups=2 on conv2, conv4, conv5): a grouped layer's outputs see only their
group's inputs, so a permutation must map each group onto itself, both for the outputs of a
grouped layer and for the inputs of the layer after it (conv1..conv5 all, with groups=2).
`unit_blocks` says how many equal contiguous blocks each layer's permutation must respect; the
matchings solve one assignment per block (block-diagonal), so a permuted net stays grouped.

Internally a net is viewed as a dict of *dense* tensors (git-re-basin's PermutationSpec idea):
grouped weights expanded to their block-diagonal [out, in, kh, kw] form, fc6's weight as
[out, C_conv5, H * W], and `AXES` maps every tensor's axes to the layer permutation acting on it.

Pure torch (+ scipy's linear_sum_assignment): no Lightning, W&B or Hydra.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from convergent.analysis.matching import max_match
from convergent.models.alexnet import LAYERS, AlexNet, LocalResponseNorm
from convergent.stats.moments import Moments, MomentStats

HIDDEN = LAYERS[:-1]  # conv1..fc7: the layers with a permutation (fc8 is the logits)
ALIGN_METHODS = ("activation", "weight")


# --- the net's structure -----------------------------------------------------------------------
def stage(net: AlexNet, layer: str) -> nn.Module:
    return net.conv_stages[layer] if layer in net.conv_stages else net.fc_stages[layer]


def _linear(net: AlexNet, layer: str) -> nn.Conv2d | nn.Linear:
    return stage(net, layer).pre[0]


def _norm(net: AlexNet, layer: str) -> nn.Module | None:
    pre = stage(net, layer).pre
    return pre[1] if len(pre) > 1 and isinstance(pre[1], nn.modules.batchnorm._BatchNorm) else None


def _lrns(net: AlexNet, layer: str) -> list[LocalResponseNorm]:
    return [m for m in stage(net, layer).post if isinstance(m, LocalResponseNorm)]


def check_net(net) -> None:
    if not isinstance(net, AlexNet):
        raise TypeError(f"expected a convergent.models.AlexNet, got {type(net).__name__}")


def unit_blocks(net: AlexNet) -> dict[str, int]:
    """Number of equal contiguous blocks each layer's permutation must map onto themselves:
    the groups of the layer's own conv or of the next one (1 = unconstrained)."""
    check_net(net)
    blocks = {}
    for layer, nxt in zip(HIDDEN, LAYERS[1:]):
        own, after = _linear(net, layer), _linear(net, nxt)
        g = max(getattr(own, "groups", 1), getattr(after, "groups", 1))
        blocks[layer] = int(g)
    return blocks


def _dense_weight(m: nn.Conv2d | nn.Linear) -> Tensor:
    w = m.weight.detach()
    g = getattr(m, "groups", 1)
    if g == 1:
        return w.clone()
    out, in_g = w.shape[0], w.shape[1]
    o_g = out // g
    dense = w.new_zeros((out, in_g * g) + tuple(w.shape[2:]))
    for k in range(g):
        dense[k * o_g : (k + 1) * o_g, k * in_g : (k + 1) * in_g] = w[k * o_g : (k + 1) * o_g]
    return dense


def _grouped_weight(m: nn.Conv2d | nn.Linear, dense: Tensor) -> Tensor:
    g = getattr(m, "groups", 1)
    if g == 1:
        return dense
    out, in_g = m.weight.shape[0], m.weight.shape[1]
    o_g = out // g
    return torch.cat([dense[k * o_g : (k + 1) * o_g, k * in_g : (k + 1) * in_g] for k in range(g)])


def dense_tensors(net: AlexNet) -> dict[str, Tensor]:
    """The net's weights (dense), biases and batch-norm tensors, keyed "layer.name"."""
    check_net(net)
    out: dict[str, Tensor] = {}
    for layer in LAYERS:
        lin = _linear(net, layer)
        w = _dense_weight(lin)
        if layer == "fc6":  # [out, C * H * W] -> [out, C, H * W]: the channel axis is axis 1
            c5 = _linear(net, "conv5").out_channels
            w = w.reshape(w.shape[0], c5, -1)
        out[f"{layer}.weight"] = w
        if lin.bias is not None:
            out[f"{layer}.bias"] = lin.bias.detach().clone()
        bn = _norm(net, layer)
        if bn is not None:
            for name in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(bn, name)
                if t is not None:
                    out[f"{layer}.bn.{name}"] = t.detach().clone()
    return out


def axes(key: str) -> tuple[str | None, ...]:
    """The layer permutation acting on each axis of dense tensor `key` (None: no permutation)."""
    layer, name = key.split(".", 1)
    own = layer if layer in HIDDEN else None
    if name == "weight":
        i = LAYERS.index(layer)
        below = LAYERS[i - 1] if i > 0 else None
        return (own, below)  # trailing axes (kernel, positions) are never permuted
    return (own,)


def _take(t: Tensor, perm: Tensor, axis: int) -> Tensor:
    return torch.index_select(t, axis, perm.to(t.device))


def permuted_tensor(key: str, t: Tensor, perms: Mapping[str, Tensor], skip_axis: int | None = None) -> Tensor:
    for axis, layer in enumerate(axes(key)):
        if layer is not None and axis != skip_axis and layer in perms:
            t = _take(t, perms[layer], axis)
    return t


def _load_dense(net: AlexNet, dense: Mapping[str, Tensor]) -> None:
    with torch.no_grad():
        for layer in LAYERS:
            lin = _linear(net, layer)
            w = dense[f"{layer}.weight"]
            if layer == "fc6":
                w = w.reshape(w.shape[0], -1)
            lin.weight.copy_(_grouped_weight(lin, w))
            if lin.bias is not None:
                lin.bias.copy_(dense[f"{layer}.bias"])
            bn = _norm(net, layer)
            if bn is not None:
                for name in ("weight", "bias", "running_mean", "running_var"):
                    t = getattr(bn, name)
                    if t is not None:
                        t.copy_(dense[f"{layer}.bn.{name}"])


# --- permutations ------------------------------------------------------------------------------
def check_perms(net: AlexNet, perms: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Validated LongTensor permutations (missing layers: identity)."""
    blocks = unit_blocks(net)
    unknown = [k for k in perms if k not in HIDDEN]
    if unknown:
        raise ValueError(f"cannot permute layer {unknown[0]!r}; permutable layers: {', '.join(HIDDEN)} (fc8 is the logits)")
    out = {}
    for layer in HIDDEN:
        n = net.layer_width(layer)
        p = perms.get(layer)
        p = torch.arange(n) if p is None else torch.as_tensor(p).long().cpu()
        if p.shape != (n,) or not torch.equal(torch.sort(p).values, torch.arange(n)):
            raise ValueError(
                f"perms[{layer!r}] must be a permutation of 0..{n - 1} (layer width {n}), got shape {tuple(p.shape)}"
            )
        size = n // blocks[layer]
        if blocks[layer] > 1 and not torch.equal(p // size, torch.arange(n) // size):
            raise ValueError(
                f"perms[{layer!r}] moves units between the {blocks[layer]} channel groups; with grouped "
                f"convolutions each block of {size} units must map onto itself"
            )
        out[layer] = p
    return out


def permute(net: AlexNet, perms: Mapping[str, Tensor]) -> AlexNet:
    """A copy of `net` whose units are reordered by `perms` (layer -> LongTensor; unit i of the
    copy is unit perms[layer][i] of `net`): the same function, see the module docstring."""
    check_net(net)
    perms = check_perms(net, perms)
    out = copy.deepcopy(net)
    dense = {k: permuted_tensor(k, t, perms) for k, t in dense_tensors(net).items()}
    _load_dense(out, dense)
    for layer in HIDDEN:
        for lrn in _lrns(out, layer):
            lrn.reorder(perms[layer])
    return out


def random_perms(net: AlexNet, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Uniformly random permutations of every hidden layer (within blocks for grouped convs)."""
    perms = {}
    for layer, g in unit_blocks(net).items():
        n = net.layer_width(layer)
        size = n // g
        perms[layer] = torch.cat([k * size + torch.randperm(size, generator=generator) for k in range(g)])
    return perms


def inverse(perm: Tensor) -> Tensor:
    return torch.argsort(perm)


def assign(score: Tensor, blocks: int) -> Tensor:
    """Permutation maximising sum_i score[i, perm[i]] with perm mapping each of `blocks` equal
    contiguous blocks onto itself. Every row gets a partner (square blocks), dead units included."""
    n = score.shape[0]
    size = n // blocks
    s = score.detach().cpu().double()
    perm = torch.empty(n, dtype=torch.long)
    for k in range(blocks):
        lo, hi = k * size, (k + 1) * size
        idx, _ = max_match(s[lo:hi, lo:hi])
        perm[lo:hi] = idx + lo
    return perm


# --- activation matching -----------------------------------------------------------------------
def pair_corr(stats: MomentStats, pair: tuple[int, int], layer: str, widths: tuple[int, int]) -> Tensor:
    """corr(a, b) [C_a, C_b] of one layer from the caller's statistics, with clear errors."""
    ia, ib = pair
    if not isinstance(stats, MomentStats):
        raise TypeError(f"stats[{layer!r}] must be a MomentStats, got {type(stats).__name__}")
    for i, w in zip(pair, widths):
        if not 0 <= i < stats.k:
            raise ValueError(f"pair index {i} is out of range for stats[{layer!r}] of {stats.k} nets")
        if stats.sizes[i] != w:
            raise ValueError(
                f"stats[{layer!r}] has {stats.sizes[i]} units for net {i} but the member's layer has {w}; "
                "the statistics must cover every unit (no analysis.max_units subset), or pass stats=None"
            )
    if not stats.has_block(ia, ib):
        raise ValueError(f"stats[{layer!r}] has no joint moments of nets {pair}; keep that pair in Moments(pairs=...)")
    return stats.corr(ia, ib)


def collect_moments(
    net_a: AlexNet, net_b: AlexNet, images, layers: Iterable[str], product_dtype: torch.dtype = torch.float32
) -> dict[str, MomentStats]:
    """Moments of both nets' post-ReLU taps (nets 0 and 1) over `images` (a tensor or batches)."""
    layers = list(layers)
    device = next(net_a.parameters()).device
    acc = {
        l: Moments([net_a.layer_width(l), net_b.layer_width(l)], product_dtype=product_dtype, cka_sums=False).to(device)
        for l in layers
    }
    with torch.no_grad(), evaluating(net_a, net_b):
        for x in iter_images(images):
            x = x.to(device)
            _, ta = net_a(x, taps=layers)
            _, tb = net_b(x, taps=layers)
            for l in layers:
                acc[l].update(ta[l], tb[l])
    return {l: m.compute() for l, m in acc.items()}


def activation_perms(
    net_a: AlexNet,
    net_b: AlexNet,
    images=None,
    *,
    stats: Mapping[str, MomentStats] | None = None,
    pair: tuple[int, int] = (0, 1),
    corr: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Per hidden layer, the max (Hungarian) matching of b's units to a's by the correlation of
    their post-ReLU activations (within blocks for grouped convs): perm[i] = b's partner of a's
    unit i. The correlation comes from `corr[layer]` ([C_a, C_b]), else from `stats[layer]`
    (MomentStats with a and b at indices `pair`), else from one pass over `images`."""
    check_net(net_a), check_net(net_b)
    corr = dict(corr or {})
    stats = dict(stats or {})
    missing = [l for l in HIDDEN if l not in corr and l not in stats]
    if missing:
        if images is None:
            raise ValueError(f"activation matching needs the correlations of layers {missing}: pass images, stats or corr")
        stats.update(collect_moments(net_a, net_b, images, missing))  # nets 0 and 1
    fresh = set(missing)
    blocks = unit_blocks(net_a)
    perms = {}
    for layer in HIDDEN:
        widths = (net_a.layer_width(layer), net_b.layer_width(layer))
        if layer in corr:
            c = torch.as_tensor(corr[layer])
            if tuple(c.shape) != widths:
                raise ValueError(f"corr[{layer!r}] has shape {tuple(c.shape)}; expected {widths} (a's units x b's units)")
        else:
            c = pair_corr(stats[layer], (0, 1) if layer in fresh else pair, layer, widths)
        perms[layer] = assign(c, blocks[layer])
    return perms


# --- weight matching ---------------------------------------------------------------------------
def weight_perms(net_a: AlexNet, net_b: AlexNet, *, max_iter: int = 100, seed: int = 0) -> dict[str, Tensor]:
    """Git Re-Basin's weight matching (Ainsworth et al. 2023, Algorithm 1), data-free: starting
    from the identity, repeatedly visit the layers in a random order and set each layer's
    permutation to the assignment maximising sum <W_a, P W_b> over every parameter it touches
    (L's weight rows, bias and batch-norm weight/bias; L+1's weight columns, with the other
    permutations held fixed), until a full sweep changes nothing (or `max_iter` sweeps). Batch-norm
    running statistics are buffers, not parameters, and take no part (as in git-re-basin)."""
    check_net(net_a), check_net(net_b)
    da, db = dense_tensors(net_a), dense_tensors(net_b)
    if {k: v.shape for k, v in da.items()} != {k: v.shape for k, v in db.items()}:
        raise ValueError("weight matching needs two nets of the same architecture")
    params = [k for k in da if not k.endswith(("running_mean", "running_var"))]
    touching = {layer: [(k, ax) for k in params for ax, p in enumerate(axes(k)) if p == layer] for layer in HIDDEN}
    # a's side of every <W_a, P W_b> term, laid out [units, rest] once (float32 products: the
    # assignment only needs the ranking; the largest, fc7's, is a [C, C] x [C, C] product per visit)
    rows_a = {(k, ax): da[k].float().movedim(ax, 0).reshape(da[k].shape[ax], -1) for layer in HIDDEN for k, ax in touching[layer]}
    blocks = unit_blocks(net_a)
    perms = {layer: torch.arange(net_a.layer_width(layer)) for layer in HIDDEN}
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        progress = False
        for li in rng.permutation(len(HIDDEN)):
            layer = HIDDEN[li]
            n = len(perms[layer])
            score = torch.zeros(n, n)
            for key, ax in touching[layer]:
                wb = permuted_tensor(key, db[key], perms, skip_axis=ax).float().movedim(ax, 0).reshape(n, -1)
                score += (rows_a[(key, ax)] @ wb.T).cpu()
            new = assign(score, blocks[layer])
            score = score.double()
            rows = torch.arange(n)
            old_value, new_value = float(score[rows, perms[layer]].sum()), float(score[rows, new].sum())
            if new_value > old_value + 1e-6 * max(1.0, abs(old_value)):
                progress = True
                perms[layer] = new
        if not progress:
            break
    return perms


# --- the entry point ---------------------------------------------------------------------------
def align(
    net_a: AlexNet,
    net_b: AlexNet,
    images=None,
    method: str = "activation",
    *,
    stats: Mapping[str, MomentStats] | None = None,
    pair: tuple[int, int] = (0, 1),
    corr: Mapping[str, Tensor] | None = None,
    max_iter: int = 100,
    seed: int = 0,
) -> tuple[AlexNet, dict[str, Tensor]]:
    """``(aligned_b, perms)``: a copy of `net_b` with every hidden layer's units reordered to match
    `net_a`'s (the same function as `net_b`; `net_b` is not modified).

    method="activation": max matching of post-ReLU activation correlations over `images` (a
    tensor or an iterable of batches (x, ...)), or from precomputed `stats` (layer ->
    MomentStats, nets at indices `pair`) or `corr` (layer -> [C_a, C_b]): no data pass then.
    method="weight": Git Re-Basin's data-free weight matching (`weight_perms`)."""
    if method not in ALIGN_METHODS:
        raise ValueError(f"method must be one of {ALIGN_METHODS}, got {method!r}")
    if method == "weight":
        perms = weight_perms(net_a, net_b, max_iter=max_iter, seed=seed)
    else:
        perms = activation_perms(net_a, net_b, images, stats=stats, pair=pair, corr=corr)
    return permute(net_b, perms), perms


# --- helpers shared with the other modules -----------------------------------------------------
def iter_images(images) -> Iterable[Tensor]:
    """Input tensors from a tensor (one batch) or an iterable of tensors / batches (x, y, ...)."""
    if isinstance(images, Tensor):
        yield images
        return
    for batch in images:
        yield batch if isinstance(batch, Tensor) else batch[0]


class evaluating:
    """Eval mode inside the block; each net's previous mode restored afterwards."""

    def __init__(self, *nets: nn.Module) -> None:
        self.nets = nets

    def __enter__(self):
        self.modes = [n.training for n in self.nets]
        for n in self.nets:
            n.eval()

    def __exit__(self, *exc):
        for n, mode in zip(self.nets, self.modes):
            n.train(mode)
