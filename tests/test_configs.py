"""Every option of every config group composes and passes `validate`; mistakes give clear errors
naming the key; every key of every W&B sweep exists and its values compose."""

import inspect
from pathlib import Path

import pytest
import pytorch_lightning as pl
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from convergent.config import validate
from convergent.errors import ConfigError
from convergent.models import LAYERS, build_model

ROOT = Path(__file__).resolve().parent.parent
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
GROUPS = ["model", "data", "ensemble", "optim", "trainer", "logger", "callbacks", "analysis", "debug", "experiment"]
# At least these options must exist (the README documents them); new files are picked up too.
REQUIRED = {
    "model": {"alexnet", "alexnet_small"},
    "data": {"mnist5k", "synthetic", "cifar10", "cifar100", "imagefolder"},
    "trainer": {"default", "cpu", "gpu", "ddp", "ddp_cpu"},
    "logger": {"wandb_csv", "wandb", "csv", "none"},
    "callbacks": {"default", "none"},
    "optim": {"adam", "sgd"},
    "debug": {"fast", "tiny"},
    "experiment": {"paper_imagenet", "cifar10", "quick"},
    "hydra/launcher": {"basic", "submitit_local", "submitit_slurm"},
}


@pytest.fixture(scope="module")
def hydra_ctx():
    with initialize_config_module(config_module="convergent.conf", version_base="1.3"):
        yield GlobalHydra.instance().config_loader()


def options(loader, group: str) -> list[str]:
    """The options a user chooses from (the schema nodes `<name>_schema` are what they extend)."""
    return [o for o in loader.get_group_options(group) if not o.endswith("_schema")]


def compose_valid(*overrides: str, hydra: bool = False):
    cfg = compose("train", overrides=list(overrides), return_hydra_config=hydra)
    validate(cfg)
    return cfg


def member_of(cfg):
    """The data module (not set up: nothing is read or downloaded) and one member, built from the
    composed config the way convergent-train builds them."""
    data = instantiate(cfg.data)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    name = model.pop("name")
    in_channels = model.pop("in_channels", None) or data.in_channels
    num_classes = data.num_classes or 1000  # imagefolder: known once the folders are read
    return data, build_model(name, num_classes=num_classes, in_channels=in_channels, input_size=data.input_size, **model)


def test_required_options_exist(hydra_ctx):
    for group, names in REQUIRED.items():
        assert names <= set(options(hydra_ctx, group)), group


def test_every_group_option_composes(hydra_ctx):
    composed = 0
    trainer_args = set(inspect.signature(pl.Trainer.__init__).parameters)
    for group in GROUPS:
        for option in options(hydra_ctx, group):
            cfg = compose_valid(f"{group}={option}")
            composed += 1
            if group == "trainer":  # every key is a pl.Trainer argument (a typo would fail at fit time)
                unknown = set(cfg.trainer) - trainer_args
                assert not unknown, f"trainer={option}: not Trainer arguments: {unknown}"
            if group == "data":  # the data config instantiates (its keys match the class), a member builds on it
                dm, net = member_of(cfg)
                assert dm.input_size >= 28 and net.layer_width("conv1") >= 1
    assert composed >= sum(len(v) for k, v in REQUIRED.items() if k != "hydra/launcher")
    dm, net = member_of(compose_valid("model=alexnet", "data=imagefolder", "model.width=0.125"))
    assert dm.input_size == 227 and net.layer_width("conv1") == 12


def test_every_hydra_launcher_composes(hydra_ctx):
    for launcher in options(hydra_ctx, "hydra/launcher"):
        cfg = compose_valid(f"hydra/launcher={launcher}", hydra=True)
        target = cfg.hydra.launcher._target_
        assert get_class(target).__name__.endswith("Launcher"), target
    slurm = compose_valid(
        "hydra/launcher=submitit_slurm", "hydra.launcher.gpus_per_node=4", "trainer=ddp", "trainer.devices=4", hydra=True
    )
    assert slurm.hydra.launcher.gpus_per_node == 4 and slurm.trainer.strategy == "ddp"


def test_debug_applies_over_an_experiment(hydra_ctx):
    """`experiment=X debug=...` is a quick check of X: debug wins, whatever the order given."""
    for order in (["experiment=quick", "debug=tiny"], ["debug=tiny", "experiment=quick"]):
        cfg = compose_valid(*order)
        assert cfg.trainer.max_epochs == 2 and cfg.trainer.max_steps == 10
        assert cfg.data._target_.endswith("Synthetic") and cfg.ensemble.k == 3
    cfg = compose_valid("experiment=cifar10", "debug=fast")
    assert cfg.trainer.max_epochs == 1 and cfg.trainer.limit_train_batches == 8 and cfg.data.name == "cifar10"


@pytest.fixture(scope="module")
def paper_widths():
    net = build_model("alexnet", num_classes=1000, in_channels=3, input_size=227)
    return {layer: net.layer_width(layer) for layer in LAYERS}


def test_paper_imagenet_is_the_papers_setting(hydra_ctx, paper_widths):
    cfg = compose_valid("experiment=paper_imagenet", hydra=True)
    assert cfg.model.name == "alexnet" and cfg.model.groups == 1 and cfg.model.lrn == "after_pool"
    assert cfg.model.dropout == 0.5 and not cfg.model.batch_norm and cfg.model.width == 1.0 and cfg.model.init == "paper"
    assert cfg.data._target_.endswith("ImageFolderData") and cfg.data.crop == 227
    assert cfg.ensemble.k == 4 and cfg.ensemble.data_order == "shared"
    assert dict(cfg.optim) == {
        "name": "sgd",
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 0.0005,
        "schedule": "step",
        "step_size": 30,
        "gamma": 0.1,
        "warmup_steps": 0,
    }
    assert cfg.trainer.max_epochs == 90 and cfg.trainer.accelerator == "gpu"
    assert list(cfg.analysis.layers) == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"]
    assert (cfg.analysis.probe_size, cfg.analysis.batch_size, cfg.analysis.max_units) == (5000, 100, 1024)
    dm = instantiate(cfg.data)
    assert dm.input_size == 227 and dm.in_channels == 3
    assert paper_widths == {
        "conv1": 96,
        "conv2": 256,
        "conv3": 384,
        "conv4": 384,
        "conv5": 256,
        "fc6": 4096,
        "fc7": 4096,
        "fc8": 1000,
    }


def test_paper_imagenet_statistics_fit_thanks_to_max_units(hydra_ctx, paper_widths):
    """max_units=1024 is what keeps fc6/fc7's statistics under the memory limit."""
    from convergent.analysis.plan import Plan
    from convergent.monitor.probe import ProbeRunner

    totals = {}
    for max_units in ("1024", "null"):
        conf = compose_valid("experiment=paper_imagenet", f"analysis.max_units={max_units}")
        conf = validate(conf)
        totals[max_units] = (
            ProbeRunner(Plan.build(conf.analysis, k=conf.ensemble.k), paper_widths).estimate_bytes()["total"] / 1024**3
        )
        limit = conf.analysis.memory_limit_gb
    assert totals["1024"] < limit < totals["null"], (totals, limit)


@pytest.mark.parametrize(
    "experiment,model,data_target,size,channels",
    [("cifar10", "alexnet_small", "CIFAR", 32, 3), ("quick", "alexnet_small", "MNIST5k", 28, 1)],
)
def test_small_experiments(hydra_ctx, experiment, model, data_target, size, channels):
    cfg = compose_valid(f"experiment={experiment}")
    assert cfg.model.name == model and cfg.model.in_channels is None  # channels come from the data
    assert cfg.data._target_.endswith(data_target)
    dm, net = member_of(cfg)
    assert (dm.input_size, dm.in_channels) == (size, channels)
    assert net.conv_stages["conv1"].pre[0].in_channels == channels
    assert cfg.optim.name in ("sgd", "adam")
    assert cfg.trainer.max_epochs == (30 if experiment == "cifar10" else 2)


# --- mistakes ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override,key",
    [
        ("trainer.max_epoch=3", "trainer.max_epoch"),
        ("model.widht=0.5", "model.widht"),
        ("analysis.probesize=10", "analysis.probesize"),
    ],
)
def test_mistyped_key_names_the_key(hydra_ctx, override, key):
    with pytest.raises(ConfigCompositionException) as err:
        compose("train", overrides=[override])
    text = f"{err.value} {err.value.__cause__}"
    assert f"Could not override '{key}'" in text and f"Key '{key.split('.')[-1]}' not in" in text, text


def test_mistyped_option_lists_the_options(hydra_ctx):
    with pytest.raises(MissingConfigException) as err:
        compose("train", overrides=["data=cifar"])
    assert "data/cifar" in str(err.value) and "cifar10" in str(err.value)


@pytest.mark.parametrize(
    "override,message",
    [
        ("ensemble.data_order=shard", "ensemble.data_order='shard' is not valid; choose one of: shared, independent"),
        ("model.lrn=after", "model.lrn='after' is not valid; choose one of: none, before_pool, after_pool"),
        ("model.groups=3", "model.groups=3 is not valid; choose one of: 1, 2"),
        ("model.width=0", "model.width=0 must be a positive multiplier"),
        ("optim.name=adamw", "optim.name='adamw' is not valid; choose one of: sgd, adam"),
        ("optim.schedule=linear", "optim.schedule='linear' is not valid"),
        ("ensemble.k=0", "ensemble.k=0 must be at least 1"),
        ("analysis.layers=[conv1,conv6]", "analysis.layers: unknown layer 'conv6'"),
    ],
)
def test_mistyped_value_names_the_key(hydra_ctx, override, message):
    cfg = compose("train", overrides=[override])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


# --- W&B sweeps -------------------------------------------------------------------------------
def test_there_are_sweeps():
    names = {p.stem for p in SWEEPS}
    assert {"width", "data_order"} <= names, names


def agent_command(command: list[str], params: dict) -> list[str]:
    """The command `wandb agent` runs for one point of the sweep: `${env}` and `${args_no_hyphens}`
    expanded (the latter by wandb's own function), other items passed through as they are."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    macros = {"env": ["/usr/bin/env"], **create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})}
    out = []
    for item in command:
        out += macros[item[2:-1]] if item.startswith("${") and item.endswith("}") else [item]
    return out


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_keys_exist_and_values_compose(hydra_ctx, path, monkeypatch):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] in ("grid", "random", "bayes")
    assert sweep["metric"]["name"] == "val/acc" and sweep["metric"]["goal"] == "maximize"
    assert sweep["command"][:3] == ["${env}", "convergent-train", "${args_no_hyphens}"]
    params = sweep["parameters"]
    groups = set(GROUPS)
    base = compose("train", overrides=[f"{k}={p['value']}" for k, p in params.items() if k in groups and "value" in p])
    for key in params:
        if key not in groups:
            assert OmegaConf.select(base, key, default="<missing>") != "<missing>", f"{path.name}: {key} is not a config key"
    values = {k: (p["values"] if "values" in p else [p["value"]]) for k, p in params.items()}
    first = {k: v[0] for k, v in values.items()}
    # every value of every parameter, the other parameters at their first value
    combos = {tuple({**first, key: v}.items()) for key, vs in values.items() for v in vs}
    monkeypatch.setenv("WANDB_RUN_ID", "abc123")
    for combo in sorted(combos, key=str):
        argv = agent_command(sweep["command"], dict(combo))
        assert argv[:2] == ["/usr/bin/env", "convergent-train"]
        cfg = compose_valid(*argv[2:], hydra=True)
        for key, value in combo:
            if key not in groups:
                assert OmegaConf.select(cfg, key) == value, (key, OmegaConf.select(cfg, key), value)
        assert cfg.hydra.run.dir.endswith("-abc123"), cfg.hydra.run.dir  # one dir per W&B run
