"""The report, on fixture run folders whose expected numbers are computed by hand."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from conftest import REPO, cli
from scipy import stats

from generator import ablate, report, report_md, runs as runfolders

PHASES = {"phase_exploration": 0.0, "phase_convergence": 1.0, "phase_fine_tuning": 0.0}
EPS_A, EPS_B = [0.002, 0.001, 0.00025], [0.004, 0.002, 0.0005]
REACH = [0.5, 0.8, 0.9, 0.95]  # reaches the target 0.8 at epoch 2


def write_run(
    root,
    arm,
    seed,
    accs,
    losses,
    status="completed",
    phases=False,
    torn=False,
    test=None,
    constants=None,
    config=None,
    train_s=True,
):
    """A run folder as an emitted script writes it. test: summary.json's test_acc (None:
    a folder from before the val/test split); constants, config: extra config.json items."""
    folder = root / arm / f"seed{seed}"
    folder.mkdir(parents=True)
    constants = {
        "TARGET_ACCURACY": 0.8,
        "STABILITY_WINDOW": 3,
        "NUM_CLASSES": 10,
        **(constants or {}),
    }
    (folder / "config.json").write_text(
        json.dumps(
            {
                "spec": "demo",
                "arm": arm,
                "seed": seed,
                "epochs": 4,
                "constants": constants,
                **(config or {}),
            }
        )
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
        if train_s:
            record["train_s"] = 8.0 * epoch  # training compute; elapsed_s is wall time
        if phases:
            share = [1.0, 0.0, 0.0] if epoch <= 2 else [0.0, 0.0, 1.0]
            record.update(zip(PHASES, share, strict=True))
        lines.append(json.dumps(record))
    text = "\n".join(lines) + "\n"
    (folder / "metrics.jsonl").write_text(text[:-15] if torn else text)
    if status is not None:
        summary = {"status": status}
        if test is not None:
            summary.update(test_acc=test, test_loss=1.0, test_acc_at_best_val=test - 0.01)
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def runs(tmp_path):
    """demo: baseline (one seed never reaches the target, one stopped early, one expected seed
    never ran), full
    (one diverged, one killed, one damaged), phase_only with two fingerprints; flat: a pair
    of arms with zero variance and different means."""
    expected = [[arm, s] for arm in ("baseline", "full", "phase_only") for s in range(4)]
    (tmp_path / "ablation.json").write_text(
        json.dumps({"spec": "demo", "spec_sha256": "ab12", "overrides": [], "expected": expected})
    )
    write_run(tmp_path, "baseline", 0, [0.5, 0.7, 0.85, 0.9], [2.0, 1.0, 2.0, 3.0], test=0.80)
    write_run(tmp_path, "baseline", 1, [0.6, 0.82, 0.84, 0.88], [2.0, 2.0, 2.0, 2.0], test=0.83)
    write_run(tmp_path, "baseline", 2, [0.4, 0.6, 0.75, 0.79], [4.0, 3.0, 3.0, 6.0], test=0.84)
    write_run(tmp_path, "baseline", 4, [0.5, 0.6], [1.0, 1.0], status="stopped")  # resumable
    for seed, test in enumerate([0.90, 0.92, 0.94]):
        write_run(tmp_path, "full", seed, REACH, [1.0] * 4, phases=True, test=test)
    write_run(tmp_path, "full", 3, [0.5, 0.6], [1.0, 1.0], status=None)  # killed: no summary
    write_run(tmp_path, "full", 4, [0.5, 0.6], [1.0, 1.0], status="diverged")
    write_run(tmp_path, "full", 5, REACH, [1.0] * 4, torn=True, test=0.99)
    for seed, (test, eps) in enumerate(
        [(0.86, EPS_A), (0.88, EPS_A), (0.70, EPS_B), (0.74, EPS_B)]
    ):
        write_run(
            tmp_path, "phase_only", seed, REACH, [1.0] * 4, test=test, constants={"EPS": eps}
        )
    for seed in (0, 1):
        write_run(tmp_path / "flat", "baseline", seed, REACH, [1.0] * 4, test=0.5)
        write_run(tmp_path / "flat", "fixed", seed, REACH, [1.0] * 4, test=0.6)
    for folder in (tmp_path / "flat").glob("*/seed*"):  # another spec
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "spec": "flat"}))
    return tmp_path


def section(root, spec="demo", k=0):
    return report.aggregate(report.find_runs(root))["specs"][spec]["sections"][k]


def family_of(root, family, spec="demo", k=0):
    return section(root, spec, k)["comparisons"][family]["tests"]


# --- the study fixture -------------------------------------------------------------------


def test_outcomes_are_counted_and_missing_runs_come_from_the_ablation_record(runs):
    arms = section(runs)["arms"]
    base, full = arms["baseline"], arms["full"]
    assert base["counts"] == {
        "completed": 3,
        "diverged": 0,
        "stopped": 1,  # seed4
        "missing": 1,  # seed3: expected by ablation.json, no folder
        "damaged": 0,
        "corrupt": 0,
    }
    assert full["counts"] == {
        "completed": 3,
        "diverged": 1,
        "stopped": 0,
        "missing": 1,  # seed3: no summary.json
        "damaged": 1,  # seed5: torn metrics.jsonl
        "corrupt": 0,
    }
    assert (full["counts"]["diverged"], full["finished"]) == (1, 5)
    listed = {x["path"].rsplit("/", 1)[-1]: x for x in full["not_completed"]}
    assert listed["seed3"]["status"] == "incomplete (no summary.json)"
    assert listed["seed4"]["status"] == "diverged"
    assert listed["seed5"]["problems"] == ["metrics.jsonl line 4 is truncated"]
    assert [x["status"] for x in base["not_completed"]] == [
        "missing (no run folder)",
        "incomplete (stopped)",
    ]
    assert (base["counts"]["diverged"], base["finished"]) == (0, 3)  # a stopped run has not finished
    assert full["seeds"] == [0, 1, 2]
    # Fisher on [[1, 4], [0, 3]]: with one divergence among 8 the arm holds it with
    # probability 5/8 (or not, 3/8); both tables are at most as likely as 5/8: p = 1
    assert family_of(runs, "divergence")["full"]["p"] == pytest.approx(1.0)


def test_time_to_target_censors_the_diverged_and_the_never_reaching(runs):
    arms = section(runs)["arms"]
    base, full = arms["baseline"], arms["full"]
    assert (base["reached_target"], base["timed"]) == (2, 3)  # seed2 never reached 0.8
    assert (full["reached_target"], full["timed"]) == (3, 4)  # seed4 diverged: censored
    # Kaplan-Meier: baseline reaches at 3 and 2, one censored at 4: S(2) = 2/3, S(3) = 1/3,
    # median 3; full reaches at 2, 2, 2, one censored: S(2) = 1/4, median 2
    assert base["time_to_target"]["median"] == 3 and base["time_to_target"]["censored"] == 1
    assert full["time_to_target"]["median"] == 2
    # full (2, 2, 2 reached; 4 censored) against baseline (3, 2 reached; 4 censored):
    # t = 2: at risk 4 + 3, reaches 3 + 1: O - E = 3 - 4 * 4/7, V = 4 (4/7)(3/7)(3/6)
    # t = 3: at risk 1 + 2, reaches 0 + 1: O - E = 0 - 1/3,     V = 1 (1/3)(2/3)(2/2)
    # O - E = 8/21, V = 24/49 + 2/9 = 314/441, chi2 = (64/441) / (314/441) = 32/157
    test = family_of(runs, "time_to_target")["full"]
    assert test["diff"] == -1
    assert test["o_minus_e"] == pytest.approx(8 / 21)
    assert test["chi2"] == pytest.approx(32 / 157)
    assert test["p"] == pytest.approx(math.erfc(math.sqrt(16 / 157)))


def test_the_primary_endpoint_is_paired_with_one_holm_family(runs):
    arms = section(runs)["arms"]
    assert set(arms) == {"baseline", "full", *(f"phase_only [{fp}]" for fp in _fps(runs))}
    assert arms["full"]["test_acc"]["mean"] == pytest.approx(0.92)  # seed5 (0.99) is damaged
    # the primary endpoint: the diverged seed4 at chance (NUM_CLASSES 10)
    assert arms["full"]["primary"]["mean"] == pytest.approx((0.90 + 0.92 + 0.94 + 0.1) / 4)
    family = family_of(runs, "primary")
    full = family["full"]
    # paired over seeds 0, 1, 2 (baseline has no seed 4): d = 0.10, 0.09, 0.10
    assert full["design"] == "paired" and full["seeds"] == [0, 1, 2]
    ci = stats.ttest_rel([0.90, 0.92, 0.94], [0.80, 0.83, 0.84]).confidence_interval()
    assert full["ci"] == pytest.approx([ci.low, ci.high])
    assert full["p_exact"] == pytest.approx(2 / 8)  # only all + or all - signs as extreme
    assert full["p"] == pytest.approx(stats.ttest_rel([0.90, 0.92, 0.94], [0.80, 0.83, 0.84]).pvalue)
    assert len(family) == 3  # full and the two phase_only rows; no 2x2 without its arms
    # one phase_only row pairs with baseline at seed 2 alone: no p; Holm over the other two
    assert sum(t["p"] is None for t in family.values()) == 1
    ranked = sorted((t for t in family.values() if t["p"] is not None), key=lambda t: t["p"])
    first = min(1, 2 * ranked[0]["p"])
    second = max(first, min(1, ranked[1]["p"]))
    assert [t["p_holm"] for t in ranked] == pytest.approx([first, second])
    assert full["mdd"] > 0 and full["mdd_holm"] > full["mdd"]


def _fps(root):
    return sorted({r.fingerprint[:8] for r in report.find_runs(root) if r.arm == "phase_only"})


def test_two_fingerprints_under_one_arm_are_never_pooled(runs):
    data = section(runs)
    rows = {k: a for k, a in data["arms"].items() if k.startswith("phase_only")}
    assert sorted(a["seeds"] for a in rows.values()) == [[0, 1], [2, 3]]
    means = sorted(a["primary"]["mean"] for a in rows.values())
    assert means == pytest.approx([0.72, 0.87])
    assert sorted(json.dumps(s) for s in data["split"].values()) == sorted(
        json.dumps({"constants.EPS": eps}) for eps in (EPS_A, EPS_B)
    )


def test_markdown_shows_each_case(runs):
    result = cli("report", runs, "-o", runs / "out")
    assert result.exit_code == 0, result.output
    text = (runs / "out" / "report.md").read_text()
    assert "**Primary endpoint: final test accuracy**" in text
    for heading in ("Table I", "Table II", "Table III", "Primary endpoint:", "Phase dist"):
        assert heading in text
    # counts in every table, censoring in "reached k/n", the diverged run at chance
    assert text.count("| full | 3/1/0/1 |") == 4
    assert "| full | 3/1/0/1 | 3/4 | 2 | [2, not reached] | 1 | -1 | 0.204 |" in text
    assert "| baseline | 3/0/1/1 | 2/3 | 3 | [2, not reached] | 1 |" in text
    assert (
        "| baseline | 5 | 3 | 0/3 | 1 | 1 | 0 | — | — | — | seed3: missing (no run folder); "
        "seed4: incomplete (stopped) |"
    ) in text
    assert "seed3: incomplete (no summary.json)" in text and "seed4: diverged" in text
    assert "| full | 3/1/0/1 | 71.50 ± 41.03 (n=4) | +9.67 | [+8.23, +11.10] | paired t, n=3 (exact p 0.25) |" in text
    assert "Sensitivity: with these seeds, paired differences from baseline of 1.88–8.17" in text
    # two fingerprints: two rows, and the setting that differs named
    a, b = _fps(runs)
    assert f"| phase_only [{a}] |" in text and f"| phase_only [{b}] |" in text
    assert "Runs of arm `phase_only` were made with 2 different settings" in text
    assert "constants.EPS = `[0.004, 0.002, 0.0005]`" in text
    # identical differences: the exact sign-flip p, no interval
    flat = text.split("## flat")[1]
    assert "| fixed | 2/0/0/0 | 60.00 ± 0.00 (n=2) | +10.00 | — | paired t, n=2 (exact p 0.5) | 0.5 |" in flat
    for name in ("demo_accuracy.png", "demo_eps_phases.png", "flat_accuracy.png"):
        data = (runs / "out" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_other_run_settings_get_a_section_each(tmp_path):
    for epochs, tests in ((4, [0.8, 0.82]), (2, [0.6, 0.62])):
        for seed, test in enumerate(tests):
            for arm in ("baseline", "full"):
                root = tmp_path / f"e{epochs}"
                write_run(root, arm, seed, REACH, [1.0] * 4, test=test, config={"epochs": epochs})
    result = cli("report", tmp_path, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## demo: configuration 1 of 2" in text and "## demo: configuration 2 of 2" in text
    assert "2 different settings, never pooled; this section's: epochs = `2`." in text
    assert "this section's: epochs = `4`." in text
    sections = json.loads((tmp_path / "out" / "report.json").read_text())["specs"]["demo"]
    means = [s["arms"]["baseline"]["primary"]["mean"] for s in sections["sections"]]
    assert means == pytest.approx([0.61, 0.81])  # never the pooled 0.71
    assert (tmp_path / "out" / "demo_1_accuracy.png").exists()


def test_the_fingerprint_ignores_only_the_seed_the_output_and_the_device_index():
    config = {"arm": "full", "seed": 0, "out": "r/0", "device": "cuda:0", "epochs": 4}
    config["constants"] = {"SEED": 0, "LR": 0.1}
    same = {**config, "seed": 7, "out": "r/7", "device": "cuda:3", "constants": {"LR": 0.1}}
    assert runfolders.fingerprint(same) == runfolders.fingerprint(config)
    for change in ({"device": "cpu"}, {"epochs": 5}, {"constants": {"LR": 0.2}}):
        assert runfolders.fingerprint({**config, **change}) != runfolders.fingerprint(config)


def test_a_baseline_with_two_fingerprints_refuses_every_comparison(tmp_path):
    for seed, lr in enumerate([0.1, 0.1, 0.05, 0.05]):
        write_run(tmp_path, "baseline", seed, REACH, [1.0] * 4, test=0.8, constants={"LR": lr})
        write_run(tmp_path, "full", seed, REACH, [1.0] * 4, test=0.9)
    data = section(tmp_path)
    assert data["baseline"] is None and data["comparisons"] == {}
    text = report_md.markdown(report.aggregate(report.find_runs(tmp_path)))
    assert "**Not compared:** baseline runs were made with 2 different settings" in text
    assert "(constants.LR)" in text


def test_old_run_folders_say_what_they_lack(tmp_path):
    for seed in range(2):
        for arm in ("baseline", "full"):
            write_run(tmp_path, arm, seed, REACH, [1.0, 2.0, 3.0, 4.0], train_s=False)
    data = section(tmp_path)
    assert data["arms"]["full"]["without_test_acc"] == 2
    assert family_of(tmp_path, "primary")["full"]["note"] == "no pairs to compare"
    text = report_md.markdown(report.aggregate(report.find_runs(tmp_path)))
    assert "4 completed run(s) record no test accuracy" in text
    cvs = [100 * statistics.stdev([2, 3, 4]) / 3] * 2  # the validation tables still work
    assert data["arms"]["full"]["cv_pct"]["mean"] == pytest.approx(statistics.fmean(cvs))


def test_phase_distribution_by_thirds(runs):
    arms = section(runs)["arms"]
    # 4 epochs: thirds hold epochs {1, 2}, {3}, {4}; exploration in 1-2, fine-tuning after
    first, middle, last = arms["full"]["phases_by_third"]
    assert first["exploration"] == 1.0 and middle["fine_tuning"] == 1.0
    assert last["fine_tuning"] == 1.0
    assert arms["baseline"]["phases_by_third"] is None


def test_report_of_an_empty_folder_is_an_error(tmp_path):
    result = cli("report", tmp_path)
    assert result.exit_code == 2
    assert "no run folders" in result.output
    (tmp_path / "ablation.json").write_text(json.dumps({"spec": "demo", "expected": [["a", 0]]}))
    result = cli("report", tmp_path)  # runs expected, none ran
    assert result.exit_code == 2 and "no run folders" in result.output


# --- ablate's record, which the report reads ---------------------------------------------


def test_ablate_record_names_nproc_and_refuses_another(tmp_path):
    out = tmp_path / "ab"
    out.mkdir()
    record = {"epochs": None, "smoke": True, "nproc": 2, "overrides": []}
    spec = REPO / "specs" / "mnist1d_cnn.yaml"
    (out / "ablation.json").write_text(json.dumps(record))
    result = cli("ablate", spec, "--smoke", "-o", out)  # --nproc 1 by default
    assert result.exit_code == 2
    assert "holds runs made with other settings (nproc: 2 -> 1; spec: None -> 'mnist1d_cnn'; " in (
        result.output
    )


def test_ablate_expected_runs_accumulate_over_calls(tmp_path):
    previous = {"expected": [["full", 3], ["full", "3"], [["x"], 1], "junk"]}
    (tmp_path / "ablation.json").write_text(json.dumps(previous))
    assert ablate.expected(tmp_path, ["baseline"], [0, 1]) == [
        ["baseline", 0],
        ["baseline", 1],
        ["full", 3],
    ]
    assert ablate.expected(tmp_path / "new", ["full"], [0]) == [["full", 0]]
