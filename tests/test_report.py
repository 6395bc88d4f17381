"""The report, on fixture run folders whose expected numbers are computed by hand."""

from __future__ import annotations

import json
import statistics

import pytest
from conftest import cli
from scipy import stats

from generator import report

PHASES = {"phase_exploration": 0.0, "phase_convergence": 1.0, "phase_fine_tuning": 0.0}


def write_run(root, arm, seed, accs, losses, status="completed", phases=False, torn=False):
    folder = root / arm / f"seed{seed}"
    folder.mkdir(parents=True)
    constants = {"TARGET_ACCURACY": 0.8, "STABILITY_WINDOW": 3}
    (folder / "config.json").write_text(
        json.dumps({"spec": "demo", "arm": arm, "seed": seed, "constants": constants})
    )
    lines = []
    for epoch, (acc, loss) in enumerate(zip(accs, losses, strict=True), 1):
        record = {
            "epoch": epoch,
            "val_acc": acc,
            "val_loss": loss,
            "elapsed_s": 10.0 * epoch,
            "eps": 0.001,
        }
        if phases:
            share = [1.0, 0.0, 0.0] if epoch <= 2 else [0.0, 0.0, 1.0]
            record.update(zip(PHASES, share, strict=True))
        lines.append(json.dumps(record))
    text = "\n".join(lines) + "\n"
    (folder / "metrics.jsonl").write_text(text[:-15] if torn else text)
    if status is not None:
        (folder / "summary.json").write_text(json.dumps({"status": status}))
    return folder


@pytest.fixture
def runs(tmp_path):
    # baseline: two of three seeds reach 0.8 (at epochs 3 and 2); val losses end 1, 2, 3
    write_run(tmp_path, "baseline", 0, [0.5, 0.7, 0.85, 0.9], [2.0, 1.0, 2.0, 3.0])
    write_run(tmp_path, "baseline", 1, [0.6, 0.82, 0.84, 0.88], [2.0, 2.0, 2.0, 2.0])
    write_run(tmp_path, "baseline", 2, [0.4, 0.6, 0.75, 0.79], [4.0, 3.0, 3.0, 6.0])
    for seed, final in enumerate([0.95, 0.96, 0.97]):
        write_run(
            tmp_path, "full", seed, [0.5, 0.8, 0.9, final], [1.0, 1.0, 1.0, 1.0], phases=True
        )
    write_run(tmp_path, "full", 3, [0.5, 0.6], [1.0, 1.0], status=None)  # killed: no summary
    write_run(tmp_path, "full", 4, [0.5, 0.6], [1.0, 1.0], status="diverged")
    write_run(tmp_path, "full", 5, [0.5, 0.6, 0.7, 0.99], [1.0] * 4, torn=True)
    return tmp_path


def test_cells_are_the_hand_computed_values(runs):
    arms = report.aggregate(report.find_runs(runs))["specs"]["demo"]["arms"]
    base, full = arms["baseline"], arms["full"]
    assert (base["runs"], base["completed"], base["reached_target"]) == (3, 3, 2)
    assert base["epochs_to_target"]["mean"] == 2.5
    assert base["epochs_to_target"]["std"] == pytest.approx(0.5**0.5)
    assert base["seconds_to_target"]["mean"] == 25.0
    # CV over the last 3 epochs: [1, 2, 3] -> 50 %, [2, 2, 2] -> 0 %, [3, 3, 6] -> 34.64 %
    cvs = [50.0, 0.0, 100 * statistics.stdev([3, 3, 6]) / 4]
    assert base["cv_pct"]["mean"] == pytest.approx(statistics.fmean(cvs))
    assert base["final_acc"]["mean"] == pytest.approx((0.9 + 0.88 + 0.79) / 3)
    assert base["best_acc"]["mean"] == pytest.approx((0.9 + 0.88 + 0.79) / 3)
    assert full["completed"] == 3 and full["runs"] == 6


def test_welch_test_and_effect_size_match_scipy(runs):
    arms = report.aggregate(report.find_runs(runs))["specs"]["demo"]["arms"]
    a, b = [0.95, 0.96, 0.97], [0.9, 0.88, 0.79]
    expected = stats.ttest_ind(a, b, equal_var=False)
    test = arms["full"]["vs_baseline"]["final_acc"]
    assert test["p"] == pytest.approx(expected.pvalue)
    assert test["t"] == pytest.approx(expected.statistic)
    pooled = ((2 * statistics.variance(a) + 2 * statistics.variance(b)) / 4) ** 0.5
    g = (statistics.fmean(a) - statistics.fmean(b)) / pooled * (1 - 3 / (4 * 6 - 9))
    assert test["g"] == pytest.approx(g)


def test_holm_adjustment():
    assert report.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None}) == {
        "a": pytest.approx(0.03),
        "b": pytest.approx(0.06),
        "c": pytest.approx(0.06),
        "d": None,
    }


def test_unfinished_runs_are_listed_not_averaged(runs):
    arms = report.aggregate(report.find_runs(runs))["specs"]["demo"]["arms"]
    listed = {x["path"].rsplit("/", 1)[-1]: x for x in arms["full"]["not_completed"]}
    assert listed["seed3"]["status"] == "incomplete (no summary.json)"
    assert listed["seed4"]["status"] == "diverged"
    assert listed["seed5"]["problems"] == ["metrics.jsonl line 4 is truncated"]
    assert arms["full"]["seeds"] == [0, 1, 2]


def test_phase_distribution_by_thirds(runs):
    arms = report.aggregate(report.find_runs(runs))["specs"]["demo"]["arms"]
    # 4 epochs: thirds hold epochs {1, 2}, {3}, {4}; exploration in 1-2, fine-tuning after
    first, middle, last = arms["full"]["phases_by_third"]
    assert first["exploration"] == 1.0 and middle["fine_tuning"] == 1.0
    assert last["fine_tuning"] == 1.0
    assert arms["baseline"]["phases_by_third"] is None


def test_markdown_plots_and_cli(runs):
    result = cli("report", runs, "-o", runs / "out")
    assert result.exit_code == 0, result.output
    text = (runs / "out" / "report.md").read_text()
    for heading in ("Table I", "Table II", "Table III", "Table IV", "Phase distribution"):
        assert heading in text
    assert "| full | 3/3 |" in text  # reached target, of completed
    assert "seed3: incomplete (no summary.json)" in text and "seed4: diverged" in text
    assert "| baseline | 2/3 | 2.5 ± 0.7 (n=2) |" in text
    p = json.loads((runs / "out" / "report.json").read_text())["specs"]["demo"]["arms"]
    assert p["full"]["vs_baseline"]["cv_pct"]["p"] >= 0.05
    assert "not significant" in text
    for name in ("demo_accuracy.png", "demo_eps_phases.png"):
        data = (runs / "out" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_report_of_an_empty_folder_is_an_error(tmp_path):
    result = cli("report", tmp_path)
    assert result.exit_code == 2
    assert "no run folders" in result.output
