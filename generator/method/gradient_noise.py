"""The `gradient_noise` arm: annealed Gaussian noise in the gradient the optimizer sees."""

import torch

from generator.method.drawn import DrawnNoise
from generator.method.noise import flat_order


class GradientNoise(DrawnNoise):
    """g <- g + eps(t) * xi before each optimizer step (Neelakantan et al. 2015): after the
    backward, DDP's all-reduce, the grad scaler's unscale_ and gradient clipping, so every
    rank adds the same noise to the same gradient and the noise itself is never clipped.
    A step the grad scaler skips is no step: its draw is taken back (the generators' state
    restored; the Philox key is the step's), so the next real step draws what it would have."""

    pairs = None  # (parameter, its slice of the noise buffer), in the flat layout's order

    def noisy_gradients(self, step, lr):
        """Add eps(t) * xi to the chosen parameters' gradients; returns eps."""
        eps = self.draw(step, lr)
        if eps > 0:
            with torch.no_grad():
                for p, noise in self.gradient_pairs():
                    if p.grad is not None:
                        p.grad.add_(noise.view_as(p.grad))
        return eps

    def gradient_pairs(self):
        """(parameter, its slice of the noise buffer) for the chosen parameters, in the flat
        layout's order (flatten_parameters': weights first, otherwise the model's order)."""
        if self.pairs is None:
            chosen, end = [], 0
            for p in flat_order(self.model_params):
                end += p.numel()
                if end > self.n_noise:
                    break
                chosen.append(p)
            self.pairs = list(zip(chosen, self.flat.split([p.numel() for p in chosen])))
        return self.pairs

    def step(self, optimizer_step, step, lr, loss=None, grad_norm=None):
        """The noise into the gradients, then optimizer_step(): (eps, None). optimizer_step()
        returning False means the grad scaler skipped the step: no step, the draw is taken
        back, (None, None)."""
        saved = [g.get_state() for g in self.generators]
        eps = self.noisy_gradients(step, lr)
        if optimizer_step() is False:
            for generator, state in zip(self.generators, saved):
                generator.set_state(state)
            return None, None
        return eps, None
