"""The issue's loop under DDP, two ranks on gloo, each on its own batches:

    torchrun --nproc_per_node 2 export_ddp.py MODULE_DIR OUT

Rank 0 writes OUT (JSON): each rank's parameters (as a hash), phase and phase start, so
tests/test_export.py can check that the replicas stayed identical and shared the phase."""

import gc
import hashlib
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, sys.argv[1])
from adaptive_perturbation import AdaptivePerturbation  # noqa: E402

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)  # the same init on every rank
model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
ddp = torch.nn.parallel.DistributedDataParallel(model)
optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
perturb = AdaptivePerturbation(ddp, optimizer, seed=0, every=1, window=4, patience=1)
for i in range(40):
    g = torch.Generator().manual_seed(1000 * rank + i)  # each rank its own data
    x, y = torch.randn(16, 6, generator=g), torch.randint(3, (16,), generator=g)
    optimizer.zero_grad()
    loss = F.cross_entropy(ddp(x), y)
    loss.backward()
    optimizer.step()
    perturb.step(loss)
flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
mine = {
    "params": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
    "phase": perturb.phase,
    "phase_start": perturb.detector.phase_start,
}
replicas = [None, None]
dist.all_gather_object(replicas, mine)
if rank == 0:
    with open(sys.argv[2], "w") as f:
        json.dump(replicas, f)
# as the scripts do: free DDP's reducer (a reference cycle) while the group still exists,
# and let no rank leave while the other still talks to it
del ddp, perturb
gc.collect()
dist.barrier()
dist.destroy_process_group()
