"""Two processes (gloo) give the same statistics as one: every state is a sum."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from convergent.stats import Moments


def data():
    g = torch.Generator().manual_seed(0)
    return [torch.relu(torch.randn(30, 5, 4, 4, generator=g) + 0.5) for _ in range(3)]


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        acts = data()
        m = Moments([5, 5, 5], pairs=[(0, 1), (1, 2)])
        lo, hi = (0, 11) if rank == 0 else (11, 30)  # unequal shards
        for start in range(lo, hi, 4):
            m.update(*[a[start : min(start + 4, hi)] for a in acts])
        st = m.compute()  # sum-reduced across both processes
        grouped = Moments([5, 5, 5], pairs=[(0, 1), (1, 2)], groups=4)
        for start in range(lo, hi, 4):
            grouped.update(*[a[start : min(start + 4, hi)] for a in acts], group=start)
        g = grouped.compute_groups()
        if rank == 0:
            torch.save({"n": st.n, "cov01": st.cov(0, 1), "cov22": st.cov(2, 2), "qx": st.qx[(2, 1)], "qq": st.qq[(1, 2)],
                        "g_n": g.n, "g_cov12": g.leave_out(1).cov(1, 2)}, out)  # fmt: skip
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(worker, args=(2, free_port(), out), nprocs=2, join=True)
    got = torch.load(out)
    m = Moments([5, 5, 5], pairs=[(0, 1), (1, 2)])
    m.update(*data())
    st = m.compute()
    assert got["n"] == st.n == 30 * 16
    torch.testing.assert_close(got["cov01"], st.cov(0, 1), atol=1e-9, rtol=0)
    torch.testing.assert_close(got["cov22"], st.cov(2, 2), atol=1e-9, rtol=0)
    torch.testing.assert_close(got["qx"], st.qx[(2, 1)], atol=1e-9, rtol=1e-12)
    grouped = Moments([5, 5, 5], pairs=[(0, 1), (1, 2)], groups=4)
    grouped.update(*data(), group=0)
    g = grouped.compute_groups()
    torch.testing.assert_close(got["g_n"], g.n, atol=0, rtol=0)  # images i % 4 == g, whichever process saw them
    torch.testing.assert_close(got["g_cov12"], g.leave_out(1).cov(1, 2), atol=1e-9, rtol=0)
    torch.testing.assert_close(got["qq"], st.qq[(1, 2)], atol=1e-9, rtol=1e-12)
