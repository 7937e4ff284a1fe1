"""Run by tests/test_distributed.py: 2 gloo processes on one machine.

usage: python ddp_zero_fsdp.py {ddp,zero,fsdp} PORT
Prints OK from rank 0 when every check passes; any failure raises.
"""
import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyopt

STEPS = 5


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def batches(world):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4 * world, 8, generator=g), torch.randn(4 * world, 4, generator=g))
            for _ in range(STEPS)]


def single_process_reference(world):
    m = model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for x, y in batches(world):
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()
    return m


def local(x, rank, world):
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n]


def run_ddp(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP
    m = DDP(model())
    opt = pyopt.optim.AdamW(m.parameters(), lr=1e-2)
    for x, y in batches(world):
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(local(x, rank, world)), local(y, rank, world)).backward()
        opt.step()
    ref = single_process_reference(world)
    torch.testing.assert_close(list(m.module.parameters()), list(ref.parameters()),
                               rtol=1e-5, atol=1e-6)


def run_zero(rank, world):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP
    m = DDP(model())
    opt = ZeroRedundancyOptimizer(m.parameters(), optimizer_class=pyopt.optim.AdamW, lr=1e-2)
    m_ref = DDP(model())
    opt_ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-2)
    for x, y in batches(world):
        for mm, oo in ((m, opt), (m_ref, opt_ref)):
            oo.zero_grad()
            torch.nn.functional.mse_loss(mm(local(x, rank, world)), local(y, rank, world)).backward()
            oo.step()
    torch.testing.assert_close(list(m.module.parameters()), list(m_ref.module.parameters()),
                               rtol=1e-5, atol=1e-6)
    opt.consolidate_state_dict(to=0)
    sd = opt.state_dict() if rank == 0 else None
    if rank == 0:
        ref = opt_ref.state_dict()
        assert sorted(sd["state"]) == sorted(ref["state"])
        for k, st in sd["state"].items():
            for key, v in st.items():
                torch.testing.assert_close(v, ref["state"][k][key], rtol=1e-5, atol=1e-6)
    # and it loads back into a ZeRO pyopt optimizer; constructing and loading
    # are collective, so every rank gets the consolidated state and takes part
    box = [sd]
    dist.broadcast_object_list(box, src=0)
    opt2 = ZeroRedundancyOptimizer(m.parameters(), optimizer_class=pyopt.optim.AdamW, lr=1e-2)
    opt2.load_state_dict(box[0])


def run_fsdp(rank, world):
    from torch.distributed.fsdp import fully_shard
    m, m_ref = model(), model()
    for mm in (m, m_ref):
        for layer in mm:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(mm)
    opt = pyopt.optim.AdamW(m.parameters(), lr=1e-2)
    opt_ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-2)
    for x, y in batches(world):
        for mm, oo in ((m, opt), (m_ref, opt_ref)):
            oo.zero_grad()
            torch.nn.functional.mse_loss(mm(local(x, rank, world)), local(y, rank, world)).backward()
            oo.step()
    for a, b in zip(m.parameters(), m_ref.parameters()):
        torch.testing.assert_close(a.to_local(), b.to_local(), rtol=1e-5, atol=1e-6)
    for a, b in zip(opt.state.values(), opt_ref.state.values()):
        torch.testing.assert_close(a["exp_avg"].to_local(), b["exp_avg"].to_local(),
                                   rtol=1e-5, atol=1e-6)


def worker(rank, world, mode, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        {"ddp": run_ddp, "zero": run_zero, "fsdp": run_fsdp}[mode](rank, world)
        dist.barrier()
        if rank == 0:
            print("OK", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(2, sys.argv[1], int(sys.argv[2])), nprocs=2, join=True)
