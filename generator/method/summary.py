"""The seed paper's secondary measures (Tables I-II), one definition for the scripts'
summary.json and for the report: time to target and the CV of the validation loss."""

import math
import statistics


def first_at_target(history, target):
    """The first epoch record (a dict with "val_acc") at or above `target`, else None."""
    return next((h for h in history if h["val_acc"] >= target), None)


def cv_pct(losses):
    """Sample std / mean * 100 of the validation losses (None below two losses, if one is
    missing or non-finite, or if the mean is not positive)."""
    if len(losses) < 2 or any(v is None or not math.isfinite(v) for v in losses):
        return None
    mean = statistics.fmean(losses)
    return 100 * statistics.stdev(losses) / mean if mean > 0 else None
