"""The default recipe: `model.init` sets the weights and biases it documents (checked against the
formulas and distributions, fan-ins written out here), is deterministic per member seed, keeps fc6
alive at init on real digits where torch's default init does not; `optim.warmup_steps` gives the
learning rates of its formula at every step, through a real Lightning fit."""

import math

import pytest
import pytorch_lightning as pl
import torch
from scipy import stats

from convergent.config import ConfigError, validate
from convergent.data import MNIST5k, Synthetic
from convergent.ensemble import Ensemble, build_member
from convergent.models.alexnet import INIT_CHOICES, AlexNet
from convergent.stats import Moments

# (layer, fan_in) of alexnet_small at width 1, groups=2: conv2/4/5 see half their input channels.
SMALL_FAN_IN = {
    "conv1": 1 * 25,
    "conv2": 32 * 25,
    "conv3": 128 * 9,
    "conv4": 96 * 9,
    "conv5": 96 * 9,
    "fc6": 128 * 2 * 2,
    "fc7": 512,
    "fc8": 512,
}
PAPER_ONE = {"conv2", "conv4", "conv5", "fc6", "fc7"}  # Krizhevsky et al. 2012, section 5
MODEL = {"name": "alexnet_small", "width": 0.25, "groups": 1, "lrn": "after_pool", "dropout": 0.5, "batch_norm": False}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def layers(net: AlexNet) -> dict:
    return {name: stage.pre[0] for name, stage in {**net.conv_stages, **net.fc_stages}.items()}


def small(init: str, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return layers(AlexNet.small(num_classes=10, in_channels=1, input_size=28, groups=2, init=init))


def assert_std(w: torch.Tensor, expected: float, name: str) -> None:
    # The sample std of n normal draws has a relative standard error of 1/sqrt(2n): allow 5 of them.
    n = w.numel()
    assert abs(float(w.std()) / expected - 1) < 5 / math.sqrt(2 * n), (name, float(w.std()), expected)


def test_fan_ins_written_out_match_the_model():
    assert {name: layer.weight[0].numel() for name, layer in small("torch").items()} == SMALL_FAN_IN


@pytest.mark.parametrize("seed", [0, 1])
def test_paper_init_is_krizhevskys(seed):
    for name, layer in small("paper", seed).items():
        w = layer.weight.detach().flatten()
        assert abs(float(w.mean())) < 5 * 0.01 / math.sqrt(w.numel()), name
        assert_std(w, 0.01, name)
        assert stats.kstest(w.numpy() / 0.01, "norm").pvalue > 1e-3, name
        assert torch.equal(layer.bias.detach(), torch.full_like(layer.bias, 1.0 if name in PAPER_ONE else 0.0)), name


@pytest.mark.parametrize("init", ["kaiming", "centred"])
def test_kaiming_and_centred_have_he_std_and_zero_biases(init):
    for name, layer in small(init).items():
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        expected = math.sqrt((1.0 if name == "fc8" else 2.0) / SMALL_FAN_IN[name])
        assert_std(w, expected, name)
        assert stats.kstest(w.flatten().numpy() / expected, "norm").pvalue > 1e-3, name
        assert torch.equal(layer.bias.detach(), torch.zeros_like(layer.bias)), name
        row_means = w.mean(1).abs().max()
        if init == "centred":  # every unit's incoming weights sum to zero
            assert float(row_means) < 1e-6 * expected, name
        else:  # He-normal rows have means of size std/sqrt(fan_in), not zero
            assert float(row_means) > 0.5 * expected / math.sqrt(SMALL_FAN_IN[name]), name


def test_torch_init_is_pytorchs_uniform_default():
    for name, layer in small("torch").items():
        bound = 1 / math.sqrt(SMALL_FAN_IN[name])  # kaiming_uniform(a=sqrt(5)) and the bias: U(+-1/sqrt(fan_in))
        for p in (layer.weight, layer.bias):
            x = p.detach().flatten().numpy()
            assert abs(x).max() <= bound
            assert stats.kstest(x, "uniform", args=(-bound, 2 * bound)).pvalue > 1e-3, name


@pytest.mark.parametrize("init", INIT_CHOICES)
def test_init_is_deterministic_per_member_seed_and_members_differ(init):
    model = {**MODEL, "init": init}

    def params(seed: int) -> list[torch.Tensor]:
        return [p.detach().clone() for p in build_member(model, seed, num_classes=10, in_channels=1, input_size=28).parameters()]

    torch.manual_seed(5)
    state = torch.get_rng_state()
    a, again, other = params(7), params(7), params(8)
    assert torch.equal(torch.get_rng_state(), state), "building a member consumed the global RNG"
    assert all(torch.equal(x, y) for x, y in zip(a, again, strict=True))
    weights = [(x, y) for x, y in zip(a, other, strict=True) if x.dim() > 1]
    assert all(not torch.equal(x, y) for x, y in weights)


@pytest.fixture(scope="module")
def probe_batch() -> torch.Tensor:
    dm = MNIST5k()
    dm.setup()
    return torch.stack([dm.val_set[i][0] for i in range(250)])  # real digits, the probe set's first images


@torch.no_grad()
def dead_fc6(init: str, seed: int, images: torch.Tensor) -> float:
    """Fraction of fc6 units with zero variance over the images (the monitor's definition)."""
    net = build_member({**MODEL, "init": init}, seed, num_classes=10, in_channels=1, input_size=28).eval()
    _, taps = net(images, taps=["fc6"])
    moments = Moments([taps["fc6"].shape[1]], cka_sums=False)
    moments.update(taps["fc6"])
    return float(moments.compute().dead(0).double().mean())


def test_centred_init_keeps_fc6_alive_where_torch_init_does_not(probe_batch):
    seeds = range(4)
    torch_dead = [dead_fc6("torch", s, probe_batch) for s in seeds]
    centred_dead = [dead_fc6("centred", s, probe_batch) for s in seeds]
    assert min(torch_dead) > 0.25, torch_dead  # ~0.4 of fc6 never fires with torch's default init
    assert max(centred_dead) < 0.05, centred_dead
    assert sum(centred_dead) < sum(torch_dead) / 5


def test_bad_init_is_a_clear_error():
    with pytest.raises(ValueError, match="init must be one of"):
        AlexNet.small(init="he")
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="convergent.conf", version_base="1.3"):
        cfg = compose("train", overrides=["model.init=he"])
        with pytest.raises(ConfigError, match="model.init='he' is not valid; choose one of: torch, paper"):
            validate(cfg)
        assert compose("train").model.init == "centred"
        assert compose("train", overrides=["experiment=paper_imagenet"]).model.init == "paper"


# --- warm-up ------------------------------------------------------------------------------------
class RecordLR(pl.Callback):
    def __init__(self):
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def fitted_lrs(optim: dict, epochs: int) -> list[float]:
    dm = Synthetic(num_classes=3, in_channels=1, input_size=16, train_size=64, val_size=16, batch_size=16)  # 4 steps per epoch
    dm.setup()
    model = {**MODEL, "width": 0.125, "dropout": 0.0}
    ens = Ensemble(model=model, num_classes=3, in_channels=1, input_size=16, k=1, optim=optim)
    record = RecordLR()
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[record],
    )  # fmt: skip
    trainer.fit(ens, datamodule=dm)
    return record.lrs


def warm(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup)


@pytest.mark.parametrize("schedule", ["none", "cosine", "step"])
def test_warmup_learning_rates_follow_the_formula(schedule):
    lr, warmup, epochs, per_epoch = 0.01, 6, 5, 4
    total = epochs * per_epoch
    optim = {"name": "sgd", "lr": lr, "momentum": 0.9, "schedule": schedule, "step_size": 2, "gamma": 0.5, "warmup_steps": warmup}
    lrs = fitted_lrs(optim, epochs)
    main = {
        "none": lambda t: 1.0,
        "cosine": lambda t: 0.5 * (1 + math.cos(math.pi * t / total)),
        "step": lambda t: 0.5 ** ((t // per_epoch) // 2),
    }[schedule]
    expected = [lr * warm(t, warmup) * main(t) for t in range(total)]
    assert len(lrs) == total
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert lrs[0] == pytest.approx(lr / warmup) and lrs[warmup - 1] == pytest.approx(lr * main(warmup - 1))


def test_no_warmup_leaves_the_schedule_as_it_was():
    total = 8
    lrs = fitted_lrs({"name": "adam", "lr": 2e-3, "schedule": "cosine", "warmup_steps": 0}, 2)
    assert lrs == pytest.approx([2e-3 * 0.5 * (1 + math.cos(math.pi * t / total)) for t in range(total)], rel=1e-9)


@pytest.mark.parametrize("bad", [-1, 2.5, "10"])
def test_bad_warmup_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="optim.warmup_steps=.* must be a whole number of steps >= 0"):
        Ensemble(
            model=MODEL,
            num_classes=10,
            in_channels=1,
            input_size=28,
            k=1,
            optim={"name": "adam", "lr": 1e-3, "warmup_steps": bad},
        )
