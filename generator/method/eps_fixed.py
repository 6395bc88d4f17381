"""eps(t) of the `fixed` arm: one noise std throughout."""


class Epsilon:
    """eps(t) = eps_fixed"""

    needs_detector = False

    def __init__(self, eps_fixed):
        self.eps_fixed = eps_fixed

    def __call__(self, step, detector):
        return self.eps_fixed
