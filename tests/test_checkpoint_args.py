"""convergent-analyze's positional arguments: an existing path is a checkpoint whatever characters
it holds, a directory stands for its checkpoints, and only the rest are key=value overrides."""

from __future__ import annotations

import pytest

from convergent.checkpoint_args import natural_key, parse
from convergent.errors import ConfigError


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_a_file_with_equals_signs_is_a_checkpoint_and_overrides_are_the_rest(tmp_path):
    step = touch(tmp_path / "run" / "checkpoints" / "analysis" / "step=945.ckpt")
    odd = touch(tmp_path / "a=b" / "x=1,y=[2].ckpt")
    args = parse([str(step), "analysis.probe_size=1000", str(odd), "data.root=/data/x", "analysis.layers=[conv1,conv2]"])
    assert args.checkpoints == [step, odd]
    assert args.overrides == ["analysis.probe_size=1000", "data.root=/data/x", "analysis.layers=[conv1,conv2]"]


def test_a_run_directory_means_its_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    last = touch(run / "checkpoints" / "last.ckpt")
    touch(run / "checkpoints" / "analysis" / "step=5.ckpt")
    touch(run / ".hydra" / "config.yaml")
    assert parse([str(run)]).checkpoints == [last]
    (run / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(ConfigError, match="holds no checkpoints/last.ckpt"):
        parse([str(run)])


def test_any_other_directory_means_its_checkpoints_in_natural_order(tmp_path):
    folder = tmp_path / "run" / "checkpoints" / "analysis"
    names = ["step=10.ckpt", "step=2.ckpt", "step=0.ckpt", "step=100.ckpt", "notes.txt"]
    for name in names:
        touch(folder / name)
    touch(folder / "nested" / "step=1.ckpt")  # not recursive
    got = parse([str(folder), "analysis.full_every=1"])
    assert [p.name for p in got.checkpoints] == ["step=0.ckpt", "step=2.ckpt", "step=10.ckpt", "step=100.ckpt"]
    assert got.overrides == ["analysis.full_every=1"]
    assert sorted(["b10", "b9", "a"], key=lambda n: natural_key(tmp_path / n)) == ["a", "b9", "b10"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no \\*.ckpt file"):
        parse([str(empty)])


@pytest.mark.parametrize("missing", ["outputs/RUN/checkpoints/analysis/step=99.ckpt", "step=99.ckpt", "nothing.ckpt", "typo"])
def test_a_missing_checkpoint_is_named_not_taken_for_an_override(tmp_path, missing):
    real = touch(tmp_path / "last.ckpt")
    with pytest.raises(ConfigError) as err:
        parse([str(real), missing])
    assert str(err.value) == f"checkpoint {missing} does not exist; pass .ckpt files or run directories, then key=value overrides"


def test_overrides_alone_are_not_enough():
    with pytest.raises(ConfigError, match="no checkpoint given"):
        parse(["analysis.probe_size=10"])
