"""The verdict's design: pairing, duplicates, corrupt histories, the 2x2, re-rendering."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import REPO, cli
from scipy import stats
from test_report import REACH, family_of, section, write_run

from generator import report, report_md

ARMS = {"baseline": 0.80, "fixed": 0.81, "phase_only": 0.84, "schedule_only": 0.82, "full": 0.90}


def study(root, seeds=3, config=None):
    """Five arms x seeds; arm value + 0.01 * seed + a per-arm wobble, so the 2x2 is known."""
    for arm, value in ARMS.items():
        for seed in range(seeds):
            test = value + 0.01 * seed + (0.002 * seed if arm == "full" else 0.0)
            write_run(root, arm, seed, REACH, [1.0] * 4, test=test, config=config)


def test_the_2x2_contrasts_are_per_seed_and_paired(tmp_path):
    study(tmp_path)
    family = family_of(tmp_path, "primary")
    # per seed s: 00 = .81+.01s, 10 = .84+.01s, 01 = .82+.01s, 11 = .90+.012s
    # detector = ((10-00) + (11-01)) / 2 = (0.03 + 0.08 + 0.002 s) / 2
    assert family["detector"]["diff"] == pytest.approx((0.03 + 0.08 + 0.002) / 2)
    assert family["decay"]["diff"] == pytest.approx((0.01 + 0.06 + 0.002) / 2)
    assert family["interaction"]["diff"] == pytest.approx(0.06 + 0.002 - 0.01)
    d = [0.06 + 0.002 * s - 0.01 for s in range(3)]
    ci = stats.ttest_1samp(d, 0).confidence_interval()
    assert family["interaction"]["ci"] == pytest.approx([ci.low, ci.high])
    assert family["full vs phase_only"]["diff"] == pytest.approx(0.06 + 0.002)
    # one confirmatory family: 4 arms + 3 contrasts + 2 full-vs-component
    data = section(tmp_path)
    assert data["comparisons"]["primary"]["size"] == 9
    assert data["comparisons"]["cv_pct"]["role"] == "exploratory"


def test_full_meets_each_peer_in_the_confirmatory_family(tmp_path):
    """The method's peers are arms like the others (against baseline), and `full` is
    compared with each, paired by seed, in the one Holm family."""
    study(tmp_path)
    for seed in range(3):
        write_run(tmp_path, "gradient_noise", seed, REACH, [1.0] * 4, test=0.83 + 0.01 * seed)
        write_run(tmp_path, "anti_pgd", seed, REACH, [1.0] * 4, test=0.85 + 0.01 * seed)
    family = family_of(tmp_path, "primary")
    # full = .90 + .012 s: the differences are .07 + .002 s and .05 + .002 s, s = 0, 1, 2
    assert family["full vs gradient_noise"]["diff"] == pytest.approx(0.07 + 0.002)
    assert family["full vs anti_pgd"]["diff"] == pytest.approx(0.05 + 0.002)
    assert family["full vs anti_pgd"]["design"] == "paired"
    assert family["gradient_noise"]["diff"] == pytest.approx(0.03)  # against baseline
    # 6 arms + 3 contrasts + 2 full-vs-component + 2 full-vs-peer
    assert section(tmp_path)["comparisons"]["primary"]["size"] == 13
    text = report_md.markdown(report.aggregate(report.find_runs(tmp_path)))
    assert "| *full vs gradient_noise* |" in text


def test_another_batch_size_does_not_pair_and_says_so(tmp_path):
    study(tmp_path)
    for seed in range(3):
        config = {"batch_size": 64}
        write_run(tmp_path, "baseline_b64", seed, REACH, [1.0] * 4, test=0.7, config=config)
    family = family_of(tmp_path, "primary")
    assert family["baseline_b64"]["design"] == "unpaired"
    assert family["full"]["design"] == "paired"
    text = report_md.markdown(report.aggregate(report.find_runs(tmp_path)))
    assert "Welch (unpaired: batch size differs), n=3+3" in text


def test_a_copied_run_counts_once_and_a_different_copy_is_refused(tmp_path):
    study(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert section(tmp_path)["arms"]["full"]["primary"]["n"] == 3  # not 6
    summary = tmp_path / "b" / "full" / "seed1" / "summary.json"
    summary.write_text(json.dumps({"status": "completed", "test_acc": 0.5}))
    result = cli("report", tmp_path, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert str(tmp_path / "a" / "full" / "seed1") in result.output
    assert str(tmp_path / "b" / "full" / "seed1") in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_two_histories_in_one_metrics_file_are_corrupt_and_in_no_statistic(tmp_path):
    study(tmp_path)
    metrics = tmp_path / "full" / "seed2" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:2] + lines[:2] + lines[2:]) + "\n")  # a second writer
    full = section(tmp_path)["arms"]["full"]
    assert full["counts"]["corrupt"] == 1 and full["primary"]["n"] == 2
    assert family_of(tmp_path, "primary")["full"]["seeds"] == [0, 1]


def test_the_fingerprint_holds_the_optimizer_and_old_folders_still_load(tmp_path):
    for seed in range(2):
        write_run(
            tmp_path, "baseline", seed, REACH, [1.0] * 4, test=0.8, config={"optimizer": "adam"}
        )
        write_run(
            tmp_path,
            "baseline",
            seed + 2,
            REACH,
            [1.0] * 4,
            test=0.8,
            config={"optimizer": "adamw"},
        )
        write_run(tmp_path, "full", seed, REACH, [1.0] * 4, test=0.9)  # no optimizer field
    data = section(tmp_path)
    assert data["refused"] == {"baseline_rows": 2, "settings": ["optimizer"]}


def test_report_from_json_rerenders_the_same_markdown(tmp_path):
    study(tmp_path / "runs")
    assert cli("report", tmp_path / "runs", "-o", tmp_path / "a").exit_code == 0
    result = cli("report", "--from", tmp_path / "a" / "report.json", "-o", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "report.md").read_text() == (tmp_path / "b" / "report.md").read_text()
    assert (tmp_path / "b" / "demo_accuracy.png").exists()
    (tmp_path / "bad.json").write_text("{}")
    result = cli("report", "--from", tmp_path / "bad.json")
    assert result.exit_code == 2 and "not a report.json" in result.output


@pytest.mark.parametrize(
    "folder", sorted(p.parent for p in (REPO / "docs" / "results").rglob("report.json"))
)
def test_committed_reports_are_what_head_renders_from_their_report_json(folder):
    data = json.loads((folder / "report.json").read_text())
    assert (
        report_md.markdown(data) == (folder / "report.md").read_text()
    ), f"{folder}/report.md is stale: perturbgen report --from {folder}/report.json"


def test_ablate_precision_runs_steins_second_stage_up_to_max_seeds(tmp_path):
    """A pilot of 3 seeds sizes the second stage from its paired spread alone; a half-width of
    0.001 points needs far more seeds than --max-seeds 4 allows, so exactly seed 3 is added."""
    out = tmp_path / "runs"
    spec = REPO / "specs" / "synthetic_mlp.yaml"
    args = (
        "--arms",
        "baseline,fixed",
        "--epochs",
        "2",
        "-o",
        out,
        "--set",
        "perturbation.fixed=0.05",
    )
    result = cli("ablate", spec, "--seeds", "3", "--precision", "0.001", "--max-seeds", "4", *args)
    assert result.exit_code == 0, result.output
    assert (
        "Stein: pilot of 3 seeds" in result.output and "capped at --max-seeds 4" in result.output
    )
    for arm in ("baseline", "fixed"):
        assert sorted(p.name for p in (out / arm).iterdir()) == [f"seed{s}" for s in range(4)]
    refused = cli("ablate", spec, "--seeds", "2", "--precision", "0.5", *args)
    assert refused.exit_code == 2 and "a pilot of --seeds 3 or more" in refused.output
