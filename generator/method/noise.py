"""The noise: eps(t) * xi added to the flat parameters after each real optimizer step.

Two kernels draw xi: the torch path (dedicated torch.Generators, their state in checkpoints)
and a Triton noise-add kernel, whose xi comes from Philox in the kernel itself.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from generator.method.seeds import derived_seed

try:  # the Triton noise kernels are optional: without triton the torch path runs
    import triton
    import triton.language as tl
except ImportError:
    triton = None

BLOCK = 1024  # elements per Triton program

# The Triton path: noise drawn in-kernel by Philox from (seed, step) and the element index,
# so no noise tensor is ever materialised and a step's noise is two integers. Seeds, steps,
# sizes and rates are runtime arguments: a new step never recompiles.

if triton is not None:

    @triton.jit(do_not_specialize=["n_noise", "eps", "key"])
    def noise_add_kernel(
        p_ptr,  # flat fp32 parameters, updated in place
        n_noise,  # elements 0 .. n_noise - 1 receive noise
        eps,  # noise std
        key,  # Philox key: (noise seed + 1) << 32 | step
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_noise
        p = tl.load(p_ptr + offs, mask=mask)
        tl.store(p_ptr + offs, p + eps * tl.randn(key, offs), mask=mask)


def noise_add(flat, n_noise, eps, key):
    """The kernel's launcher: flat[:n_noise] += eps * xi, xi from Philox under `key`.
    Triton launches on the current CUDA device, which one process given --device cuda:1
    never sets: the launch enters the parameters' device (a no-op for CPU tensors)."""
    grid = (triton.cdiv(n_noise, BLOCK),)
    with torch.cuda.device_of(flat):
        noise_add_kernel[grid](flat, n_noise, eps, key, BLOCK=BLOCK)


def flat_order(params):
    """The flat buffer's order of parameters, one rule for the scripts' flatten_parameters,
    the exported module's mirror and the gradient noise: tensors with ndim >= 2 (the
    weights) first, otherwise as given (a stable sort)."""
    return sorted(params, key=lambda p: p.ndim < 2)


def add_noise(part, eps):
    """The torch path and the kernel's reference: target += eps * xi for one slice
    (generator, scratch, target), xi ~ N(0, I) from the slice's generator."""
    generator, scratch, target = part
    scratch.normal_(generator=generator)
    target.add_(scratch, alpha=eps)


def pick_kernel(name, device):
    """'torch' or 'triton' for kernel auto|torch|triton: triton needs the package and CUDA
    (or TRITON_INTERPRET=1, Triton's CPU interpreter, for tests)."""
    usable = triton is not None and (
        device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    )
    if name == "triton" and not usable:
        raise ValueError(
            "--kernel triton needs the triton package and a CUDA device "
            f"(triton {'missing' if triton is None else 'present'}, device {device})"
        )
    return "triton" if usable and name in ("auto", "triton") else "torch"


NOISE_STREAMS = 2  # slices of xi, a generator each (and, on big CPU models, a thread each)
STORAGE_CHECK_EVERY = 100  # optimizer steps between checks of the flat buffer (no detector)


class StorageReplaced(RuntimeError):
    """A parameter no longer views the flat buffer that the noise acts on."""


class Perturbation:
    """Adds epsilon(t) * xi to the chosen parameters after each real optimizer step.

    `epsilon(step, detector)` is the arm's eps(t) (an Epsilon policy); `detector` a
    PhaseDetector in the arms that have one, else None; `apply_to` "all" or "weights"
    (tensors with ndim >= 2); `lr_0` None for noise scale "absolute", else the reference
    learning rate of noise scale "lr" (eps follows lr_t / lr_0).
    xi ~ N(0, I) comes from generators of its own, seeded from the run seed and used for
    nothing else, so the noise stream does not depend on data order or init; their state is
    saved in checkpoints so that a resumed run draws exactly the noise it would have drawn.
    The optimizer is torch's own, as in every arm; this class only adds the noise, into the
    flat buffer that flatten_parameters made (the chosen parameters lie first in it).
    The torch path draws xi in NOISE_STREAMS slices, one generator each, on as many threads
    on the CPU: Gaussian sampling there runs on one core, and it is most of the noise's cost.
    """

    def __init__(
        self, model, seed, device, kernel, epsilon, detector, apply_to, lr_0=None, rank=0, world=1
    ):
        self.epsilon_of, self.detector, self.lr_0 = epsilon, detector, lr_0
        self.rank, self.world = rank, world
        params = list(model.parameters())
        self.model_params = params
        self.n_noise = sum(p.numel() for p in params if apply_to == "all" or p.ndim >= 2)
        # every parameter is a view into one storage (flatten_parameters): all of it, flat
        storage = params[0].untyped_storage()
        if any(p.untyped_storage().data_ptr() != storage.data_ptr() for p in params):
            raise ValueError("Perturbation needs flatten_parameters(model) first")
        self.flat = params[0].new_empty(0).set_(storage, 0, (sum(p.numel() for p in params),))
        self.placed = [(p, p.data_ptr()) for p in params]  # each parameter, where it lies
        self.kernel, self.generators, self.pool = kernel, [], None
        if kernel == "torch":
            self.generators = [
                torch.Generator(device=device).manual_seed(derived_seed(seed, "noise", i))
                for i in range(NOISE_STREAMS)
            ]
            scratch = torch.empty(self.n_noise, device=device)
            self.slices = list(
                zip(
                    self.generators,
                    scratch.chunk(NOISE_STREAMS),
                    self.flat[: self.n_noise].chunk(NOISE_STREAMS),
                )
            )
            # the slices are fixed, so the stream is the same with or without threads; threads
            # pay off from about a million values (below, handing work over costs more)
            threaded = device.type == "cpu" and self.n_noise >= 2**20
            self.pool = ThreadPoolExecutor(NOISE_STREAMS) if threaded else None
        if kernel == "triton":
            self.key_base = ((derived_seed(seed, "noise") & 0x7FFFFFFF) + 1) << 32

    def check_storage(self):
        """Stop when a parameter has left the flat buffer: a model.half() or
        model.to(memory_format=...) after construction gives parameters new storage, and the
        noise and the update norm would act on a buffer that nothing reads. Host metadata
        only: no device sync."""
        if any(p.data_ptr() != ptr for p, ptr in self.placed):
            raise StorageReplaced(
                "the parameters no longer lie in the flat buffer that the noise acts on: "
                "convert the model (dtype, memory format) before flatten_parameters, not after"
            )

    def epsilon(self, step, lr):
        """eps(t) for optimizer step `step` (0-based), taken at learning rate `lr`; in the
        phase arms, with the phase as decided after this step's detector sample."""
        eps = self.epsilon_of(step, self.detector)
        return eps if self.lr_0 is None else eps * lr / self.lr_0

    def step(self, optimizer_step, step, lr, loss=None, grad_norm=None):
        """optimizer_step(), then the noise: (eps, None). optimizer_step() returning False
        means the grad scaler skipped the step, which is no step: no noise, (None, None)
        back. loss and grad_norm are what a detector samples (SampledPerturbation)."""
        if step % STORAGE_CHECK_EVERY == 0:
            self.check_storage()
        if optimizer_step() is False:
            return None, None
        return self.apply(step, lr), None

    @torch.no_grad()
    def apply(self, step, lr):
        eps = self.epsilon(step, lr)
        if eps > 0 and self.kernel == "triton":
            noise_add(self.flat, self.n_noise, eps, self.key_base | step)
        elif eps > 0 and self.pool is not None:
            list(self.pool.map(add_noise, self.slices, [eps] * len(self.slices)))
        elif eps > 0:
            for part in self.slices:
                add_noise(part, eps)
        return eps

    def state_dict(self):
        state = {"kernel": self.kernel, "generators": [g.get_state() for g in self.generators]}
        if self.detector is not None:
            state["detector"] = self.detector.state_dict()
        return state

    def load_state_dict(self, state):
        if state["kernel"] != self.kernel:
            raise ValueError(
                f"the checkpoint was made with --kernel {state['kernel']}; resume with it"
            )
        for generator, saved in zip(self.generators, state["generators"], strict=True):
            generator.set_state(saved)
        if self.detector is not None:
            self.detector.load_state_dict(state["detector"])
