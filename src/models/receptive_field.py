"""Receptive fields of conv units, from the architecture's kernels, strides and padding.

A conv tap is taken after the ReLU and before pooling, so the field of layer convN covers
conv1..convN and the pools between them. LRN mixes channels only and batch norm is per channel:
neither widens the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from convergent.models.alexnet import CONV_LAYERS, POOL_KERNEL, POOL_STRIDE, AlexNet


@dataclass(frozen=True)
class ReceptiveField:
    size: int  # side of the field in input pixels (before clipping at the border)
    jump: int  # input pixels between neighbouring units
    start: int  # input coordinate of unit 0's field centre (can be negative with padding)

    def box(self, y: int, x: int, input_size: int) -> tuple[slice, slice]:
        """Input rows and columns seen by the unit at (y, x), clipped to the image."""
        half = (self.size - 1) // 2

        def span(c: int) -> slice:
            centre = self.start + c * self.jump
            return slice(max(0, centre - half), min(input_size, centre + half + 1))

        return span(y), span(x)


def receptive_field(model: AlexNet, layer: str) -> ReceptiveField:
    """Receptive field of one unit of conv `layer` (its post-ReLU tap)."""
    if layer not in CONV_LAYERS:
        raise ValueError(f"receptive fields are defined for conv layers {', '.join(CONV_LAYERS)}, not {layer!r}")
    size, jump, start = 1, 1, 0
    ops: list[tuple[int, int, int]] = []
    for name, spec in zip(CONV_LAYERS, model.convs):
        ops.append((spec.kernel, spec.stride, spec.padding))
        if name == layer:
            break
        if spec.pool:
            ops.append((POOL_KERNEL, POOL_STRIDE, 0))
    for kernel, stride, padding in ops:
        size += (kernel - 1) * jump
        start += ((kernel - 1) // 2 - padding) * jump
        jump *= stride
    return ReceptiveField(size, jump, start)
