"""eps(t) of the `schedule_only` arm: exponential decay over the optimizer steps."""

import math


class Epsilon:
    """eps(t) = eps_base * exp(-decay * t), t counting optimizer steps from 0"""

    needs_detector = False

    def __init__(self, eps_base, decay):
        self.eps_base, self.decay = eps_base, decay

    def __call__(self, step, detector):
        return self.eps_base * math.exp(-self.decay * step)
