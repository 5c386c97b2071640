"""All K members evaluated in one call (`ensemble.vectorize=true`): torch.func + vmap.

For small networks a Python loop over members launches K small kernels per layer and leaves the
GPU idle; here each layer runs once for all members (vmap turns a convolution with K stacked
weights into one grouped convolution, a linear layer into one batched matmul).

The members' own `nn.Parameter`s stay the trainable leaves: every call stacks them afresh
(`torch.stack`, differentiable), so the optimiser, gradient clipping, checkpoints and
`ensemble.members[i]` work exactly as with the loop, and member i's gradient equals the loop's.

    stacked = StackedMembers(ensemble.members)
    logits = stacked(ensemble.members, x)                       # [K, B, classes]; x: [B, ...]
    logits = stacked(ensemble.members, x, member_dim=1)         # x: [B, K, ...], one batch per member
    logits, taps = stacked(ensemble.members, x, taps=["conv1"]) # taps: [{layer: tensor}] per member

Equality with the loop: outputs and gradients agree to float rounding with dropout off or in eval
mode. With dropout in training mode every member still gets its own independent mask
(``randomness="different"``), but the masks are drawn differently from the loop's, so training is
statistically equivalent, not bitwise equal. Batch norm works: running statistics are stacked
with the parameters and, in training mode, written back to each member after the call.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call


def _structure(module: nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    named = list(module.named_parameters()) + list(module.named_buffers())
    return [(name, tuple(t.shape), t.dtype) for name, t in named]


class StackedMembers:
    """Evaluates K structurally identical members together with `torch.vmap`.

    Holds only a weightless ("meta") copy of the members' architecture; the weights are read from
    the members passed to each call, so it never goes stale when they are trained or moved."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        if len(members) == 0:
            raise ValueError("ensemble.vectorize needs at least one member")
        first = _structure(members[0])
        for i, member in enumerate(members[1:], start=1):
            if _structure(member) != first or type(member) is not type(members[0]):
                raise ValueError(f"ensemble.vectorize needs members of one architecture; member {i} differs from member 0")
        self._template: nn.Module | None = None

    def __getstate__(self) -> dict:
        return {"_template": None}  # rebuilt from the members on the next call

    def _get_template(self, members: Sequence[nn.Module]) -> nn.Module:
        if self._template is None:
            self._template = copy.deepcopy(members[0]).to("meta")
        return self._template

    def __call__(
        self,
        members: Sequence[nn.Module],
        x: Tensor,
        member_dim: int | None = None,
        taps: Iterable[str] | None = None,
    ):
        """Logits [K, B, ...] of every member, or ``(logits, [{layer: tap}] per member)``.

        `member_dim`: None when all members see the same `x`; otherwise the dimension of `x`
        that indexes the members (1 for the [B, K, ...] batches of data_order=independent)."""
        training = members[0].training
        if any(m.training != training for m in members):
            raise ValueError("ensemble.vectorize needs all members in the same train/eval mode")
        if member_dim is not None and x.shape[member_dim] != len(members):
            raise ValueError(
                f"input has {x.shape[member_dim]} entries along member_dim={member_dim}, but there are {len(members)} members"
            )
        template = self._get_template(members)
        template.train(training)

        param_names = [name for name, _ in members[0].named_parameters()]
        buffer_names = [name for name, _ in members[0].named_buffers()]
        member_params = [dict(m.named_parameters()) for m in members]
        member_buffers = [dict(m.named_buffers()) for m in members]
        params = {n: torch.stack([p[n] for p in member_params]) for n in param_names}
        with torch.no_grad():
            buffers = {n: torch.stack([b[n] for b in member_buffers]) for n in buffer_names}

        wanted = None if taps is None else list(taps)

        def one(p: dict, b: dict, xi: Tensor):
            if wanted is None:
                return functional_call(template, (p, b), (xi,))
            return functional_call(template, (p, b), (xi,), {"taps": wanted})

        out = torch.vmap(one, in_dims=(0, 0, member_dim), randomness="different")(params, buffers, x)

        if buffer_names and training:
            # Batch norm updated the stacked running statistics in place: hand them back.
            with torch.no_grad():
                for i, own in enumerate(member_buffers):
                    for n in buffer_names:
                        own[n].copy_(buffers[n][i])

        if wanted is None:
            return out
        logits, stacked_taps = out
        return logits, [{n: stacked_taps[n][i] for n in wanted} for i in range(len(members))]
