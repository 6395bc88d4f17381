"""The `anti_pgd` arm: anticorrelated perturbation, theta receives xi_{t+1} - xi_t."""

import torch

from generator.method.drawn import DrawnNoise


class AntiPGD(DrawnNoise):
    """After each real optimizer step theta <- theta + (xi_{t+1} - xi_t), xi ~ N(0, eps^2 I)
    i.i.d. (Orvieto et al. 2022), xi_0 = 0: successive perturbations have covariance
    -eps^2 I and the noise does not accumulate (theta stays within one xi of the noise-free
    path). xi_t is the noise buffer `self.flat`, kept in checkpoints."""

    last = 0.0  # the eps that xi_t was drawn with (0: xi_t = 0)

    @torch.no_grad()
    def apply(self, step, lr):
        if self.last > 0:
            self.theta.sub_(self.flat)  # take xi_t out
        eps = self.draw(step, lr)  # xi_{t+1}
        if eps > 0:
            self.theta.add_(self.flat)
        self.last = eps
        return eps

    def state_dict(self):
        return {**super().state_dict(), "xi": self.flat.clone(), "xi_eps": self.last}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.flat.copy_(state["xi"])
        self.last = state["xi_eps"]
