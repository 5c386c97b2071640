"""Every AlexNet variant: output and tap shapes (expected shapes from conv arithmetic written out
here, not read from the model), taps are the post-ReLU pre-pool activations, clear errors."""

import pytest
import torch
import torch.nn.functional as F

from convergent.models import LAYERS, AlexNet, build_model

# The two topologies as the paper and design describe them: (out channels, kernel, stride, padding,
# grouped with groups=2, followed by a 3/2 max-pool). Written independently of the model's specs.
IMAGENET = [
    (96, 11, 4, 0, False, True),
    (256, 5, 1, 2, True, True),
    (384, 3, 1, 1, False, False),
    (384, 3, 1, 1, True, False),
    (256, 3, 1, 1, True, True),
]
IMAGENET_FC = 4096
SMALL = [
    (64, 5, 1, 2, False, True),
    (128, 5, 1, 2, True, True),
    (192, 3, 1, 1, False, False),
    (192, 3, 1, 1, True, False),
    (128, 3, 1, 1, True, True),
]
SMALL_FC = 512
CONVS = ["conv1", "conv2", "conv3", "conv4", "conv5"]


pytestmark = pytest.mark.usefixtures("one_thread")


def out_side(n: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (n + 2 * padding - kernel) // stride + 1


def scaled(width: int, multiplier: float, groups: int) -> int:
    w = max(groups, int(round(width * multiplier)))
    return w - w % groups


def expected_taps(arch, fc: int, size: int, width: float, groups: int, num_classes: int) -> dict[str, tuple]:
    shapes, side = {}, size
    for name, (out, k, s, p, _grouped, pool) in zip(CONVS, arch):
        side = out_side(side, k, s, p)
        shapes[name] = (scaled(out, width, groups), side, side)
        if pool:
            side = out_side(side, 3, 2)
    shapes["fc6"] = shapes["fc7"] = (scaled(fc, width, 1),)
    shapes["fc8"] = (num_classes,)
    return shapes


def check_variant(
    name: str,
    arch,
    fc: int,
    size: int,
    in_channels: int,
    width: float = 1.0,
    groups: int = 1,
    lrn: str = "after_pool",
    batch_norm: bool = False,
):
    num_classes = 7
    torch.manual_seed(0)
    model = build_model(
        name,
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=size,
        width=width,
        groups=groups,
        lrn=lrn,
        batch_norm=batch_norm,
    )
    model.eval()
    x = torch.randn(2 if size < 100 else 1, in_channels, size, size)
    with torch.no_grad():
        logits = model(x)
        logits2, taps = model(x, taps=list(LAYERS))
    assert logits.shape == (len(x), num_classes)
    torch.testing.assert_close(logits, logits2)
    assert list(taps) == list(LAYERS)
    want = expected_taps(arch, fc, size, width, groups, num_classes)
    for layer in LAYERS:
        assert tuple(taps[layer].shape) == (len(x), *want[layer]), (layer, taps[layer].shape, want[layer])
        assert model.layer_width(layer) == want[layer][0]
        if layer != "fc8":
            assert taps[layer].min() >= 0, f"{layer} tap is not post-ReLU"
    torch.testing.assert_close(taps["fc8"], logits)  # fc8 has no ReLU: its tap is the logits
    return model, x, taps


@pytest.mark.parametrize("size", [227, 224])
@pytest.mark.parametrize("groups", [1, 2])
def test_alexnet_full_width(size, groups):
    model, _, _ = check_variant("alexnet", IMAGENET, IMAGENET_FC, size, 3, groups=groups)
    if size == 227:  # the CaffeNet numbers everyone knows: 55, 27, 13, 13, 13 and 6 x 6 x 256 into fc6
        assert [expected_taps(IMAGENET, IMAGENET_FC, 227, 1.0, 1, 7)[c][1] for c in CONVS] == [55, 27, 13, 13, 13]
        assert model.fc_stages["fc6"].pre[0].in_features == 256 * 6 * 6
        assert [model.layer_width(n) for n in LAYERS] == [96, 256, 384, 384, 256, 4096, 4096, 7]
    grouped = [model.conv_stages[c].pre[0].groups for c in CONVS]
    assert grouped == ([1, 1, 1, 1, 1] if groups == 1 else [1, 2, 1, 2, 2])


@pytest.mark.parametrize(
    "lrn,batch_norm,width,groups",
    [
        ("none", False, 0.25, 1),
        ("before_pool", False, 0.25, 2),
        ("after_pool", False, 0.3, 2),
        ("none", True, 0.3, 2),
        ("before_pool", True, 0.5, 1),
        ("after_pool", True, 0.25, 1),
    ],
)
def test_alexnet_variants(lrn, batch_norm, width, groups):
    check_variant("alexnet", IMAGENET, IMAGENET_FC, 227, 3, width=width, groups=groups, lrn=lrn, batch_norm=batch_norm)


@pytest.mark.parametrize("size", [28, 32, 64])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_alexnet_small_sizes(size, in_channels):
    check_variant("alexnet_small", SMALL, SMALL_FC, size, in_channels, width=0.25)


@pytest.mark.parametrize("width", [0.125, 0.3, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("groups", [1, 2])
def test_alexnet_small_widths(width, groups):
    lrn = {0.125: "none", 0.3: "before_pool"}.get(width, "after_pool")
    model, _, _ = check_variant(
        "alexnet_small", SMALL, SMALL_FC, 32, 3, width=width, groups=groups, lrn=lrn, batch_norm=width == 0.5
    )
    for c, (out, *_rest) in zip(CONVS, SMALL):
        w = model.layer_width(c)
        assert w % groups == 0 and abs(w - out * width) <= groups, (c, w)


def test_batch_norm_is_inside_the_tap():
    model = AlexNet.small(num_classes=10, in_channels=1, input_size=28, width=0.25, batch_norm=True)
    kinds = [type(m).__name__ for m in model.conv_stages["conv1"].pre]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"]
    assert [type(m).__name__ for m in model.fc_stages["fc6"].pre] == ["Linear", "BatchNorm1d", "ReLU"]


def conv(x, stage):
    layer = stage.pre[0]
    return F.conv2d(x, layer.weight, layer.bias, stride=layer.stride, padding=layer.padding, groups=layer.groups)


@pytest.mark.parametrize("name,size", [("alexnet", 227), ("alexnet_small", 32)])
def test_taps_are_pre_pool_post_relu_activations(name, size):
    """Recompute the forward pass from the weights with torch.nn.functional: conv1's tap is
    relu(conv(x)); max-pooling it reproduces conv2's input (lrn=none); fc6's input is the pooled
    conv5 tap; fc7's tap is relu(linear(fc6 tap)) in eval mode."""
    torch.manual_seed(1)
    model = build_model(name, num_classes=5, in_channels=3, input_size=size, width=0.25, groups=2, lrn="none", dropout=0.5).eval()
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        logits, taps = model(x, taps=list(LAYERS))
        st = model.conv_stages
        torch.testing.assert_close(taps["conv1"], F.relu(conv(x, st["conv1"])))
        torch.testing.assert_close(taps["conv2"], F.relu(conv(F.max_pool2d(taps["conv1"], 3, 2), st["conv2"])))
        torch.testing.assert_close(taps["conv3"], F.relu(conv(F.max_pool2d(taps["conv2"], 3, 2), st["conv3"])))
        torch.testing.assert_close(taps["conv4"], F.relu(conv(taps["conv3"], st["conv4"])))
        torch.testing.assert_close(taps["conv5"], F.relu(conv(taps["conv4"], st["conv5"])))
        flat = torch.flatten(F.max_pool2d(taps["conv5"], 3, 2), 1)
        fc = model.fc_stages
        torch.testing.assert_close(taps["fc6"], F.relu(F.linear(flat, fc["fc6"].pre[0].weight, fc["fc6"].pre[0].bias)))
        torch.testing.assert_close(taps["fc7"], F.relu(F.linear(taps["fc6"], fc["fc7"].pre[0].weight, fc["fc7"].pre[0].bias)))
        torch.testing.assert_close(logits, F.linear(taps["fc7"], fc["fc8"].pre[0].weight, fc["fc8"].pre[0].bias))


@pytest.mark.parametrize("lrn", ["before_pool", "after_pool"])
def test_lrn_placement_matches_torch_lrn(lrn):
    """LRN (torch's reference implementation) before or after the pool, on conv1 and conv2 only;
    the taps stay before it."""
    torch.manual_seed(2)
    model = AlexNet.small(num_classes=10, in_channels=3, input_size=32, width=0.5, lrn=lrn).eval()
    norm = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)
    x = 3 * torch.randn(2, 3, 32, 32)  # large activations so the normalisation is not ~identity
    with torch.no_grad():
        _, taps = model(x, taps=["conv1", "conv2", "conv3"])
        for tap, nxt, stage in (("conv1", "conv2", "conv2"), ("conv2", "conv3", "conv3")):
            pooled = F.max_pool2d(norm(taps[tap]), 3, 2) if lrn == "before_pool" else norm(F.max_pool2d(taps[tap], 3, 2))
            torch.testing.assert_close(taps[nxt], F.relu(conv(pooled, model.conv_stages[stage])), rtol=1e-4, atol=1e-5)
            without = F.relu(conv(F.max_pool2d(taps[tap], 3, 2), model.conv_stages[stage]))
            assert not torch.allclose(taps[nxt], without, rtol=1e-4, atol=1e-5), "LRN had no effect"


def test_dropout_only_in_training():
    torch.manual_seed(3)
    model = AlexNet.small(num_classes=10, in_channels=1, input_size=28, width=0.25, dropout=0.5)
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    torch.testing.assert_close(a, b)
    model.train()
    with torch.no_grad():
        c, d = model(x), model(x)
    assert not torch.allclose(c, d)


def test_unknown_layer_is_a_clear_error():
    model = AlexNet.small(num_classes=10, in_channels=1, input_size=28, width=0.25)
    x = torch.randn(1, 1, 28, 28)
    with pytest.raises(ValueError, match=r"unknown layer 'conv6'.*conv1, conv2, conv3, conv4, conv5, fc6, fc7, fc8"):
        model(x, taps=["conv1", "conv6"])
    with pytest.raises(ValueError, match="unknown layer 'pool5'"):
        model.layer_width("pool5")


@pytest.mark.parametrize("name,size", [("alexnet", 28), ("alexnet", 50), ("alexnet_small", 8)])
def test_input_too_small_is_a_clear_error(name, size):
    with pytest.raises(ValueError, match=rf"input size {size} px is too small"):
        build_model(name, num_classes=10, in_channels=3, input_size=size, width=0.25)


def test_smallest_inputs_that_work():
    """alexnet needs 67 px (conv5's pool needs a 3 x 3 map); alexnet_small 15 px."""
    smallest = {}
    for name, arch in (("alexnet", IMAGENET), ("alexnet_small", SMALL)):
        for size in range(8, 120):
            side = size
            for _out, k, s, p, _g, pool in arch:
                side = out_side(side, k, s, p)
                if pool:
                    side = out_side(side, 3, 2)
            if side >= 1:
                smallest[name] = size
                break
        model = build_model(name, num_classes=3, in_channels=3, input_size=smallest[name], width=0.125)
        assert model(torch.randn(1, 3, smallest[name], smallest[name])).shape == (1, 3)
        with pytest.raises(ValueError, match="too small"):
            build_model(name, num_classes=3, in_channels=3, input_size=smallest[name] - 1, width=0.125)
    assert smallest == {"alexnet": 67, "alexnet_small": 15}


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg", num_classes=10, in_channels=3, input_size=32)
    with pytest.raises(ValueError, match="groups must be 1 or 2"):
        AlexNet.small(groups=3)
    with pytest.raises(ValueError, match="lrn must be one of"):
        AlexNet.small(lrn="after")
    with pytest.raises(ValueError, match="width multiplier must be positive"):
        AlexNet.small(width=0)
