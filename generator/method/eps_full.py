"""eps(t) of the `full` arm: a std per detected phase, decaying inside the phase."""

import math


class Epsilon:
    """eps(t) = eps_phase[p] * exp(-decay * t_p), t_p counting steps since p began"""

    needs_detector = True

    def __init__(self, eps_phase, decay):
        self.eps_phase, self.decay = eps_phase, decay

    def __call__(self, step, detector):
        return self.eps_phase[detector.phase] * math.exp(
            -self.decay * (step - detector.phase_start)
        )
