"""eps(t) of the `anti_pgd` arm: the std sigma of Orvieto et al.'s (2022) xi_t ~ N(0, sigma^2 I),
whose increments xi_{t+1} - xi_t the parameters receive (AntiPGD)."""


class Epsilon:
    """eps(t) = sigma, the std of xi_t; theta receives xi_{t+1} - xi_t"""

    needs_detector = False

    def __init__(self, sigma):
        self.sigma = sigma

    def __call__(self, step, detector):
        return self.sigma
