"""The flat parameter buffer and the memory layout around it: a later conversion of the
model is caught (the noise would act on a dead buffer), the epoch's order and augmentation
draws are today's stream, and channels-last keeps every weight a view of the one buffer."""

from __future__ import annotations

import runpy

import pytest
import torch
from conftest import MINIMAL, generate, run_inprocess

ARMS = MINIMAL.replace("[baseline, fixed]", "[baseline, fixed, full]")


def small_convnet():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)
    )


@pytest.fixture(scope="module")
def arms(tmp_path_factory):
    """The fixed and full arms (without and with a detector) of the minimal spec."""
    return generate(tmp_path_factory.mktemp("arms"), ARMS, "phase_detector.every=2")


@pytest.mark.parametrize("arm", ["fixed", "full"])
@pytest.mark.parametrize(
    "convert", [torch.nn.Module.half, lambda m: m.to(memory_format=torch.channels_last)]
)
def test_a_conversion_after_construction_is_caught_at_the_next_check(arms, arm, convert):
    ns = runpy.run_path(str(arms / f"train_{arm}.py"), run_name="perturbgen_test")
    model = small_convnet()
    ns["flatten_parameters"](model)
    perturbation = ns["make_perturbation"](model, 0, torch.device("cpu"), "torch")
    norm = torch.tensor(1.0)  # the gradient norm a detector samples

    def step(t):
        return perturbation.step(lambda: None, t, 0.1, 1.0, norm)

    step(0)  # a sample step and a check step: the buffer is live
    convert(model)
    step(1)  # neither
    with pytest.raises(ns["StorageReplaced"], match="flat buffer"):
        step(ns["STORAGE_CHECK_EVERY"] if arm == "fixed" else 2)


@pytest.mark.parametrize("arm", ["fixed", "full"])
def test_a_run_whose_model_is_converted_late_stops_with_one_line(arms, tmp_path, arm):
    source = (arms / f"train_{arm}.py").read_text()
    late = "    forward = model\n"
    assert source.count(late) == 1
    # what model.half() or model.to(memory_format=...) does to each parameter, dtype kept
    script = tmp_path / f"train_{arm}.py"
    script.write_text(source.replace(late, "    model._apply(torch.clone)\n" + late))
    result = run_inprocess(script, "--out", tmp_path / "run")
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: the parameters no longer lie in the flat buffer")
