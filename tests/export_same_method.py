"""The issue's plain loop, with an emitted script's init, data order, optimizer and LR schedule.

    python export_same_method.py SCRIPT MODULE STEPS EPOCHS SEED OUT

trains the unflattened model of SCRIPT (a train_<arm>.py) for STEPS optimizer steps with
AdaptivePerturbation from MODULE (that arm's exported module) and saves the parameters, the
phase changes and the perturbation's state to OUT; tests/test_export.py compares them with
what SCRIPT itself trained. Run as its own process, like the script, so both see the same
thread settings.
"""

import importlib.util
import sys

import torch
import torch.nn.functional as F

from generator.scriptload import arm_data, load_script

script, module, steps, epochs, seed, out = sys.argv[1:]
steps, epochs, seed = int(steps), int(epochs), int(seed)
ns = load_script(script, run_name="perturbgen_test")  # the script's own functions
spec = importlib.util.spec_from_file_location("adaptive_perturbation", module)
ap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ap)

device = torch.device("cpu")
data = arm_data(ns, ns["DATA_ROOT"], False, seed, device)
batch_size = ns["BATCH_SIZE"]
steps_per_epoch = (data.train_size + batch_size - 1) // batch_size
warmup_steps = round(ns["WARMUP_EPOCHS"] * steps_per_epoch)
torch.manual_seed(ns["derived_seed"](seed, "init"))
model = ns["build_model"]()  # not flattened: the module leaves the model as it is
torch.manual_seed(ns["derived_seed"](seed, "dropout", 0))
optimizer = ns["build_optimizer"](model)

perturb = ap.AdaptivePerturbation(model, optimizer, seed=seed)
changes, step = [], 0
for epoch in range(epochs):
    g = torch.Generator().manual_seed(ns["derived_seed"](seed, "data", epoch))
    order = torch.randperm(data.train_size, generator=g)
    for x, y in data.train_batches(order, 0, batch_size, seed, epoch):
        if step == steps:
            break
        lr = ns["lr_at"](step, epochs * steps_per_epoch, warmup_steps, steps_per_epoch)
        for group in optimizer.param_groups:  # the script's schedule, as a user's would be
            group["lr"] = lr
        # the loop, as it stands
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        perturb.step(loss)
        if getattr(perturb, "change", None) is not None:
            changes.append(perturb.change["step"])
        step += 1
torch.save({"model": model.state_dict(), "changes": changes, "steps": perturb.steps}, out)
