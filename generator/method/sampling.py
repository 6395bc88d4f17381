"""The detector's samples around the optimizer step, for the arms whose eps(t) reads the phase."""

import torch
import torch.distributed as dist

from generator.method.noise import Perturbation


class SampledPerturbation(Perturbation):
    """Perturbation whose step also feeds the phase detector: on every `detector.every`-th
    optimizer step the gradient norm, the norm of the optimizer's own update and the loss,
    taken on rank 0 (after DDP's all-reduce every rank holds the same gradients) and
    decided there; under DDP the phase is broadcast as one integer. Only sample steps
    read anything from the device."""

    def before_step(self, grad_norm=None):
        """On a sample step, before the optimizer step: the gradient norm (the one gradient
        clipping measured, before it clipped, if given) and a snapshot. Only rank 0 samples:
        after DDP's all-reduce every rank holds the same gradients."""
        if self.rank != 0:
            return None
        if grad_norm is None:
            grads = [p.grad for p in self.model_params if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        return grad_norm, self.flat.clone()

    def observe(self, step, sample, loss):
        """After the optimizer step, before the noise: one detector sample, one host sync.
        `loss` is a tensor or a number; under DDP the loss sampled is the mean of the ranks'
        (a collective: every rank comes here on a sample step)."""
        loss = torch.as_tensor(loss, device=self.flat.device).detach().float().reshape(())
        if self.world > 1:
            loss = loss.clone()  # the caller's tensor stays as it is
            dist.all_reduce(loss)
            loss /= self.world
        g = d = None
        if self.rank == 0:
            grad_norm, before = sample
            update_norm = torch.linalg.vector_norm(self.flat - before)
            g, d, loss = torch.stack([grad_norm.float(), update_norm.float(), loss]).tolist()
        return self.decide(step, g, d, loss)

    def decide(self, step, g, d, loss):
        """The detector's decision on rank 0; under DDP broadcast as one integer."""
        change = self.detector.observe(step, g, d, loss) if self.rank == 0 else None
        if self.world > 1:
            phase = torch.tensor([self.detector.phase], device=self.flat.device)
            dist.broadcast(phase, 0)
            if int(phase) != self.detector.phase:
                self.detector.phase, self.detector.phase_start = int(phase), step
        return change

    def step(self, optimizer_step, step, lr, loss, grad_norm=None):
        """optimizer_step(), then (on a sample step) the detector's sample, then the noise, with
        the eps decided after that sample: (eps, phase change or None). optimizer_step()
        returning False means the grad scaler skipped the step, which is no step: no sample,
        no noise, and (None, None) back. `loss` is the step's training loss (a tensor or a
        number), read only on sample steps; grad_norm, if given, the gradient's global norm
        before clipping, which the detector then samples. Sample steps also check that the
        parameters still lie in the flat buffer."""
        sampling = self.detector.due(step)
        if sampling:
            self.check_storage()
        sample = self.before_step(grad_norm) if sampling else None
        if optimizer_step() is False:
            return None, None
        change = self.observe(step, sample, loss) if sampling else None
        return self.apply(step, lr), change
