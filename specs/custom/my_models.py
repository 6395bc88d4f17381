"""An example model factory: factory(input_shape, num_classes, **args) -> nn.Module."""

from __future__ import annotations

import torch.nn as nn


def make_net(input_shape, num_classes, width=16, depth=2):
    """A small 2-D convnet: `depth` 3x3 conv + ReLU blocks of `width` channels, each halving
    the image, then global average pooling and a linear head."""
    channels = input_shape[0]
    layers = []
    for _ in range(depth):
        layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.ReLU()]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)
