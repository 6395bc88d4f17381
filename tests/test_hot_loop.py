"""The GPU-first hot loop (issue 26, item 4; issue 29, item 1): no tensor-to-host conversion
on a step that is neither a detector sample, a check point nor an epoch's end, counted on
the CPU by instrumenting every way a tensor reaches the host; and train_s's definition,
the seconds of the steps' compute, on the CPU and (with a fake clock) on CUDA."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import MINIMAL, generate

from generator.method.timing import StepTimer
from generator.scriptload import load_script

# MINIMAL's MLP, 64 training examples in batches of 4: 16 steps an epoch, 32 in all
LOOP_SPEC = MINIMAL.replace("[baseline, fixed]", "[baseline, fixed, full]").replace(
    "val_size: 32}", "val_size: 32, batch_size: 4}"
)
CHECK_EVERY, SAMPLE_EVERY, STEPS_PER_EPOCH = 5, 4, 16
# each way a tensor's value reaches the host: explicit, implicit (if t:, int(t), float(t),
# math.isfinite(t), f"{t:.3f}", range(t), numpy), or a copy to the CPU
CONVERSIONS = (
    "item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__",
    "__complex__", "__array__", "__format__",
)  # fmt: skip


def conversions_per_step(script, out, monkeypatch):
    """Run `script` in this process; {step: conversions made from its start to the next's}
    (the last step of an epoch also carries the epoch's end: evaluation, checkpoints)."""
    ns = load_script(str(script), run_name="perturbgen_test")
    counts, current = Counter(), [None]
    for name in CONVERSIONS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counts[current[0]] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    lr_at = ns["lr_at"]

    def marking_lr_at(step, *args):  # called once at the start of every step
        current[0] = step
        return lr_at(step, *args)

    monkeypatch.setitem(ns["main"].__globals__, "lr_at", marking_lr_at)
    assert ns["main"](["--out", str(out)]) == 0
    monkeypatch.undo()
    return counts


@pytest.mark.parametrize(
    "features",
    [
        (),
        (  # every training feature that touches the step
            "train.clip_grad_norm=0.5",
            "train.accumulate=2",
            "train.label_smoothing=0.1",
            "train.ema={decay: 0.9}",
            "train.amp=bf16",
        ),
    ],
)
def test_only_samples_checks_and_epoch_ends_read_the_device(features, tmp_path, monkeypatch):
    folder = generate(
        tmp_path,
        LOOP_SPEC,
        f"train.check_every={CHECK_EVERY}",
        f"phase_detector.every={SAMPLE_EVERY}",
        *features,
    )
    for arm in ("baseline", "fixed", "full"):
        counts = conversions_per_step(folder / f"train_{arm}.py", tmp_path / arm, monkeypatch)
        checks = {s for s in range(32) if (s + 1) % CHECK_EVERY == 0}
        ends = {s for s in range(32) if (s + 1) % STEPS_PER_EPOCH == 0}
        samples = set(range(0, 32, SAMPLE_EVERY)) if arm == "full" else set()
        quiet = set(range(32)) - checks - ends - samples
        assert len(quiet) >= 14, quiet  # most steps: the test proves something
        assert {s: counts[s] for s in quiet if counts[s]} == {}, arm
        # the instrument sees the reads that are meant to happen
        assert all(counts[s] > 0 for s in checks | ends | samples), (arm, counts)


# ---- train_s: the seconds of the steps' compute -------------------------------------------


class Clock:
    """A fake clock for perf_counter and for CUDA events (which record the stream's time)."""

    def __init__(self):
        self.now = 0.0

    def advance(self, seconds):
        self.now += seconds


def test_cpu_train_s_sums_the_steps_and_leaves_data_loading_out(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("generator.method.timing.time.perf_counter", lambda: clock.now)
    timer = StepTimer(torch.device("cpu"), seconds=1.5)  # earlier sessions' seconds
    for compute, loading in ((0.25, 3.0), (0.5, 7.0), (0.125, 0.0)):
        clock.advance(loading)  # the next batch arrives: not a step
        timer.start()
        clock.advance(compute)
        timer.stop()
    assert timer.total() == 1.5 + 0.25 + 0.5 + 0.125


def test_cuda_train_s_reads_events_at_the_end_and_never_waits_inside_a_step(monkeypatch):
    """On CUDA the host leaves a step long before its work is done: each step is timed by a
    pair of events on the device's stream, read (one wait) when the total is asked for."""
    clock = Clock()

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.at = None

        def record(self, stream=None):
            assert stream == "stream of cuda:1"  # the run's device, not the current one
            self.at = clock.now  # the stream reaches it when the queued work before it ran

        def synchronize(self):
            synced.append(self)

        def elapsed_time(self, end):
            assert synced, "read before the events completed"
            return (end.at - self.at) * 1000  # milliseconds

    synced = []
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: f"stream of {device}")
    timer = StepTimer(torch.device("cuda:1"))  # a fresh run: no earlier seconds

    def steps(*computes):
        for compute in computes:
            clock.advance(2.0)  # loading the batch: not a step
            timer.start()
            clock.advance(compute)
            timer.stop()
        return timer.pairs[-1][1]  # the last step's end

    last = steps(0.25, 0.5, 0.125)
    assert synced == []  # the steps never waited
    assert timer.total() == 0.875 and synced == [last]  # one wait, for the last step
    assert timer.total() == 0.875 and len(synced) == 1  # read once: nothing more to wait for
    last = steps(0.5)  # the next epoch's steps add to the total
    assert timer.total() == 1.375 and synced[1:] == [last]
