"""An example data factory: factory(root, **args) -> (train, test) map-style Datasets.

Stripes: grey images of oriented stripes; the class is the orientation. Made locally from a
fixed seed (no download); `root` is unused because nothing is cached.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset


class Stripes(Dataset):
    """`size` images of shape [1, pixels, pixels]: sin stripes at one of `classes` angles,
    random phase and frequency, plus Gaussian noise. Example i is the same on every call."""

    def __init__(self, size, classes, pixels, noise, seed):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(classes, (size,), generator=g)
        angle = self.labels.float() * math.pi / classes
        phase = torch.rand(size, generator=g) * 2 * math.pi
        freq = 0.6 + 0.4 * torch.rand(size, generator=g)
        grid = torch.arange(pixels, dtype=torch.float32)
        yy, xx = torch.meshgrid(grid, grid, indexing="ij")
        along = xx * angle.cos().view(-1, 1, 1) + yy * angle.sin().view(-1, 1, 1)
        images = torch.sin(freq.view(-1, 1, 1) * along + phase.view(-1, 1, 1))
        images += noise * torch.randn(images.shape, generator=g)
        self.images = images.unsqueeze(1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], int(self.labels[index])


def make_splits(root, train_size=1024, test_size=256, classes=4, pixels=16, noise=0.5):
    """(train, test): validation is carved from train by perturbgen's fixed split."""
    return (
        Stripes(train_size, classes, pixels, noise, seed=1),
        Stripes(test_size, classes, pixels, noise, seed=2),
    )
