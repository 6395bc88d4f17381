"""Per-step cost of every arm against `baseline`, measured side by side in one process.

    python benchmarks/overhead.py                  # both models, the defaults below
    python benchmarks/overhead.py --model cnn1d --rounds 5 --steps 60

Each arm's training step is taken from its generated script (generated/<spec>/train_<arm>.py):
forward, loss, backward, then `optimizer.step()` (baseline) or the arm's
`Perturbation.step(optimizer.step, ...)` (the same torch optimizer step on the same flat
parameter layout, the detector sample on sample steps, the noise). Arms run in
interleaved rounds, so that slow drift of the machine hits every arm alike; the table gives
each arm's median step time over the rounds and its ratio to baseline's. Data are random
tensors of the spec's shape (the data pipeline is the same in every arm).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from generator.scriptload import load_script

REPO = Path(__file__).resolve().parent.parent
ARMS = ("baseline", "fixed", "phase_only", "schedule_only", "full")
MODELS = {  # name: (generated spec folder, batch size)
    "cnn1d": ("mnist1d_cnn", 128),
    "resnet18": ("cifar10_resnet18", 32),
}


class Arm:
    """One arm's training step, built from its generated script, on random data."""

    def __init__(self, spec, arm, batch, kernel, device="cpu", folder=REPO / "generated"):
        ns = load_script(str(Path(folder) / spec / f"train_{arm}.py"), run_name="bench")
        device = torch.device(device)
        torch.manual_seed(0)
        self.model = ns["build_model"]().to(device)
        ns["flatten_parameters"](self.model)  # as the script does, in every arm
        self.lr = ns["LR"]
        self.perturbation = None
        if "make_perturbation" in ns:
            self.perturbation = ns["make_perturbation"](self.model, 0, device, kernel)
        self.optimizer = ns["build_optimizer"](self.model)
        self.x = torch.randn(batch, *ns["INPUT_SHAPE"], device=device)
        self.y = torch.randint(ns["NUM_CLASSES"], (batch,), device=device)
        self.step_index = 0

    def step(self):
        logits = self.model(self.x)
        loss = F.cross_entropy(logits, self.y)
        loss_value = loss.item()  # the training loop's one sync per step
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.perturbation is None:
            self.optimizer.step()
        else:
            self.perturbation.step(self.optimizer.step, self.step_index, self.lr, loss_value)
        self.step_index += 1


def measure(name, rounds, steps, kernel):
    spec, batch = MODELS[name]
    arms = {arm: Arm(spec, arm, batch, kernel) for arm in ARMS}
    for arm in arms.values():  # warm-up: allocator, first-touch, lazy inits
        for _ in range(2):
            arm.step()
    times = {name: [] for name in arms}
    for _ in range(rounds):
        for arm_name, arm in arms.items():
            start = time.perf_counter()
            for _ in range(steps):
                arm.step()
            times[arm_name].append((time.perf_counter() - start) / steps)
    base = statistics.median(times["baseline"])
    print(
        f"\n{name} ({spec}, batch {batch}, {kernel} noise kernel): median of {rounds} "
        f"rounds x {steps} steps, {torch.get_num_threads()} threads"
    )
    print("  arm             ms/step   ratio to baseline")
    for arm_name, values in times.items():
        median = statistics.median(values)
        print(f"  {arm_name:14s} {1000 * median:8.2f}   {median / base:6.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per arm per round (default 40 for cnn1d, 3 for resnet18)",
    )
    parser.add_argument("--kernel", choices=("torch", "triton"), default="torch")
    args = parser.parse_args()
    for name in MODELS if args.model == "all" else [args.model]:
        steps = args.steps or {"cnn1d": 40, "resnet18": 3}[name]
        measure(name, args.rounds, steps, args.kernel)


if __name__ == "__main__":
    main()
