"""Run by tests/test_ddp.py: anneal a tiny model for a few steps, under DDP (torchrun, gloo) or in one process
with the same global batch; write the final decisions and weights to OUT."""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import fermigates as fg


def main(out: str, steps: int = 12) -> None:
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(steps * 16, 8, generator=g), torch.randint(0, 3, (steps * 16,), generator=g)
    fg.convert_to_fermi(model, fg.FermiConfig(granularity="channel", target_sparsity=0.5), example_inputs=x[:1])
    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    opt = fg.FermiAnnealer(torch.optim.SGD(model.parameters(), lr=0.05), model, total_steps=steps)
    for step in range(steps):
        xb, yb = x[step * 16:(step + 1) * 16], y[step * 16:(step + 1) * 16]
        xb, yb = xb.chunk(world)[rank], yb.chunk(world)[rank]  # each process its share of the global batch
        loss = F.cross_entropy(net(xb), yb) + opt.sparsity_loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
    if rank == 0:
        gates = fg.methods.fermi.model.all_gates(model)
        torch.save({"keep": [g.keep_units() for g in gates],
                    "state": {k: v for k, v in model.state_dict().items()}}, out)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
