"""TopActivations against a brute-force sort; crop_patch against direct indexing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convergent.models.receptive_field import ReceptiveField
from convergent.stats.topk import TopActivations, crop_patch, select_top


def _brute_force(acts: np.ndarray, images: np.ndarray, k: int):
    """Per unit: sort every (value, image, y, x) by value desc, then image, y, x asc (np.lexsort)."""
    if acts.ndim == 2:
        acts = acts[:, :, None, None]
    n, c, h, w = acts.shape
    img, ys, xs = np.meshgrid(images, np.arange(h), np.arange(w), indexing="ij")
    values_out = np.full((c, k), -np.inf)
    index_out = np.full((c, k, 3), -1, dtype=np.int64)
    for u in range(c):
        v = acts[:, u].astype(np.float64).ravel()
        order = np.lexsort((xs.ravel(), ys.ravel(), img.ravel(), -v))[:k]
        values_out[u, : len(order)] = v[order]
        index_out[u, : len(order)] = np.stack([img.ravel()[order], ys.ravel()[order], xs.ravel()[order]], 1)
    return values_out, index_out


def _nets(seed: int, n: int = 13):
    g = torch.Generator().manual_seed(seed)
    conv = torch.relu(torch.randn(n, 4, 5, 3, generator=g))
    conv[:, 1] = 0.0  # dead unit: every position ties at 0
    conv[:, 2] = torch.randint(0, 3, (n, 5, 3), generator=g).float()  # heavy ties
    fc = torch.relu(torch.randn(n, 6, generator=g))
    fc[:, 0] = torch.randint(0, 2, (n,), generator=g).float()
    return conv, fc


SPLITS = [[(0, 13)], [(0, 1), (1, 8), (8, 13)], [(i, min(13, i + 2)) for i in range(0, 13, 2)]]


@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize("k", [1, 9, 40])
def test_equals_brute_force_sort_for_batch_splits_and_index_offsets(splits, k):
    conv, fc = _nets(0)
    images = np.array([5, 2, 40, 7, 1000, 3, 11, 12, 0, 99, 31, 8, 64])  # global probe indices, unordered
    top = TopActivations([4, 6], k=k)
    for start, stop in reversed(splits):  # batch order does not matter either
        top.update(conv[start:stop], fc[start:stop], image_index=torch.as_tensor(images[start:stop]))
    for (values, indices), acts in zip(top.compute(), (conv, fc)):
        exp_v, exp_i = _brute_force(acts.numpy(), images, k)
        assert values.shape == (acts.shape[1], k) and indices.shape == (acts.shape[1], k, 3)
        assert indices.dtype == torch.int64
        np.testing.assert_array_equal(values.numpy(), exp_v)
        np.testing.assert_array_equal(indices.numpy(), exp_i)
    if k == 40:  # fc: 13 samples < k -> empty slots
        values, indices = top.compute()[1]
        assert torch.isinf(values[:, 13:]).all() and (indices[:, 13:] == -1).all()
        assert (indices[:, :13, 1:] == 0).all()  # fc position is (0, 0)


def test_large_batch_uses_chunks_and_stays_bounded(monkeypatch):
    import convergent.stats.topk as topk

    monkeypatch.setattr(topk, "_CHUNK_ELEMENTS", 64)  # force many chunks inside one batch
    g = torch.Generator().manual_seed(1)
    acts = torch.relu(torch.randn(20, 8, 6, 7, generator=g)).round(decimals=1)  # ties in every chunk
    images = torch.arange(100, 120)
    top = TopActivations([8], k=5)
    top.update(acts[:11], image_index=images[:11])
    assert top.top_0.shape == (5, 8, 4)  # O(units * k) state
    top.update(acts[11:], image_index=images[11:])
    assert top.top_0.shape == (5, 8, 4)
    values, indices = top.compute()[0]
    exp_v, exp_i = _brute_force(acts.numpy(), images.numpy(), 5)
    np.testing.assert_array_equal(values.numpy(), exp_v)
    np.testing.assert_array_equal(indices.numpy(), exp_i)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_process_shards_merge_exactly_with_repeated_padding_images():
    """What a DDP sync does: stack every rank's state and apply the reduction (select_top)."""
    conv, fc = _nets(2, n=10)
    images = torch.arange(10)
    full = TopActivations([4, 6], k=4)
    full.update(conv, fc, image_index=images)
    # rank 0 gets images 0, 2, 4, 6, 8; rank 1 gets 1, 3, 5, 7, 9 and image 0 again (sampler padding)
    shards = [torch.tensor([0, 2, 4, 6, 8]), torch.tensor([1, 3, 5, 7, 9, 0])]
    ranks = []
    for shard in shards:
        m = TopActivations([4, 6], k=4)
        m.update(conv[shard], fc[shard], image_index=shard)
        ranks.append(m)
    merged = TopActivations([4, 6], k=4)
    for i in range(2):
        stacked = torch.stack([r.metric_state[f"top_{i}"] for r in ranks])
        setattr(merged, f"top_{i}", merged._reductions[f"top_{i}"](stacked))
    for (v, idx), (ev, eidx) in zip(merged.compute(), full.compute()):
        assert torch.equal(v, ev) and torch.equal(idx, eidx)
    ranks[0].merge_state(ranks[1])  # torchmetrics' own merge path
    for (v, idx), (ev, eidx) in zip(ranks[0].compute(), full.compute()):
        assert torch.equal(v, ev) and torch.equal(idx, eidx)


def test_forward_accumulates_like_update():
    conv, fc = _nets(3, n=8)
    a, b = TopActivations([4, 6], k=3), TopActivations([4, 6], k=3)
    for s in (slice(0, 3), slice(3, 8)):
        idx = torch.arange(8)[s]
        a.update(conv[s], fc[s], image_index=idx)
        b(conv[s], fc[s], image_index=idx)
    for (v, i), (w, j) in zip(a.compute(), b.compute()):
        assert torch.equal(v, w) and torch.equal(i, j)


def test_select_top_orders_and_deduplicates():
    inf = float("-inf")
    cand = torch.tensor(
        [[[1.0, 3, 0, 0]], [[2.0, 5, 1, 1]], [[2.0, 4, 9, 9]], [[2.0, 5, 1, 1]], [[inf, -1, -1, -1]], [[1.0, 3, 0, 1]]]
    )
    top = select_top(cand, 5)[:, 0]
    assert top.tolist() == [[2.0, 4, 9, 9], [2.0, 5, 1, 1], [1.0, 3, 0, 0], [1.0, 3, 0, 1], [inf, -1, -1, -1]]


def test_rejects_bad_inputs():
    top = TopActivations([3], k=2)
    with pytest.raises(ValueError):
        top.update(torch.zeros(4, 3, 2, 2), image_index=torch.arange(3))
    with pytest.raises(ValueError):
        top.update(torch.zeros(4, 5), image_index=torch.arange(4))


def _expected_patch(image: torch.Tensor, field: ReceptiveField, y: int, x: int, fill: float) -> np.ndarray:
    """Pixel (i, j) of the patch is image pixel (centre - half + i, centre - half + j), else fill."""
    img = image.numpy()
    _, h, w = img.shape
    half = (field.size - 1) // 2
    r = field.start + y * field.jump - half + np.arange(field.size)
    q = field.start + x * field.jump - half + np.arange(field.size)
    rr, qq = np.meshgrid(r, q, indexing="ij")
    inside = (rr >= 0) & (rr < h) & (qq >= 0) & (qq < w)
    gathered = img[:, np.clip(rr, 0, h - 1), np.clip(qq, 0, w - 1)]
    return np.where(inside[None], gathered, fill)


@pytest.mark.parametrize(
    "field, shape, positions",
    [
        (ReceptiveField(11, 4, 5), (3, 227, 227), [(0, 0), (27, 13), (54, 54)]),
        (ReceptiveField(163, 16, 17), (3, 224, 224), [(0, 0), (6, 6), (11, 0), (11, 11)]),
        (ReceptiveField(5, 1, 0), (1, 28, 20), [(0, 0), (14, 10), (27, 19)]),
        (ReceptiveField(43, 4, 3), (1, 28, 28), [(0, 5), (3, 3)]),
    ],
)
def test_crop_patch_equals_direct_indexing_and_pads_at_borders(field, shape, positions):
    image = torch.arange(int(np.prod(shape)), dtype=torch.float64).reshape(shape) + 1.0
    for y, x in positions:
        patch = crop_patch(image, field, y, x, fill=-7.0)
        assert patch.shape == (shape[0], field.size, field.size)
        np.testing.assert_array_equal(patch.numpy(), _expected_patch(image, field, y, x, -7.0))
        rows, cols = field.box(y, x, shape[1])[0], field.box(y, x, shape[2])[1]
        assert (patch != -7.0).sum() == shape[0] * (rows.stop - rows.start) * (cols.stop - cols.start)


# --- real two-process sync (gloo): TopActivations, UnitBins and JointHistogram ---------------


def _ddp_data():
    g = torch.Generator().manual_seed(7)
    conv = torch.relu(torch.randn(10, 3, 4, 4, generator=g)).round(decimals=1)
    fc = torch.relu(torch.randn(10, 5, generator=g))
    return conv, fc


def _ddp_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from convergent.stats.histogram import JointHistogram, UnitBins

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        conv, fc = _ddp_data()
        # DistributedSampler-like split with padding: rank 1 repeats image 0
        shard = torch.tensor([[0, 2, 4, 6, 8], [1, 3, 5, 7, 9, 0]][rank])
        shard_fc = shard[:5]  # histograms count samples: the padding image must not be counted twice
        top = TopActivations([3, 5], k=4)
        top.update(conv[shard], fc[shard], image_index=shard)
        bins = UnitBins([3, 5])
        bins.update(conv[shard_fc].flatten(2).mean(2), fc[shard_fc])
        edges = bins.compute()
        joint = JointHistogram([3, 5], edges)
        joint.update(conv[shard_fc].flatten(2).mean(2), fc[shard_fc])
        result = {"top": top.compute(), "edges": edges, "joint": joint.compute()}
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~10-40 s of imports
def test_ddp_gloo_sync_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    from convergent.stats.histogram import JointHistogram, UnitBins

    out = str(tmp_path / "rank0.pt")
    mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path / 'init'}", out), nprocs=2, join=True)
    got = torch.load(out)
    conv, fc = _ddp_data()
    images = torch.arange(10)
    top = TopActivations([3, 5], k=4)
    top.update(conv, fc, image_index=images)
    for (v, i), (ev, ei) in zip(got["top"], top.compute()):
        assert torch.equal(v, ev) and torch.equal(i, ei)
    pooled = conv.flatten(2).mean(2)
    bins = UnitBins([3, 5])
    bins.update(pooled, fc)
    edges = bins.compute()
    for e, ee in zip(got["edges"], edges):
        assert torch.equal(e, ee)
    joint = JointHistogram([3, 5], edges)
    joint.update(pooled, fc)
    assert torch.equal(got["joint"][(0, 1)], joint.compute()[(0, 1)])
