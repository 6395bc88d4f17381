"""The Triton noise kernel and its launcher called directly (no script rendered), on the CPU by
Triton's interpreter: what it writes where, linear in eps, a new draw per block and per step.
Collected only with TRITON_INTERPRET=1 (tests/test_kernels.py runs this folder that way);
`python benchmarks/mutation.py method` runs mutmut's mutants against it (docs/mutation.md).
"""

from __future__ import annotations

import os

import torch

from generator.method import eps_fixed, noise

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_kernels.py"

N, SIZE = 1500, 2100  # noise on 1500 of 2100 elements: a partial second block, a tail left out
KEY = (5 << 32) | 9


def noised(eps, key=KEY, start=None):
    p = torch.zeros(SIZE) if start is None else start.clone()
    noise.noise_add(p, N, eps, key)
    return p


def test_the_launcher_noises_the_first_n_elements_only():
    p = noised(1.0)
    assert bool((p[:N] != 0).all()) and bool((p[N:] == 0).all())
    # each block draws its own noise: the second block is not the first one again
    block = noise.BLOCK
    assert not torch.equal(p[block:N], p[: N - block])


def test_the_noise_is_added_and_linear_in_eps():
    xi = noised(1.0)
    torch.testing.assert_close(noised(0.5), 0.5 * xi, rtol=0, atol=0)  # eps * xi, exactly
    start = torch.arange(SIZE, dtype=torch.float32)
    torch.testing.assert_close(noised(1.0, start=start), start + xi)  # added, not written


def test_a_perturbation_on_the_triton_path_draws_from_its_key_and_step():
    """Perturbation.apply(step) adds eps * xi(key_base | step): a new draw each step."""
    model = torch.nn.Linear(N, 1, bias=False)
    p = noise.Perturbation(
        model, 3, torch.device("cpu"), "triton", eps_fixed.Epsilon(0.5), None, "all"
    )
    for step in (4, 5):
        before = p.flat.clone()
        assert p.apply(step, 0.1) == 0.5
        expected = before.clone()
        noise.noise_add(expected, N, 0.5, p.key_base | step)
        torch.testing.assert_close(p.flat, expected, rtol=0, atol=0)
    assert not torch.equal(noised(1.0, p.key_base | 4)[:N], noised(1.0, p.key_base | 5)[:N])
