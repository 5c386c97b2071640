"""Training: members learn, data orders and member seeds behave as documented, and the CLI
resumes, runs multiruns, runs DDP under Hydra and logs to W&B offline / not at all."""

import csv
import json
import struct
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from convergent.data import Synthetic
from convergent.ensemble import Ensemble, build_member, member_seeds
from tests.support import run_cli

MODEL = {"name": "alexnet_small", "width": 0.25, "groups": 1, "lrn": "after_pool", "dropout": 0.0, "batch_norm": False}
TINY = ("debug=tiny", "callbacks=none")


pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic(**kw) -> Synthetic:
    options = dict(num_classes=10, in_channels=1, input_size=28, train_size=512, val_size=256, batch_size=32)
    options.update(kw)
    dm = Synthetic(**options)
    dm.setup()
    return dm


def ensemble(k=2, seed=0, data_order="shared", **kw) -> Ensemble:
    return Ensemble(
        model=MODEL,
        num_classes=10,
        in_channels=1,
        input_size=28,
        k=k,
        seed=seed,
        data_order=data_order,
        optim={"name": "adam", "lr": 2e-3},
        **kw,
    )


def trainer(**kw) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(kw)
    return pl.Trainer(**options)


# --- (a) members learn ------------------------------------------------------------------------
@pytest.mark.parametrize("data_order", ["shared", "independent"])
def test_members_beat_chance_clearly(data_order):
    torch.manual_seed(0)
    dm = synthetic()
    ens = ensemble(k=2, data_order=data_order)
    dm.set_order(data_order, ens.seeds)
    # inference_mode=False: metric states reset under inference mode cannot be updated by fit later
    before = trainer(inference_mode=False).validate(ens, datamodule=dm, verbose=False)[0]
    fit = trainer(max_epochs=4)  # 64 steps
    fit.fit(ens, datamodule=dm)
    after = {k: float(v) for k, v in fit.callback_metrics.items()}
    assert fit.global_step == 64
    for i in range(2):
        assert before[f"member{i}/val/acc"] < 0.25, before  # chance is 0.1
        assert after[f"member{i}/val/acc"] > 0.5, after
    assert after["val/loss"] < before["val/loss"] - 0.5


# --- (b) data order ---------------------------------------------------------------------------
def indices_of(dm: Synthetic, epoch: int = 0) -> list:
    sampler = dm.train_dataloader().sampler
    sampler.set_epoch(epoch)
    return list(sampler)


def test_independent_order_differs_between_members_and_is_deterministic():
    seeds = member_seeds(0, 3)
    a, b = synthetic(), synthetic()
    a.set_order("independent", seeds)
    torch.manual_seed(1)
    first = indices_of(a)
    torch.manual_seed(2)  # the order never depends on the global RNG
    b.set_order("independent", seeds)
    assert indices_of(b) == first
    per_member = list(zip(*first))
    assert len(per_member) == 3
    for order in per_member:
        assert sorted(order) == list(range(512))  # every image once per epoch
    assert per_member[0] != per_member[1] and per_member[1] != per_member[2] and per_member[0] != per_member[2]
    assert indices_of(a, epoch=1) != first  # a new shuffle every epoch
    c = synthetic()
    c.set_order("independent", member_seeds(1, 3))
    assert indices_of(c) != first  # another run seed, other orders


def test_independent_batches_carry_each_members_images():
    seeds = member_seeds(0, 2)
    dm = synthetic()
    dm.set_order("independent", seeds)
    order = indices_of(dm)
    dm.train_dataloader().sampler.set_epoch(0)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 2, 1, 28, 28) and y.shape == (32, 2)
    images, labels = dm.train_set.tensors
    for i in range(2):
        idx = torch.tensor([order[j][i] for j in range(32)])
        torch.testing.assert_close(x[:, i], images[idx])
        torch.testing.assert_close(y[:, i], labels[idx])
    ens = ensemble(k=2, data_order="independent").train()
    inputs = ens.member_inputs(x, y)
    assert torch.equal(inputs[0][0], x[:, 0]) and torch.equal(inputs[1][0], x[:, 1])
    assert not torch.equal(inputs[0][0], inputs[1][0])


def test_shared_order_gives_identical_batches():
    dm = synthetic()
    dm.set_order("shared", member_seeds(0, 3))
    order = indices_of(dm)
    assert all(isinstance(i, int) for i in order) and sorted(order) == list(range(512))
    dm.train_dataloader().sampler.set_epoch(0)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28)
    ens = ensemble(k=3).train()
    inputs = ens.member_inputs(x, y)
    assert all(torch.equal(xi, x) and torch.equal(yi, y) for xi, yi in inputs)


class RecordBatches(pl.Callback):
    def __init__(self):
        self.labels = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.labels.append(batch[1].clone())


@pytest.mark.parametrize("data_order", ["shared", "independent"])
def test_orders_through_the_trainer_are_reproducible(data_order):
    """What the members really get in training_step: the same sequence for the same seed, a new
    one every epoch, one per member with `independent`."""
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        dm = synthetic(train_size=128)
        ens = ensemble(k=2, data_order=data_order)
        dm.set_order(data_order, ens.seeds)
        rec = RecordBatches()
        trainer(max_epochs=2, callbacks=[rec], limit_val_batches=0).fit(ens, datamodule=dm)
        runs.append(torch.cat(rec.labels))
    assert torch.equal(runs[0], runs[1])
    labels = runs[0]
    assert len(labels) == 256  # 2 epochs x 128 images
    assert not torch.equal(labels[:128], labels[128:])
    if data_order == "independent":
        assert labels.shape == (256, 2) and not torch.equal(labels[:, 0], labels[:, 1])


# --- (c) member seeds -------------------------------------------------------------------------
def weights(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_members_start_different_and_reproducibly():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    ens = ensemble(k=3, seed=0)
    assert torch.equal(torch.get_rng_state(), state), "building members consumed the global RNG"
    assert ens.seeds == [0, 1, 2] and ens.hparams["seeds"] == [0, 1, 2]
    members = [weights(m) for m in ens.members]
    for a in range(3):
        for b in range(a + 1, 3):
            assert all(not torch.equal(x, y) for x, y in zip(members[a], members[b])), (a, b)
    torch.manual_seed(999)  # a different global RNG state: the same members
    again = ensemble(k=3, seed=0)
    assert all(same(members[i], weights(m)) for i, m in enumerate(again.members))
    other = ensemble(k=3, seed=1)
    assert other.seeds == [1000, 1001, 1002]
    assert not same(members[0], weights(other.members[0]))


def test_a_members_weights_depend_only_on_its_seed():
    four = ensemble(k=4, seed=0)
    two = ensemble(k=2, seed=0)
    assert same(weights(four.members[1]), weights(two.members[1]))
    explicit = ensemble(k=2, seeds=[7, 3])
    swapped = ensemble(k=2, seeds=[3, 7])
    assert same(weights(explicit.members[0]), weights(swapped.members[1]))
    alone = build_member(MODEL, 7, num_classes=10, in_channels=1, input_size=28)
    assert same(weights(explicit.members[0]), weights(alone))


def test_bad_seeds_are_clear_errors():
    with pytest.raises(ValueError, match="ensemble.seeds has 2 entries but ensemble.k=3"):
        member_seeds(0, 3, [1, 2])
    with pytest.raises(ValueError, match="ensemble.seeds must differ"):
        member_seeds(0, 2, [5, 5])


# --- the CLI: resume, ckpt_path, W&B offline and disabled --------------------------------------
def read_csv(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def train_steps(rows) -> list[int]:
    return [int(r["step"]) for r in rows if r.get("train/loss")]


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def wandb_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def wandb_records(run: Path):
    """The records of an offline run's .wandb file (W&B's LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run.glob("*.wandb")
    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def run_record(run: Path):
    return next(r.run for r in wandb_records(run) if r.WhichOneof("record_type") == "run")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """6 steps, then stopped; W&B with no API key and WANDB_MODE unset."""
    tmp = tmp_path_factory.mktemp("resume")
    run_dir = tmp / "run"
    proc = run_cli(
        "train", *TINY, "trainer.max_steps=6", "trainer.max_epochs=3", f"hydra.run.dir={run_dir}",
        cwd=tmp, WANDB_MODE=None, NETRC=str(tmp / "no-netrc"),
    )  # fmt: skip
    rows = read_csv(run_dir)
    saved = tmp / "step6.ckpt"
    saved.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes())
    return tmp, run_dir, proc, rows, saved


@pytest.fixture(scope="module")
def resumed(first_run):
    tmp, run_dir, *_ = first_run
    proc = run_cli("train", f"resume={run_dir}", "trainer.max_steps=12", cwd=tmp)
    return proc


def test_wandb_offline_without_a_key_says_so_once(first_run):
    _tmp, run_dir, proc, _rows, _ = first_run
    output = proc.stdout + proc.stderr
    lines = [line for line in output.splitlines() if "wandb sync" in line]
    assert len(lines) == 1, output[-3000:]
    assert "offline" in lines[0] and "no API key" in lines[0] and str(run_dir / "wandb") in lines[0]
    (run,) = wandb_runs(run_dir)
    assert list(run.glob("*.wandb"))
    assert run_record(run).run_id == json.loads((run_dir / "run.json").read_text())["wandb_id"]


def test_resume_continues_the_step_count(first_run, resumed):
    _tmp, run_dir, _proc, before, saved = first_run
    assert checkpoint_step(saved) == 6
    assert train_steps(before) and max(train_steps(before)) < 6
    after = read_csv(run_dir)
    steps = train_steps(after)
    assert steps[: len(train_steps(before))] == train_steps(before), "the first run's rows were lost"
    new = steps[len(train_steps(before)) :]
    assert new and min(new) > 6 and max(new) <= 12 and max(new) >= 10, steps
    assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 12
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 12
    assert any(r.get("val/acc") for r in after)
    # the same W&B run continues (a second offline segment with the same id)
    runs = wandb_runs(run_dir)
    assert len(runs) == 2 and len({run_record(r).run_id for r in runs}) == 1
    assert "Restored all states from the checkpoint" in resumed.stdout + resumed.stderr


def test_ckpt_path_starts_a_new_run_from_a_checkpoint_with_wandb_disabled(first_run):
    tmp, _run_dir, _proc, _rows, saved = first_run
    new_dir = tmp / "from_ckpt"
    run_cli(
        "train", *TINY, f"ckpt_path={saved}", "trainer.max_steps=8", "trainer.max_epochs=3", f"hydra.run.dir={new_dir}",
        cwd=tmp, WANDB_MODE="disabled",
    )  # fmt: skip
    steps = train_steps(read_csv(new_dir))
    assert steps and min(steps) > 6 and max(steps) <= 8, steps
    assert checkpoint_step(new_dir / "checkpoints" / "last.ckpt") == 8
    assert not (new_dir / "wandb").exists() and not list(tmp.glob("wandb")), "WANDB_MODE=disabled still wrote a W&B run"


# --- the CLI: multirun and DDP ------------------------------------------------------------------
def test_multirun_gives_one_dir_and_one_wandb_run_per_job(tmp_path):
    sweep = tmp_path / "width_sweep"
    run_cli("train", "-m", *TINY, "model.width=0.125,0.25", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    ids = []
    for job, width in zip(jobs, ("0.125", "0.25")):
        assert f"model.width={width}" in (job / ".hydra" / "overrides.yaml").read_text()
        rows = read_csv(job)
        assert train_steps(rows) and any(r.get("val/acc") for r in rows)
        (run,) = wandb_runs(job)
        record = run_record(run)
        assert record.run_group == "width_sweep" and record.project == "convergent"
        assert record.run_id == json.loads((job / "run.json").read_text())["wandb_id"]
        assert any(r.WhichOneof("record_type") == "exit" for r in wandb_records(run)), "wandb.finish() was not called"
        ids.append(record.run_id)
    assert ids[0] != ids[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["width_sweep"]


def test_ddp_cpu_under_multirun_leaves_one_run_dir_written_by_rank_zero(tmp_path):
    """`-m` with the default sweep dir (`multirun/<date>/<time>`): the child process must rerun this
    job in this job's dir. (Lightning's own Hydra launcher reruns the whole command line, so the
    child starts a second multirun in a new time-stamped dir.)"""
    proc = run_cli("train", "-m", *TINY, "trainer=ddp_cpu", cwd=tmp_path, timeout=300)
    output = proc.stdout + proc.stderr
    assert "GLOBAL_RANK: 1" in output and "distributed_backend=gloo" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multirun"]
    (day,) = (tmp_path / "multirun").iterdir()
    sweeps = sorted(day.iterdir())
    assert len(sweeps) == 1, f"child processes created extra dirs: {sweeps}"
    assert sorted(p.name for p in sweeps[0].iterdir()) == ["0", "multirun.yaml"]
    run_dir = sweeps[0] / "0"
    assert list(tmp_path.rglob("metrics.csv")) == [run_dir / "csv" / "metrics.csv"]
    rows = read_csv(run_dir)
    steps = train_steps(rows)
    assert steps == sorted(set(steps)), f"more than one rank wrote the CSV: {steps}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 8  # 256 images / (2 ranks x 32) = 4 steps per epoch, 2 epochs
    assert summary["val/acc"] is not None
    assert len(wandb_runs(run_dir)) == 1
    # the children (hydra.output_subdir=null) left the job's saved config alone
    assert "trainer=ddp_cpu" in (run_dir / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.slow  # ~18 s; the basic launcher's multirun is tested by default
def test_submitit_local_multirun_runs_two_jobs_through_submitit(tmp_path):
    """The cluster path without a cluster: Hydra's submitit launcher submits each job as its own
    process (as submitit_slurm does through sbatch), each with its own run dir and W&B run."""
    sweep = tmp_path / "sweep"
    run_cli(
        "train", "-m", "hydra/launcher=submitit_local", *TINY, "seed=1,2", f"hydra.sweep.dir={sweep}",
        "hydra.launcher.timeout_min=10", cwd=tmp_path, timeout=600,
    )  # fmt: skip
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    assert list(sweep.glob(".submitit/*/*_submitted.pkl")), "the jobs did not go through submitit"
    for job, seed in zip(jobs, ("1", "2")):
        assert f"seed={seed}" in (job / ".hydra" / "overrides.yaml").read_text()
        summary = json.loads((job / "summary.json").read_text())
        assert summary["global_step"] > 0 and summary["val/acc"] is not None
        assert len(wandb_runs(job)) == 1
    ids = {json.loads((job / "run.json").read_text())["wandb_id"] for job in jobs}
    assert len(ids) == 2
