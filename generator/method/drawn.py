"""Noise drawn into a buffer of its own, for the peers whose noise is not simply added to the
parameters (gradient noise, anti-PGD): the same streams and kernels as Perturbation's."""

import torch

from generator.method.noise import NOISE_STREAMS, Perturbation


class DrawnNoise(Perturbation):
    """A Perturbation whose draw lands in `self.flat`, a zeroed buffer the size of the chosen
    parameters, instead of in the parameters; `self.theta` is the chosen parameters (flat).
    The generators, their seeds, the Philox key and the checkpointed generator state are
    Perturbation's own, so the noise stream is the same one the other arms draw."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.theta = self.flat[: self.n_noise]
        self.flat = torch.zeros_like(self.theta)
        if self.kernel == "torch":
            self.slices = [
                (generator, scratch, target)
                for (generator, scratch, _), target in zip(
                    self.slices, self.flat.chunk(NOISE_STREAMS), strict=True
                )
            ]

    def draw(self, step, lr):
        """self.flat = eps(t) * xi (left as it is when eps is 0); returns eps."""
        self.flat.zero_()
        return Perturbation.apply(self, step, lr)
