"""Checkpoints cannot run code: every load is weights-only (convergent.checkpoint_io); a checkpoint
whose pickle would create a file is refused in one line by convergent-analyze and by
convergent-train (`resume=`, `ckpt_path=`), exit status 2, and the file is not created; with
`--trust-checkpoint` / `trust_checkpoint=true` it loads and the file IS created (so the test can
fail). Every checkpoint a run writes needs nothing beyond torch's weights-only defaults."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
import torch

from convergent import checkpoint_io
from convergent.checkpoint_io import UnsafeCheckpoint
from tests.rundirs import copy_run, fingerprint, train_saved
from tests.support import LIGHT, run_cli

# 8 steps (one epoch) with an analysis every 4 steps and their checkpoints; finished by max_epochs=1
FINISHED = ("debug=tiny", "logger=csv", "trainer.max_steps=-1", "trainer.max_epochs=1", *LIGHT[:3],
            "analysis.save_checkpoints=true", "analysis.schedule.kind=every_n_steps", "analysis.schedule.every=4")  # fmt: skip
# another optimiser, schedule, explicit seeds, clipping and the vectorised ensemble, no monitor
VARIANT = ("debug=tiny", "logger=csv", "trainer.max_steps=2", "callbacks=none", "optim=sgd", "optim.schedule=step",
           "ensemble.seeds=[5,7,9]", "ensemble.clip_grad_norm=1.0", "ensemble.vectorize=true")  # fmt: skip


class Touch:
    """Unpickling this runs `touch <path>` (what a malicious checkpoint could run instead)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.path))}",)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("safe")
    train_saved(base / "finished", *FINISHED)
    train_saved(base / "variant", *VARIANT)
    return base


def poisoned(real: Path, to: Path, marker: Path) -> Path:
    state = torch.load(real, map_location="cpu", weights_only=True)
    state["note"] = Touch(marker)  # an extra top-level key: Lightning ignores it once loaded
    torch.save(state, to)
    return to


def test_every_checkpoint_a_run_writes_loads_weights_only_with_nothing_allowed_beyond_torchs_defaults(runs):
    checkpoints = sorted(runs.rglob("*.ckpt"))
    names = sorted(p.relative_to(runs).as_posix() for p in checkpoints)
    assert "finished/checkpoints/last.ckpt" in names and "finished/checkpoints/analysis/step=4.ckpt" in names
    assert "variant/checkpoints/last.ckpt" in names and len(checkpoints) == 5, names  # steps 0, 4, 8 and two last.ckpt
    assert checkpoint_io.SAFE_GLOBALS == ()
    for path in checkpoints:
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == [], path
        state = torch.load(path, map_location="cpu", weights_only=True)  # torch's defaults alone
        assert checkpoint_io.load(path)["global_step"] == state["global_step"]


def test_the_safe_loader_refuses_in_one_line_and_runs_nothing(runs, tmp_path):
    marker = tmp_path / "pwned"
    evil = poisoned(runs / "finished" / "checkpoints" / "last.ckpt", tmp_path / "evil.ckpt", marker)
    assert checkpoint_io.unsafe_globals(evil) == ["posix.system"]
    with pytest.raises(UnsafeCheckpoint) as err:
        checkpoint_io.load(evil)
    message = str(err.value)
    assert message == (
        f"refusing to load {evil}: its pickle needs posix.system, which no checkpoint of convergent-train holds "
        "(loading it could run code); pass --trust-checkpoint only if you trust where it came from"
    )
    with pytest.raises(UnsafeCheckpoint):
        checkpoint_io.load_ensemble(evil)
    assert not marker.exists()
    state = checkpoint_io.load(evil, trust=True)
    assert marker.exists() and state["note"] == 0 and state["global_step"] == 8  # the payload ran


def test_convergent_analyze_refuses_a_malicious_checkpoint_unless_trusted(runs, tmp_path, capsys):
    from convergent.analyze import main

    run = copy_run(runs / "finished", tmp_path / "run")
    marker = tmp_path / "pwned"
    evil = poisoned(
        run / "checkpoints" / "analysis" / "step=8.ckpt", run / "checkpoints" / "analysis" / "step=8-shared.ckpt", marker
    )
    out = tmp_path / "posthoc"
    with pytest.raises(SystemExit) as exit_:
        main([str(evil), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: refusing to load {evil}: its pickle needs posix.system") and "--trust-checkpoint" in err[0]
    assert not marker.exists() and not out.exists()

    main([str(evil), "--out", str(out), "--device", "cpu", "--trust-checkpoint"])
    assert marker.exists(), "the payload did not run: the refusal above proves nothing"
    assert (out / "scalars.csv").read_text().count("\n") > 10


@pytest.mark.subprocess
def test_convergent_train_refuses_a_malicious_checkpoint_for_resume_and_ckpt_path_unless_trusted(runs, tmp_path):
    run = copy_run(runs / "finished", tmp_path / "run")
    marker = tmp_path / "pwned"
    last = run / "checkpoints" / "last.ckpt"
    poisoned(last, last, marker)
    before = fingerprint(run)

    # resume=: refused before Hydra writes anything into the run directory
    proc = run_cli("train", f"resume={run}", cwd=tmp_path, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: refusing to load {last}: its pickle needs posix.system")
    assert lines[0].endswith("pass trust_checkpoint=true only if you trust where it came from")
    assert not marker.exists() and fingerprint(run) == before

    # ckpt_path=: refused before training, nothing of a run written
    new = tmp_path / "new"
    proc = run_cli("train", *FINISHED, f"ckpt_path={last}", f"hydra.run.dir={new}", cwd=tmp_path, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "its pickle needs posix.system" in lines[0], proc.stderr[-3000:]
    assert not marker.exists()
    assert not any((new / name).exists() for name in ("csv", "checkpoints", "wandb", "analysis", "run.json", "run.lock"))

    # trusted: it loads (the payload runs), and the run, at the end of training, is left as it was
    proc = run_cli("train", f"resume={run}", "trust_checkpoint=true", cwd=tmp_path)
    assert marker.exists(), "the payload did not run: the refusals above prove nothing"
    assert "has finished training" in proc.stderr and fingerprint(run) == before
