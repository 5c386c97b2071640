"""ensemble.vectorize=true evaluates all members in one vmapped call; results must equal the loop's."""

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from convergent.ensemble import Ensemble
from convergent.vectorized import StackedMembers

K, B, CLASSES = 3, 4, 10
TAPS = ["conv1", "conv2", "conv5", "fc6", "fc8"]
VARIANTS = [
    {},
    {"groups": 2, "lrn": "before_pool"},
    {"groups": 2, "lrn": "none"},
    {"batch_norm": True},
]


pytestmark = pytest.mark.usefixtures("one_thread")


def ensemble(vectorize: bool, data_order: str = "shared", dtype=torch.float64, **model) -> Ensemble:
    options = {"name": "alexnet_small", "width": 0.25, "dropout": 0.0, **model}
    ens = Ensemble(
        options,
        CLASSES,
        1,
        28,
        k=K,
        seed=3,
        data_order=data_order,
        vectorize=vectorize,
        optim={"name": "sgd", "lr": 0.05, "momentum": 0.9},
    )
    return ens.to(dtype)


def batch(data_order: str, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, K) if data_order == "independent" else (B,)
    return torch.randn(*shape, 1, 28, 28, generator=g, dtype=dtype), torch.randint(0, CLASSES, shape, generator=g)


def state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_close_dicts(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(
            a[name], b[name], atol=atol, rtol=0, check_dtype=False, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("model", VARIANTS, ids=["default", "groups2_lrn_before", "groups2_no_lrn", "batch_norm"])
@pytest.mark.parametrize("data_order", ["shared", "independent"])
def test_losses_and_gradients_match_loop(model, data_order):
    loop, vec = ensemble(False, data_order, **model), ensemble(True, data_order, **model)
    vec.load_state_dict(loop.state_dict())
    x, y = batch(data_order)
    losses, grads, buffers = [], [], []
    for ens in (loop, vec):
        ens.train()
        losses.append(torch.stack(ens.member_losses((x, y))))
        losses[-1].sum().backward()
        grads.append({n: p.grad.clone() for n, p in ens.members.named_parameters()})
        buffers.append(state(ens.members))  # batch norm running statistics updated by the step
    assert losses[1].shape == (K,)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=0)
    assert_close_dicts(grads[0], grads[1])
    assert_close_dicts(buffers[0], buffers[1])
    assert all(g.abs().sum() > 0 for g in grads[1].values())


@pytest.mark.parametrize("model", VARIANTS, ids=["default", "groups2_lrn_before", "groups2_no_lrn", "batch_norm"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_logits_and_taps_match_loop(model, mode):
    members = ensemble(False, **model).members
    members.train(mode == "train")
    x, _ = batch("shared")
    reference = copy.deepcopy(members)  # batch norm buffers: both paths start from the same state
    logits, taps = StackedMembers(members)(members, x, taps=TAPS)
    assert logits.shape == (K, B, CLASSES) and len(taps) == K
    for i, net in enumerate(reference):
        want_logits, want_taps = net(x, taps=TAPS)
        torch.testing.assert_close(logits[i], want_logits, atol=1e-5, rtol=0)
        assert list(taps[i]) == TAPS
        assert_close_dicts(taps[i], want_taps)
    assert_close_dicts(state(members), state(reference))  # batch norm running statistics


def test_independent_member_dim_and_dropout_masks_per_member():
    members = ensemble(False, dropout=0.5).members.eval()
    x, _ = batch("independent")
    stacked = StackedMembers(members)
    logits = stacked(members, x, member_dim=1)
    for i, net in enumerate(members):
        torch.testing.assert_close(logits[i], net(x[:, i]), atol=1e-5, rtol=0)
    # Training mode with dropout: members (with identical weights) draw different masks.
    same = torch.nn.ModuleList(copy.deepcopy(members[0]) for _ in range(K)).train()
    taps = stacked(same, x[:, 0], taps=["fc7"])[1]
    out = stacked(same, x[:, 0])
    assert not torch.allclose(out[0], out[1])
    assert taps[0]["fc7"].shape == (B, same[0].layer_width("fc7"))
    with pytest.raises(ValueError, match="member_dim"):
        stacked(members, x[:, :2], member_dim=1)


def test_members_of_different_architectures_are_refused():
    a = ensemble(False).members[0]
    b = ensemble(False, groups=2).members[0]
    with pytest.raises(ValueError, match="one architecture"):
        StackedMembers([a, b])


@pytest.mark.parametrize("model", [{}, {"batch_norm": True}], ids=["default", "batch_norm"])
@pytest.mark.parametrize("data_order", ["shared", "independent"])
def test_two_lightning_steps_equal_loop(model, data_order):
    # float64: with batch norm over 4 images float32 rounding alone moves the weights by ~1e-4.
    x, y = batch(data_order)
    xv, yv = batch("shared", seed=1)
    results = []
    for vectorize in (False, True):
        torch.manual_seed(0)
        ens = ensemble(vectorize, data_order, **model)
        trainer = pl.Trainer(
            max_steps=2,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            precision="64-true",
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        train = DataLoader(TensorDataset(torch.cat([x, x]), torch.cat([y, y])), batch_size=B)
        trainer.fit(ens, train, DataLoader(TensorDataset(xv, yv), batch_size=B))
        results.append((state(ens.members), {k: v.clone() for k, v in trainer.callback_metrics.items()}))
    (loop, loop_metrics), (vec, vec_metrics) = results
    first = ensemble(False, data_order, **model)
    assert any(not torch.equal(loop[n], v) for n, v in state(first.members).items())  # the steps did train
    assert_close_dicts(loop, vec)
    assert loop_metrics.keys() == vec_metrics.keys() and "member0/val/acc" in vec_metrics
    assert_close_dicts(loop_metrics, vec_metrics)
