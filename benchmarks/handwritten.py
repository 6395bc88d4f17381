"""A plain, hand-written PyTorch loop for the MNIST-1D CNN: the yardstick for the generated one.

    python benchmarks/handwritten.py --arm baseline --epochs 60 --data-root data
    python benchmarks/handwritten.py --arm fixed --epochs 60 --data-root data

It does the work of generated/mnist1d_cnn/train_<arm>.py and nothing more that a researcher
would leave out of a quick script: the same data (the cached data/mnist1d.pt that the generated
script makes; run it once first), the same CNN, SGD with momentum and weight decay, the cosine
learning rate set per step, one validation pass per epoch, and for `fixed` Gaussian noise of
standard deviation EPS added to every parameter after each optimizer step. No checkpoints,
no metrics file, but the running train loss and accuracy and the validation loss and
accuracy that a researcher prints. It prints one JSON line: the elapsed seconds at the end of each epoch, taken
where the generated script takes its `elapsed_s`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

LR, MOMENTUM, WEIGHT_DECAY, BATCH, WIDTH, EPS = 0.1, 0.9, 1e-4, 128, 25, 1e-3


class CNN(nn.Module):
    def __init__(self, length=40, width=WIDTH, classes=10):
        super().__init__()
        self.conv1 = nn.Conv1d(1, width, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(width, width, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(width, width, 3, stride=2, padding=1)
        for _ in range(3):
            length = (length - 1) // 2 + 1
        self.head = nn.Linear(width * length, classes)

    def forward(self, x):
        x = F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x))))))
        return self.head(x.flatten(1))


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--arm", choices=("baseline", "fixed"), default="baseline")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default="data")
    args = parser.parse_args(argv)

    d = torch.load(Path(args.data_root) / "mnist1d.pt", weights_only=True)
    x, y, x_val, y_val = d["x"], d["y"], d["x_test"], d["y_test"]
    torch.manual_seed(args.seed)
    model = CNN()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    noise = torch.Generator().manual_seed(args.seed + 1)
    steps_per_epoch = math.ceil(len(x) / BATCH)
    total = args.epochs * steps_per_epoch
    step, ends = 0, []
    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x))
        train_loss = train_correct = 0.0
        for i in range(0, len(x), BATCH):
            idx = order[i : i + BATCH]
            for group in opt.param_groups:
                group["lr"] = LR * 0.5 * (1 + math.cos(math.pi * step / total))
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            train_loss += loss.item() * len(idx)  # the usual running loss and accuracy
            train_correct += (logits.argmax(1) == y[idx]).sum().item()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if args.arm == "fixed":
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(torch.randn(p.shape, generator=noise), alpha=EPS)
            step += 1
        model.eval()
        correct = val_loss = 0.0
        with torch.no_grad():
            for i in range(0, len(x_val), BATCH):
                logits = model(x_val[i : i + BATCH])
                val_loss += F.cross_entropy(logits, y_val[i : i + BATCH], reduction="sum").item()
                correct += (logits.argmax(1) == y_val[i : i + BATCH]).sum().item()
        ends.append(time.perf_counter() - started)
    print(json.dumps({"arm": args.arm, "val_acc": correct / len(x_val), "elapsed_s": ends}))


if __name__ == "__main__":
    main()
