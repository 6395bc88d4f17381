"""train_s, the seconds a run spends inside training steps: the one definition of it."""

import time

import torch


class StepTimer:
    """The sum over optimizer steps of each step's compute, from the step's first operation
    to its last: data loading, evaluation and checkpoints fall between steps and are not
    counted. On the CPU a step's work is done when the host leaves it: perf_counter around
    it. On CUDA the host only queues the work (backward, optimizer and noise finish during
    a later step), so a pair of CUDA events is recorded on the device's stream around each
    step, without waiting, and the pairs are read by `total()` (at the end of an epoch and
    at a stop), which waits for the last one. Synchronising at each step's edges instead
    would stall the queue that the loop is built to keep full."""

    def __init__(self, device, seconds=0.0):
        self.device, self.seconds = device, seconds  # seconds: earlier sessions' and steps'
        self.cuda = device.type == "cuda"
        self.pairs = []  # CUDA (start, end) events not yet read
        self.started = None

    def start(self):
        if self.cuda:
            self.started = torch.cuda.Event(enable_timing=True)
            self.started.record(torch.cuda.current_stream(self.device))
        else:
            self.started = time.perf_counter()

    def stop(self):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record(torch.cuda.current_stream(self.device))
            self.pairs.append((self.started, end))
        else:
            self.seconds += time.perf_counter() - self.started

    def total(self):
        """Seconds inside the steps so far; on CUDA, once the last step recorded has run."""
        if self.pairs:
            self.pairs[-1][1].synchronize()
            self.seconds += sum(start.elapsed_time(end) for start, end in self.pairs) / 1000
            self.pairs.clear()
        return self.seconds
