"""report.md, rendered from report.json alone: the tables and the words (better, worse, not
significant) that the numbers support."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from generator.runs import PHASES, arm_rank

PROTOCOL = """\
**Primary endpoint: final test accuracy**, the accuracy of each run's final model on the
test split, which a run evaluates once, after training. Everything else is secondary and
exploratory. The validation split (carved from the training data, the same examples for
every arm and seed) picks the best checkpoint; time to target and the loss CVs are measured
on it.

- **Paired design.** The same seed gives the same initialisation and data order in every
  arm, so an arm is compared with baseline through per-seed differences Δ = arm − baseline
  over the seeds both hold: mean Δ, its 95 % paired t interval and p (which the verdict
  uses), and beside it the exact sign-flip permutation p (all 2^n sign patterns of the
  differences; no normality assumed; a zero difference stays in, a tie counts as "as
  extreme"), which cannot fall below 2 / 2^n: 0.0625 at n = 5. Runs pair when both arms were made
  with the same settings and batch size (checked from their config.json); an arm that does
  not pair (an extra baseline with another batch size) gets Welch's unpaired test, labelled.
- **Every run counts.** A diverged run enters the primary endpoint at chance accuracy,
  1 / NUM_CLASSES (its seed still pairs). Stopped, missing, damaged and corrupt runs (a
  metrics.jsonl that is not one history) enter no statistic and are listed.
- **One confirmatory family.** The primary endpoint's comparisons — every arm against
  baseline, the 2×2 of the method's ingredients (detector × in-phase decay over `fixed`,
  `phase_only`, `schedule_only`, `full`: both main effects and the interaction, each a
  per-seed contrast), `full` against each component and `full` against each of the
  method's peers (`gradient_noise`, `anti_pgd`) — form one Holm family. Time to
  target, each CV and the divergence rates are exploratory, a Holm family each. A direction
  word (better/worse, faster/slower, steadier, diverges more/less often) needs a
  Holm-adjusted p < 0.05.
- **Sensitivity.** "MDD" is the smallest true difference the paired t-test would detect with
  80 % power at the observed spread of the differences: at level 0.05, and at 0.05 / m,
  Holm's first step over a family of m comparisons.
- **Time to target**: epochs until validation accuracy first reached the target; a run that
  diverged or never reached it is censored at its planned epochs. Kaplan–Meier median per
  arm with its 95 % interval (log-log band; "not reached" where the curve never falls to
  0.5), log-rank test against baseline; Δ is the difference of the medians.
- **Stability**: the seed paper's CV (sample std / mean × 100 of the validation loss over the
  last W epochs) mixes a steady trend (over-fitting) with noise; the detrended CV (the
  residuals around a least-squares line over the same epochs) is noise alone and **carries
  the stability verdict**; the paper's CV is shown beside it.
- Divergence rates are compared with baseline's by Fisher's exact test (two-sided).
- Runs are grouped by a fingerprint of their resolved settings (config.json without the seed
  and the output folder: optimizer, architecture, dataset, generator version and every
  constant included) and never pooled across fingerprints; a run found twice is counted once.
"""
COUNTS = "done/div/stop/miss"


def verdict(family: str, test: dict[str, Any], alpha: float) -> str:
    """The word a comparison earns: a direction only with a Holm-adjusted p < alpha."""
    if test["p"] is None:
        return test["note"] or "no test"
    if test["p_holm"] >= alpha:
        return "not significant"
    if family == "divergence":
        return "diverges more often" if test["diff"] > 0 else "diverges less often"
    if family == "time_to_target":
        return "faster" if test["o_minus_e"] > 0 else "slower"
    if family in ("cv_pct", "cv_detrended_pct"):
        return "steadier" if test["diff"] < 0 else "less steady"
    return "better" if test["diff"] > 0 else "worse"


def _num(value: float | None, fmt: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(value * scale, fmt)


def _cell(stat: dict[str, Any], fmt: str, scale: float = 1.0) -> str:
    if stat["mean"] is None:
        return "—"
    std = "" if stat["std"] is None else f" ± {_num(stat['std'], fmt, scale)}"
    return f"{_num(stat['mean'], fmt, scale)}{std} (n={stat['n']})"


def _ci(ci: list[float | None] | None, fmt: str, scale: float = 1.0) -> str:
    if ci is None:
        return "—"
    return f"[{_num(ci[0], fmt, scale)}, {_num(ci[1], fmt, scale)}]"


def _table(title: str, intro: list[str], columns: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table under its heading, with the lines that say how to read it."""
    lines = ["", f"### {title}", ""] + (intro + [""] if intro else [])
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _counts(row: dict[str, Any]) -> str:
    c = row["counts"]
    return f"{c['completed']}/{c['diverged']}/{c['stopped']}/{c['missing']}"


def _value(value: Any) -> str:
    return "`" + json.dumps(value, default=str) + "`"


def _design(test: dict[str, Any]) -> str:
    if test["design"] == "paired":
        exact = "" if test["p_exact"] is None else f" (exact p {test['p_exact']:.3g})"
        return f"paired t, n={test['n']}{exact}"
    return f"Welch (unpaired: batch size differs), n={test['n'][0]}+{test['n'][1]}"


def _p(test: dict[str, Any] | None) -> list[str]:
    if test is None:
        return ["—", "—"]
    return [_num(test["p"], ".3g"), _num(test["p_holm"], ".3g")]


def _delta(family: str, test: dict[str, Any] | None, fmt: str, scale: float) -> list[str]:
    """Δ, 95 % CI, test, p, p (Holm), verdict of one comparison ('—' for baseline)."""
    if test is None:
        return ["—", "—", "reference", "—", "—", "—"]
    cells = [_num(test["diff"], "+" + fmt, scale), _ci(test["ci"], "+" + fmt, scale)]
    return cells + [_design(test), *_p(test), verdict(family, test, 0.05)]


def _family_tests(data: dict[str, Any], family: str) -> dict[str, Any]:
    return data["comparisons"].get(family, {}).get("tests", {})


def _runs_table(data: dict[str, Any]) -> list[str]:
    tests = _family_tests(data, "divergence")
    rows = []
    for label, a in data["arms"].items():
        c, test = a["counts"], tests.get(label)
        listed = "; ".join(
            f"{Path(x['path']).name}: {x['status'] if x['outcome'] != 'corrupt' else 'corrupt'}"
            + (f" ({', '.join(x['problems'])})" if x["problems"] else "")
            for x in a["not_completed"]
        )
        verdict_cell = "—" if test is None else verdict("divergence", test, 0.05)
        rows.append(
            [label, str(a["runs"]), str(c["completed"]), f"{c['diverged']}/{a['finished']}"]
            + [str(c["stopped"]), str(c["missing"]), str(c["corrupt"]), *_p(test)]
            + [verdict_cell, listed or "—"]
        )
    columns = ["arm", "runs", "completed", "diverged", "stopped", "missing", "corrupt"]
    columns += ["divergence vs baseline: Fisher p", "p (Holm)", "verdict", "not completed"]
    early = {label: a["stopped_early"] for label, a in data["arms"].items() if a["stopped_early"]}
    if not early:
        return _table("Runs", [], columns, rows)
    by_arm = ", ".join(f"{label} {n}" for label, n in early.items())
    return _table("Runs", [], columns, rows) + [
        "",
        f"{sum(early.values())} completed run(s) stopped early ({by_arm}): `train.early_stop` "
        "ended them when validation accuracy stalled; they count as completed, and time to "
        "target censors them at their planned epochs.",
    ]


def _primary_table(data: dict[str, Any]) -> list[str]:
    tests = _family_tests(data, "primary")
    rows = []
    for label, a in data["arms"].items():
        test = tests.get(label)
        rows.append(
            [label, _counts(a), _cell(a["primary"], ".2f", 100), *_delta("primary", test, ".2f", 100)]
            + [_num(test and test.get("mdd"), ".2f", 100), _num(test and test.get("mdd_holm"), ".2f", 100)]
        )
    for name in (k for k in tests if k not in data["arms"]):
        test = tests[name]
        rows.append(
            [f"*{name}*", "—", "—", *_delta("primary", test, ".2f", 100)]
            + [_num(test.get("mdd"), ".2f", 100), _num(test.get("mdd_holm"), ".2f", 100)]
        )
    chance = data["chance"]
    rule = (
        f"a diverged run counts at chance, {100 * chance:.2f} %"
        if chance
        else "diverged runs have no value here (their config names no NUM_CLASSES)"
    )
    intro = [
        f"Mean ± sd (n) over completed and diverged runs ({rule}). Δ in points against",
        "baseline; below the arms, the 2×2 contrasts (detector and decay main effects,",
        "interaction), `full` against each component and each peer. MDD: smallest difference",
        f"detectable at 80 % power (at 0.05, and at 0.05 / {data['comparisons'].get('primary', {}).get('size', 1)}).",
        "Confirmatory: one Holm family over all rows.",
    ]
    columns = ["arm", COUNTS, "test acc (%)", "Δ (points)", "95 % CI", "test", "p", "p (Holm)"]
    columns += ["verdict", "MDD", "MDD (Holm)"]
    title = "Primary endpoint: final test accuracy (confirmatory)"
    return _table(title, intro, columns, rows) + _sensitivity(tests, data)


def _sensitivity(tests: dict[str, Any], data: dict[str, Any]) -> list[str]:
    """The computed sensitivity sentence: the MDD range over the arms against baseline."""
    mdds = [t["mdd"] for k, t in tests.items() if k in data["arms"] and t.get("mdd")]
    holms = [t["mdd_holm"] for k, t in tests.items() if k in data["arms"] and t.get("mdd_holm")]
    if not mdds:
        return []
    return [
        "",
        f"Sensitivity: with these seeds, paired differences from baseline of "
        f"{100 * min(mdds):.2f}–{100 * max(mdds):.2f} points would be detected with 80 % "
        f"power ({100 * min(holms):.2f}–{100 * max(holms):.2f} under Holm); smaller ones "
        "cannot be told apart from seed noise here.",
    ]


def _time_table(data: dict[str, Any]) -> list[str]:
    tests = _family_tests(data, "time_to_target")
    rows = []
    for label, a in data["arms"].items():
        km, test = a["time_to_target"], tests.get(label)
        median = "not reached" if km["median"] is None else f"{km['median']:.0f}"
        ci = "—" if km["median"] is None else _ci(km["ci"], ".0f").replace("—", "not reached")
        chi2 = "—" if test is None else _num(test["chi2"], ".3g")
        word = "reference" if test is None else verdict("time_to_target", test, 0.05)
        diff = "—" if test is None else _num(test["diff"], "+.0f")
        rows.append(
            [label, _counts(a), f"{a['reached_target']}/{a['timed']}", median, ci]
            + [str(km["censored"]), diff, chi2, *_p(test), word]
        )
    intro = [
        "Kaplan–Meier median epochs (95 % CI) over completed and diverged runs; censored runs",
        "never reached the target. Δ: difference of medians. Log-rank test; exploratory Holm family.",
    ]
    columns = ["arm", COUNTS, "reached", "median epochs", "95 % CI", "censored", "Δ median"]
    title = f"Table I: time to {data['target_accuracy']:.0%} validation accuracy (exploratory)"
    return _table(title, intro, columns + ["log-rank χ²", "p", "p (Holm)", "verdict"], rows)


def _cv_table(data: dict[str, Any]) -> list[str]:
    rows = []
    for label, a in data["arms"].items():
        row = [label, _counts(a)]
        for family in ("cv_detrended_pct", "cv_pct"):
            test = _family_tests(data, family).get(label)
            row += [_cell(a[family], ".2f"), *_delta(family, test, ".2f", 1.0)]
        rows.append(row)
    window = data["stability_window"]
    intro = [
        f"Validation loss over the last {window} epochs (all if fewer), completed runs; lower",
        "is steadier. The detrended CV carries the verdict; the seed paper's CV (Table II's",
        "definition) is shown beside it. Exploratory: a Holm family per CV.",
    ]
    cols = ["CV (%)", "Δ", "95 % CI", "test", "p", "p (Holm)", "verdict"]
    columns = ["arm", COUNTS] + [f"detrended {c}" for c in cols] + [f"paper {c}" for c in cols]
    return _table("Table II: stability of the validation loss (exploratory)", intro, columns, rows)


def _accuracy_table(arms: dict[str, Any]) -> list[str]:
    keys = ("test_acc", "test_acc_at_best_val", "final_acc", "best_acc")
    rows = [
        [label, _counts(a)] + [_cell(a[k], ".2f", 100) for k in keys] for label, a in arms.items()
    ]
    columns = ["arm", COUNTS, "test, final model", "test, best-val checkpoint"]
    columns += ["val, final", "val, best"]
    lines = _table("Table III: accuracy of the completed runs (%)", [], columns, rows)
    untested = sum(a["without_test_acc"] for a in arms.values())
    if untested:
        lines += [
            "",
            f"{untested} completed run(s) record no test accuracy (run folders from before "
            "the val/test split): they are in no test column and not in the primary endpoint.",
        ]
    return lines


def _phase_table(arms: dict[str, Any]) -> list[str]:
    rows = []
    for label, a in ((label, a) for label, a in arms.items() if a["phases_by_third"]):
        for name, third in zip(("first", "middle", "last"), a["phases_by_third"], strict=True):
            cells = ["—"] * 3 if third is None else [f"{100 * third[p]:.0f}" for p in PHASES]
            rows.append([label, f"{name} third", *cells])
    if not rows:
        return []
    columns = ["arm", "epochs", "exploration", "convergence", "fine-tuning"]
    return _table("Phase distribution by thirds of training (% of steps)", [], columns, rows)


def _section_md(spec: str, k: int, count: int, data: dict[str, Any]) -> list[str]:
    title = spec if count == 1 else f"{spec}: configuration {k} of {count}"
    lines = [f"## {title}"]
    if data["differs"]:
        differs = ", ".join(f"{key} = {_value(v)}" for key, v in data["differs"].items())
        text = f"This spec's runs were made with {count} different settings, never pooled"
        lines += ["", f"{text}; this section's: {differs}."]
    for arm in sorted({label.split(" [")[0] for label in data["split"]}, key=arm_rank):
        rows = [(label, s) for label, s in data["split"].items() if label.split(" [")[0] == arm]
        kept = "; ".join(
            f"`{label}` has " + ", ".join(f"{key} = {_value(v)}" for key, v in s.items())
            for label, s in rows
        )
        text = f"Runs of arm `{arm}` were made with {len(rows)} different settings"
        lines += ["", f"{text} and are kept apart: {kept}."]
    if data["refused"]:
        refused = data["refused"]
        lines += [
            "",
            f"**Not compared:** baseline runs were made with {refused['baseline_rows']} "
            f"different settings ({', '.join(refused['settings'])}): nothing is compared "
            "with baseline here.",
        ]
    lines += _runs_table(data)
    if data["comparisons"]:
        lines += _primary_table(data)
    lines += _time_table(data) + _cv_table(data)
    lines += _accuracy_table(data["arms"]) + _phase_table(data["arms"])
    if any(c is not None for c in data["curves"].values()):
        lines += [
            "",
            f"![validation accuracy]({data['name']}_accuracy.png)",
            "",
            f"![noise and phases]({data['name']}_eps_phases.png)",
        ]
    return lines + [""]


TUNING = {
    "same_budget": "(a) each arm tuned with the same budget",
    "added_to_tuned_baseline": "(b) the method added to a tuned baseline",
}


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Ablation report", ""]
    if "tuning" in report:  # the runs of perturbgen tune's fresh seeds
        t = report["tuning"]
        lines += [
            f"Each arm runs its own tuned values: question {TUNING[t['question']]}, "
            f"{t['trials_per_arm']} finished trials per arm on the validation split of seeds "
            f"{t['tuning_seeds']}; these runs use other seeds. The studies: "
            f"[tune_report.md]({t['tune_report']}).",
            "",
        ]
    lines.append(PROTOCOL)
    for spec, data in report["specs"].items():
        count = len(data["sections"])
        for k, section in enumerate(data["sections"], 1):
            lines += _section_md(spec, k, count, section)
    return "\n".join(lines).rstrip() + "\n"


def headline(report: dict[str, Any], spec: str) -> list[str]:
    """One line per arm: its primary endpoint against baseline and the verdict."""
    lines = []
    for data in report["specs"].get(spec, {}).get("sections", []):
        tests = _family_tests(data, "primary")
        for label, a in data["arms"].items():
            test = tests.get(label)
            said = ""
            if test is not None:
                said = f"Δ {_num(test['diff'], '+.2f', 100)} {_ci(test['ci'], '+.2f', 100)} "
                said += verdict("primary", test, 0.05)
            lines.append(
                f"  {label:24s} final test acc {_cell(a['primary'], '.2f', 100)} {said}".rstrip()
            )
    return lines
