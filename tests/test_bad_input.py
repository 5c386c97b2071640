"""Bad input: a clear one-line error naming the key and the fix, before any training, with nothing
half-written in the run directory; a member whose loss becomes NaN stops the run naming the
member and the step, keeping a loadable last checkpoint."""

from __future__ import annotations

import re

import pytest
import torch
from hydra.errors import ConfigCompositionException

from convergent.analysis.registry import REGISTRY
from convergent.errors import ConfigError
from convergent.models import LAYERS
from tests.support import compose_train, run_cli

WRITTEN = ("csv", "checkpoints", "wandb", "analysis", "figures", "run.json")


def prepare_error(tmp_path, *overrides: str) -> str:
    """The ConfigError `convergent-train <overrides>` stops with (everything `train` checks before it
    writes anything: `prepare`), and that the run directory stayed empty."""
    from convergent.train import prepare

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(ConfigError) as err:
        prepare(compose_train(*overrides), run_dir)
    message = str(err.value)
    assert message and "\n" not in message, repr(message)
    assert list(run_dir.iterdir()) == [], "prepare wrote into the run directory"
    return message


def test_unknown_layer_lists_the_valid_layers(tmp_path):
    message = prepare_error(tmp_path, "debug=tiny", "analysis.layers=[conv1,conv9]")
    assert "analysis.layers" in message and "'conv9'" in message
    assert "valid layers: " + ", ".join(LAYERS) in message


def test_unknown_analysis_lists_the_valid_analyses(tmp_path):
    message = prepare_error(tmp_path, "debug=tiny", "analysis.analyses=[correlation,ckaa]")
    assert "analysis.analyses" in message and "'ckaa'" in message
    import convergent.analysis.builtin  # noqa: F401 - the built-in analyses

    assert "valid analyses: " + ", ".join(sorted(REGISTRY.analyses)) in message


def test_probe_size_larger_than_the_validation_split(tmp_path):
    message = prepare_error(tmp_path, "debug=tiny", "analysis.probe_size=500")  # tiny: 96 val images
    assert "analysis.probe_size=500" in message and "96 images" in message and "between 1 and 96" in message


def test_one_member_with_between_net_analyses(tmp_path):
    message = prepare_error(tmp_path, "debug=tiny", "ensemble.k=1")
    assert "ensemble.k=1" in message and "at least 2 members" in message and "callbacks=none" in message


def test_one_member_without_the_monitor_is_fine(tmp_path):
    from convergent.train import prepare

    job = prepare(compose_train("debug=tiny", "ensemble.k=1", "callbacks=none"), tmp_path)
    assert job.ensemble.k == 1


def test_missing_dataset_path(tmp_path):
    message = prepare_error(tmp_path, "data=imagefolder", f"data.root={tmp_path / 'nonexistent'}")
    assert f"data.root={tmp_path / 'nonexistent'}" in message and "train/<class>/" in message


def test_cifar_not_found_offline_says_where_to_put_it(tmp_path):
    message = prepare_error(tmp_path, "data=cifar10", f"data.root={tmp_path / 'data'}", "data.download=false")
    assert "cifar10 not found in" in message and "cifar-10-python.tar.gz" in message and str(tmp_path / "data") in message


def test_statistics_over_the_memory_limit(tmp_path):
    message = prepare_error(tmp_path, "debug=tiny", "analysis.memory_limit_gb=0.001")
    assert "over analysis.memory_limit_gb=0.001" in message and "analysis.max_units" in message
    assert "analysis.null.enabled=false" in message and "analysis.interval.groups" in message  # keys that exist


def test_probe_set_too_small_for_the_null(tmp_path):
    message = prepare_error(tmp_path, "debug=tiny", "analysis.probe_size=3")
    assert "analysis.probe_size=3" in message and "analysis.null.enabled=false" in message
    from convergent.train import prepare

    prepare(compose_train("debug=tiny", "analysis.probe_size=3", "analysis.null.enabled=false"), tmp_path / "ok")


def test_legacy_null_keys_are_renamed_with_a_deprecation_message(capsys):
    from convergent.config import migrate_argv, validate

    with pytest.warns(FutureWarning, match="analysis.permutation_null is deprecated"):
        argv = migrate_argv(["debug=tiny", "analysis.permutation_null=false", "analysis.null_pairs=all"])
    assert argv == ["debug=tiny", "analysis.null.enabled=false", "analysis.null.pairs=all"]
    assert "use analysis.null.enabled" in capsys.readouterr().err
    # a saved config of an earlier release (as resume= composes it) is renamed the same way
    cfg = compose_train("debug=tiny")
    from omegaconf import OmegaConf

    old = OmegaConf.to_container(cfg)
    old["analysis"].pop("null")
    old["analysis"].update(permutation_null=False, null_pairs="all")
    with pytest.warns(FutureWarning):
        conf = validate(OmegaConf.create(old))
    assert conf.analysis.null.enabled is False and conf.analysis.null.pairs == "all"


@pytest.mark.parametrize(
    "overrides,size",
    [(("debug=tiny", "model=alexnet"), 28), (("debug=tiny", "data.input_size=8"), 8)],
    ids=["alexnet-on-28px", "small-on-8px"],
)
def test_input_too_small_for_the_model(tmp_path, overrides, size):
    message = prepare_error(tmp_path, *overrides)
    assert f"input size {size} px is too small for this model" in message


def test_negative_l1_weight(tmp_path):
    message = prepare_error(tmp_path, "debug=tiny", "analysis.sparse.l1=[0,1e-3,-0.1]")
    assert "analysis.sparse.l1" in message and "negative L1 weight" in message and ">= 0" in message


def test_more_clusters_than_units(tmp_path):
    message = prepare_error(tmp_path, "debug=tiny", "analysis.spectral.n_clusters=1000")
    assert "analysis.spectral.n_clusters=1000" in message and "units of two conv1 nets" in message


def test_unknown_spectral_label_assignment_lists_the_choices(tmp_path):
    message = prepare_error(tmp_path, "debug=tiny", "analysis.spectral.assign_labels=kmean")
    assert "analysis.spectral.assign_labels='kmean'" in message and "cluster_qr, kmeans, discretize" in message


@pytest.mark.parametrize(
    "override,key", [("analysis.probesize=10", "analysis.probesize"), ("trainer.max_step=3", "trainer.max_step")]
)
def test_mistyped_key_names_the_key(override, key):
    # Hydra rejects it while composing, before convergent-train runs at all (the CLI prints
    # Hydra's message, exit status 1, and creates no run directory).
    with pytest.raises(ConfigCompositionException) as err:
        compose_train("debug=tiny", override)
    text = f"{err.value} {err.value.__cause__}"
    assert f"Could not override '{key}'" in text and f"Key '{key.split('.')[-1]}' not in" in text


def test_cli_bad_input_is_one_line_on_stderr_exit_2_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "train", "debug=tiny", "analysis.spectral.n_clusters=1000", f"hydra.run.dir={run_dir}", cwd=tmp_path, check=False
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: analysis.spectral.n_clusters=1000"), proc.stderr[-3000:]
    assert not any((run_dir / name).exists() for name in WRITTEN), sorted(p.name for p in run_dir.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no stray wandb/ or outputs/


def test_nan_loss_stops_naming_member_and_step_and_keeps_a_loadable_checkpoint(tmp_path):
    """SGD at lr 1e10 blows the weights up in one step; the next loss is NaN."""
    from convergent.ensemble import Ensemble

    run_dir = tmp_path / "run"
    proc = run_cli(
        "train", "debug=tiny", "optim=sgd", "optim.lr=1e10", "logger=csv",
        "analysis.analyses=[correlation]", "analysis.layers=[conv1]", "analysis.figures=none",
        "analysis.schedule.kind=every_n_steps", "analysis.schedule.every=1", f"hydra.run.dir={run_dir}",
        cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode not in (0, 2), proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"error: member (\d+) has a non-finite loss \((nan|inf|-inf)\) at step (\d+); .*", last)
    assert match, proc.stderr[-3000:]
    step = int(match.group(3))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] <= step
    ens = Ensemble.load_from_checkpoint(ckpt, map_location="cpu")
    assert all(torch.isfinite(p).all() for p in ens.parameters()), "the kept checkpoint is not the last good one"
    assert not (run_dir / "summary.json").exists()
