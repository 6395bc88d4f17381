"""eps(t) of the `gradient_noise` arm: the annealed gradient-noise std of Neelakantan et al.
(2015), sigma_t^2 = eta / (1 + t)^gamma; the noise goes into the gradient (GradientNoise)."""

import math


class Epsilon:
    """eps(t) = sqrt(eta / (1 + t)^gamma), t counting optimizer steps from 0"""

    needs_detector = False

    def __init__(self, noise_eta, noise_gamma):
        self.eta, self.gamma = noise_eta, noise_gamma

    def __call__(self, step, detector):
        return math.sqrt(self.eta / (1 + step) ** self.gamma)
