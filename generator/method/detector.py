"""The phase detector: samples of training dynamics in, a phase out."""

import math

EXPLORATION, CONVERGENCE, FINE_TUNING = 0, 1, 2
PHASES = ("exploration", "convergence", "fine_tuning")


class PhaseDetector:
    """Classifies training into exploration, convergence and fine-tuning.

    Every `every` optimizer steps it takes one sample: the gradient norm g, the norm d of the
    optimizer's own update (noise excluded) and the loss L. Over the last `window` samples:
        grad_var    = variance of g
        loss_smooth = mean |L_i - 2 L_(i-1) + L_(i-2)|
        param_delta = mean of d
    With threshold_mode "relative" each is divided by its value over the first full window,
    so the thresholds are ratios. The vote (the seed paper's tree):
        grad_var > tau1 and param_delta > tau2  -> exploration
        grad_var < tau3 and param_delta < tau4  -> fine-tuning
        otherwise                               -> convergence
    (with tau_smooth set, exploration also needs loss_smooth above it, fine-tuning below).
    The phase is exploration until the window is full; a new phase is adopted after
    `patience` consecutive votes for it; with `monotonic`, phases only advance. Non-finite
    samples are dropped.
    """

    def __init__(
        self,
        every,
        window,
        threshold_mode,
        tau1,
        tau2,
        tau3,
        tau4,
        tau_smooth,
        patience,
        monotonic,
    ):
        self.every, self.window, self.mode = every, window, threshold_mode
        self.tau = (tau1, tau2, tau3, tau4)
        self.tau_smooth, self.patience, self.monotonic = tau_smooth, patience, monotonic
        self.samples = []  # [g, d, loss] of the last `window` finite samples
        self.reference = None  # statistics of the first full window (relative mode)
        self.phase, self.phase_start = EXPLORATION, 0  # phase_start: step it was adopted
        self.candidate, self.votes = None, 0

    def due(self, step):
        """Whether optimizer step `step` is a sample step."""
        return step % self.every == 0

    def statistics(self):
        n = len(self.samples)
        g, d, loss = zip(*self.samples)
        mean_g = sum(g) / n
        grad_var = sum((x - mean_g) ** 2 for x in g) / n
        loss_smooth = sum(abs(loss[i] - 2 * loss[i - 1] + loss[i - 2]) for i in range(2, n))
        return grad_var, loss_smooth / (n - 2), sum(d) / n

    def vote(self, grad_var, loss_smooth, param_delta):
        tau1, tau2, tau3, tau4 = self.tau
        smooth_high = self.tau_smooth is None or loss_smooth > self.tau_smooth
        smooth_low = self.tau_smooth is None or loss_smooth < self.tau_smooth
        if grad_var > tau1 and param_delta > tau2 and smooth_high:
            return EXPLORATION
        if grad_var < tau3 and param_delta < tau4 and smooth_low:
            return FINE_TUNING
        return CONVERGENCE

    def observe(self, step, g, d, loss):
        """Take the sample of optimizer step `step`; return the phase change it made, or None."""
        if not all(math.isfinite(v) for v in (g, d, loss)):
            return None
        self.samples = (self.samples + [[g, d, loss]])[-self.window :]
        if len(self.samples) < self.window:
            return None
        stats = self.statistics()
        if self.mode == "relative":
            if self.reference is None:
                self.reference = list(stats)
            scaled = [s / max(r, 1e-30) for s, r in zip(stats, self.reference)]
        else:
            scaled = list(stats)
        vote = self.vote(*scaled)
        if self.monotonic:
            vote = max(vote, self.phase)
        if vote == self.phase:
            self.candidate, self.votes = None, 0
            return None
        self.votes = self.votes + 1 if vote == self.candidate else 1
        self.candidate = vote
        if self.votes < self.patience:
            return None
        change = {
            "step": step,
            "from": PHASES[self.phase],
            "to": PHASES[vote],
            "grad_var": stats[0],
            "loss_smooth": stats[1],
            "param_delta": stats[2],
            "compared": dict(zip(("grad_var", "loss_smooth", "param_delta"), scaled)),
            "thresholds": {
                "mode": self.mode,
                **dict(zip(("tau1", "tau2", "tau3", "tau4"), self.tau)),
                "tau_smooth": self.tau_smooth,
            },
        }
        self.phase, self.phase_start = vote, step
        self.candidate, self.votes = None, 0
        return change

    def scalars(self):
        """The phase, the latest sample and the window's statistics, for experiment logs."""
        scalars = {"train/phase": self.phase}
        if self.samples:
            g, d, _ = self.samples[-1]
            scalars.update({"detector/grad_norm": g, "detector/update_norm": d})
        if len(self.samples) == self.window:
            names = ("detector/grad_var", "detector/loss_smooth", "detector/param_delta")
            scalars.update(zip(names, self.statistics()))
        return scalars

    def state_dict(self):
        return {
            "samples": self.samples,
            "reference": self.reference,
            "phase": self.phase,
            "phase_start": self.phase_start,
            "candidate": self.candidate,
            "votes": self.votes,
        }

    def load_state_dict(self, state):
        self.samples, self.reference = state["samples"], state["reference"]
        self.phase, self.phase_start = state["phase"], state["phase_start"]
        self.candidate, self.votes = state["candidate"], state["votes"]
