"""perturbgen: generate standalone PyTorch training scripts for adaptive perturbation training."""

__version__ = "0.1.0"
