"""eps(t) of the `phase_only` arm: one noise std per detected phase."""


class Epsilon:
    """eps(t) = eps_phase[p], p the detector's phase"""

    needs_detector = True

    def __init__(self, eps_phase):
        self.eps_phase = eps_phase

    def __call__(self, step, detector):
        return self.eps_phase[detector.phase]
