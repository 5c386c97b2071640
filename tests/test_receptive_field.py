"""receptive_field() against the networks themselves, by perturbing input pixels.

For a unit of conv layer L at (y, x) and its computed box:
  * changing every pixel OUTSIDE the box leaves the whole activation vector at (y, x) unchanged
    (float64 models: bit-identical arithmetic, so compared to 1e-9);
  * changing the pixels INSIDE the box changes the activation of a channel that is positive there
    (so the ReLU does not hide the change);
  * tightness: for a unit whose field lies fully inside the image, changing only the first row,
    the last row, the first column or the last column of the box (each alone) changes some
    channel at (y, x). So the field is not too big on any side. The perturbation is large (values
    ~ +-20) so that it wins the max-pools between the border pixel and the unit.
"""

from __future__ import annotations

import pytest
import torch

from convergent.models.alexnet import CONV_LAYERS, AlexNet
from convergent.models.receptive_field import ReceptiveField, receptive_field

UNCHANGED = 1e-9  # float64: an activation that does not depend on a pixel is bit-identical
CHANGED = 1e-7

# Layer widths do not enter the geometry (receptive_field reads kernels, strides, padding and
# pools only), so the ImageNet nets are built narrower to keep the float64 forwards fast.
CONFIGS = [
    # (builder, input size, options)
    ("imagenet", 227, {"width": 0.25}),
    ("imagenet", 224, {"groups": 2, "lrn": "before_pool", "width": 0.25}),
    ("small", 28, {}),
    ("small", 28, {"lrn": "before_pool", "batch_norm": True}),
    ("small", 64, {"groups": 2, "lrn": "none", "batch_norm": True}),
    ("small", 64, {"lrn": "after_pool", "groups": 2, "width": 0.5}),
]


def _model(builder: str, size: int, options: dict) -> AlexNet:
    torch.manual_seed(0)
    model = getattr(AlexNet, builder)(input_size=size, **options).double().eval()
    with torch.no_grad():  # non-trivial eval-mode batch norm
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model


def _tap(model: AlexNet, x: torch.Tensor, layer: str) -> torch.Tensor:
    """The post-ReLU tap of `layer`, running only the conv stages up to it (cheaper than
    model(x, taps=...), checked equal to it below)."""
    for name, stage in model.conv_stages.items():
        tap, x = stage(x)
        if name == layer:
            return tap
    raise KeyError(layer)


def _positions(field: ReceptiveField, h: int, w: int, size: int) -> tuple[list[tuple[int, int]], tuple[int, int] | None]:
    """Test positions (centre and two opposite corners) and a position whose field is fully
    inside the image (nearest the centre; None when no field fits)."""
    half = (field.size - 1) // 2

    def inside(c: int) -> bool:
        centre = field.start + c * field.jump
        return centre - half >= 0 and centre + half < size

    positions = [(h // 2, w // 2), (0, 0), (h - 1, w - 1)]
    rows = [y for y in range(h) if inside(y)]
    cols = [x for x in range(w) if inside(x)]
    full = None
    if rows and cols:
        full = (min(rows, key=lambda y: abs(y - h // 2)), min(cols, key=lambda x: abs(x - w // 2)))
    return list(dict.fromkeys(positions)), full


@pytest.mark.parametrize("builder, size, options", CONFIGS, ids=[f"{b}{s}-{o}" for b, s, o in CONFIGS])
def test_field_contains_exactly_the_pixels_a_unit_depends_on(builder, size, options):
    model = _model(builder, size, options)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, model.in_channels, size, size, generator=g, dtype=torch.float64)
    with torch.no_grad():
        _, taps = model(x, taps=list(CONV_LAYERS))
        assert torch.equal(_tap(model, x, "conv5"), taps["conv5"])
    tight_tested = []
    for layer in CONV_LAYERS:
        field = receptive_field(model, layer)
        base = taps[layer][0]
        _, h, w = base.shape
        positions, full = _positions(field, h, w, size)
        checks = []  # (kind, position, channel, perturbed input)
        for y, xx in positions:
            rows, cols = field.box(y, xx, size)
            outside = torch.ones(size, size, dtype=torch.bool)
            outside[rows, cols] = False
            if outside.any():
                checks.append(("outside", (y, xx), torch.where(outside, 5 * torch.randn(x.shape, generator=g, dtype=x.dtype), x)))
            if (y, xx) == full:
                continue  # its four line checks below show that the inside matters
            inside = ~outside
            checks.append(("inside", (y, xx), torch.where(inside, 5 * torch.randn(x.shape, generator=g, dtype=x.dtype), x)))
        if full is not None:
            rows, cols = field.box(*full, size)
            assert rows.stop - rows.start == field.size and cols.stop - cols.start == field.size
            for side, (r, c) in {
                "top": (slice(rows.start, rows.start + 1), cols),
                "bottom": (slice(rows.stop - 1, rows.stop), cols),
                "left": (rows, slice(cols.start, cols.start + 1)),
                "right": (rows, slice(cols.stop - 1, cols.stop)),
            }.items():
                line = torch.zeros(size, size, dtype=torch.bool)
                line[r, c] = True
                noise = 20 * torch.randn(x.shape, generator=g, dtype=x.dtype).sign()
                checks.append((side, full, torch.where(line, noise, x)))
            tight_tested.append(layer)
        with torch.no_grad():
            out = _tap(model, torch.cat([c[2] for c in checks]), layer)
        for (kind, (y, xx), _), act in zip(checks, out):
            before, after = base[:, y, xx], act[:, y, xx]
            diff = (after - before).abs()
            where = f"{layer} unit at {(y, xx)}, field {field}, box {field.box(y, xx, size)}"
            if kind == "outside":
                assert diff.max() <= UNCHANGED, f"pixels outside the field changed {where}"
            elif kind == "inside":
                channel = int(before.argmax())
                assert before[channel] > 0, f"no positive channel at {where}"
                assert diff[channel] > CHANGED, f"pixels inside the field do not matter {where}"
            else:
                assert diff.max() > CHANGED, f"{kind} line of the box does not matter: field too big, {where}"
    # Tightness is tested wherever a unit's field fits in the image: every layer but conv3-5 of
    # the 28 px net, whose fields (27 to 43 px) never fit in it.
    assert tight_tested == (list(CONV_LAYERS) if size >= 64 else ["conv1", "conv2"])


def test_known_fields():
    """The classic AlexNet fields (Caffe order), and the small net's."""
    big = AlexNet.imagenet()
    assert [receptive_field(big, l) for l in CONV_LAYERS] == [
        ReceptiveField(11, 4, 5),
        ReceptiveField(51, 8, 9),
        ReceptiveField(99, 16, 17),
        ReceptiveField(131, 16, 17),
        ReceptiveField(163, 16, 17),
    ]
    small = AlexNet.small()
    assert [receptive_field(small, l).size for l in CONV_LAYERS] == [5, 15, 27, 35, 43]
    assert receptive_field(small, "conv1").box(0, 0, 28) == (slice(0, 3), slice(0, 3))
    with pytest.raises(ValueError):
        receptive_field(small, "fc6")
