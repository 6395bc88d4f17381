"""train.loggers: the runs' scalars in TensorBoard, W&B (offline) and MLflow (a local
SQLite store), read back with each tracker's own reader; the spec fields' errors; the
arms still differ by the perturbation alone; a missing tracker is one line; logging
changes no training; a crashed run resumes into the same tracker runs without duplicates."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
from conftest import GENERATED, MINIMAL, cli, generate, run_inprocess
from test_spec import errors_of
from test_static import arm_differences
from test_training import script_namespace

from generator.ablate import log_flags
from generator.plan import plan
from generator.render import load_spec

LOGGED = (
    MINIMAL.replace("variants: [baseline, fixed]", "variants: [baseline, fixed, full]").replace(
        "train: {epochs: 2, stability_window: 2}",
        "train: {epochs: 3, stability_window: 2,"
        " loggers: [tensorboard, wandb, mlflow], log_every: 2}",
    )
    + "phase_detector: {every: 1, window: 3, patience: 1}\n"
)
STEPS_PER_EPOCH = 8  # train_size 64 at batch 8
STRAIGHT = ("--log-group", "g", "--checkpoint-every", "1e9")


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    """The logging spec's arms, and its full arm generated without loggers."""
    tmp = tmp_path_factory.mktemp("logging")
    logged = generate(tmp / "logged", LOGGED, "data.batch_size=8")
    plain = generate(tmp / "plain", LOGGED, "data.batch_size=8", "train.loggers=[]")
    return logged, plain


@pytest.fixture(scope="module")
def straight(scripts, tmp_path_factory):
    """One uninterrupted run of the full arm with all three trackers (W&B offline)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path_factory.mktemp("straight") / "full-seed0"
    result = run_inprocess(scripts[0] / "train_full.py", "--out", run, *STRAIGHT)
    mp.undo()
    assert result.returncode == 0, result.stderr
    return run


# --- the spec fields ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "train, line_and_message",
    [
        (
            "{loggers: [tensorboard, comet]}",
            "train.loggers[1]: must be one of 'tensorboard', 'wandb' or 'mlflow' (got 'comet')",
        ),
        ("{loggers: [wandb, wandb]}", "train.loggers[1]: 'wandb' is listed twice"),
        ("{loggers: [mlflow], log_every: 0}", "train.log_every: must be > 0 (got 0)"),
    ],
)
def test_logging_fields_are_validated(train, line_and_message, write_spec):
    text = MINIMAL.replace("train: {epochs: 2, stability_window: 2}", f"train: {train}")
    path = write_spec(text)
    assert errors_of(path) == [f"{path}:5: {line_and_message}"]


def test_every_arm_logs_the_same_way(write_spec):
    text = MINIMAL.replace("stability_window: 2}", "stability_window: 2, loggers: [mlflow]}")
    path = write_spec(text + "baselines:\n  quiet:\n    train: {loggers: []}\n")
    message = "every arm logs the same way: the spec's loggers is ['mlflow'], this baseline's []"
    assert errors_of(path) == [f"{path}:9: baselines.quiet.train.loggers: {message}"]


def test_render_model_and_the_spec_hash(write_spec):
    on, doc = load_spec(write_spec(LOGGED))
    models = plan(on, doc)
    assert all(m.logs and m.loggers == ("tensorboard", "wandb", "mlflow") for m in models)
    constants = {c.name: c.value for c in models[0].constants}
    assert constants["LOGGERS"] == ("tensorboard", "wandb", "mlflow")
    assert constants["LOG_EVERY"] == 2
    off, doc = load_spec(write_spec(MINIMAL))
    assert not any(m.logs for m in plan(off, doc))
    assert "LOG_EVERY" not in {c.name for c in plan(off, doc)[0].constants}
    assert on.model_dump()["train"]["log_every"] == 2


def test_ablate_groups_its_runs(write_spec, tmp_path):
    on, _ = load_spec(write_spec(LOGGED))
    out = tmp_path / "study"
    assert log_flags(on, out) == ["--log-group", "study", "--log-root", str(out.resolve())]
    off, _ = load_spec(write_spec(MINIMAL))
    assert log_flags(off, out) == []
    only_tb = MINIMAL.replace(
        "stability_window: 2}", "stability_window: 2, loggers: [tensorboard]}"
    )
    tb, _ = load_spec(write_spec(only_tb))
    assert log_flags(tb, out) == []  # its event files sit in each run folder, under OUT


# --- the emitted code --------------------------------------------------------------------


def test_arms_still_differ_by_the_perturbation_alone(scripts):
    folder = scripts[0]
    base = (folder / "train_baseline.py").read_text()
    for arm in ("fixed", "full"):
        problems = arm_differences(base, (folder / f"train_{arm}.py").read_text())
        assert not problems, arm + "\n" + "\n".join(problems)


def test_only_the_trackers_asked_for_are_imported(tmp_path, monkeypatch):
    only_tb = MINIMAL.replace(
        "stability_window: 2}", "stability_window: 2, loggers: [tensorboard]}"
    )
    script = generate(tmp_path, only_tb) / "train_fixed.py"
    source = script.read_text()
    assert "\nLOGGERS = (\"tensorboard\",)  #" in source and "    ExperimentLog,\n" in source
    assert not any(word in source.lower() for word in ("wandb", "w&b", "mlflow"))
    parser = script_namespace(script)["build_parser"]()
    flags = {a.option_strings[-1] for a in parser._actions}
    assert not flags & {"--log-group", "--log-root"}  # TensorBoard groups by folder alone
    for module in ("wandb", "mlflow"):  # the support module's other trackers stay unimported
        monkeypatch.setitem(sys.modules, module, None)
    result = run_inprocess(script, "--out", tmp_path / "run", "--smoke")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "tensorboard").is_dir()
    # the golden scripts and support modules of specs that log to nothing hold no logging code
    quiet = [
        folder
        for folder in GENERATED.iterdir()
        if (folder / "manifest.json").exists()
        and not json.loads((folder / "manifest.json").read_text())["resolved_spec"]["train"][
            "loggers"
        ]
    ]
    golden = [p.read_text() for folder in quiet for p in folder.glob("*.py")]
    assert len(quiet) >= 5 and not any("ExperimentLog" in s for s in golden)
    # (the shared parser offers --log-group only to an arm that names a grouping tracker)
    scripts = [p.read_text() for folder in quiet for p in folder.glob("train_*.py")]
    assert not any("LOGGERS" in s or "experiment.log" in s for s in scripts)


@pytest.mark.parametrize(
    "module, name",
    [("torch.utils.tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow")],
)
def test_a_missing_tracker_is_one_line_before_training(
    module, name, scripts, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    run = tmp_path / "run"
    result = run_inprocess(scripts[0] / "train_fixed.py", "--out", run)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: train.loggers asks for {name}, ")
    package = "mlflow-skinny" if name == "mlflow" else name
    assert lines[0].endswith(f"pip install 'perturbgen[{name}]' (or pip install {package})")
    assert not run.exists()  # stopped before the run folder was made


# --- what the trackers hold --------------------------------------------------------------


def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def wandb_records(run: Path):
    """The records of each offline W&B run under `run` (.wandb files: W&B's LevelDB-style
    log of protobuf Records, read with W&B's own Record type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs = []
    for path in sorted((run / "wandb").glob("offline-run-*/run-*.wandb")):
        data, records, pos, chunk = path.read_bytes(), [], 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            room = 32768 - pos % 32768  # records never straddle a 32 KiB block header
            length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7]) if room >= 7 else (0, 0)
            if room < 7 or (length, kind) == (0, 0):
                pos += room
                continue
            chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # a full record, or the last piece of one
                record = pb.Record()
                record.ParseFromString(chunk)
                records.append(record)
                chunk = b""
        runs.append(records)
    return runs


def wandb_history(records) -> dict[str, list[tuple[int, float]]]:
    history: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    history.setdefault(key, []).append(
                        (r.history.step.num, json.loads(item.value_json))
                    )
    return history


def mlflow_run(root: Path, group: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(group)
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


def test_every_tracker_holds_the_run(straight):
    metrics = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((straight / "summary.json").read_text())
    config = json.loads((straight / "config.json").read_text())
    val_acc = [(m["step"], m["val_acc"]) for m in metrics]
    steps = list(range(2, 3 * STEPS_PER_EPOCH + 1, 2))  # log_every 2

    tb = tensorboard_scalars(straight)
    assert [s for s, _ in tb["train/loss"]] == steps
    assert all(v == pytest.approx(0.1) for _, v in tb["train/lr"])  # constant schedule
    assert {"train/eps", "train/phase", "detector/grad_var", "detector/update_norm"} <= set(tb)
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in val_acc] == tb["epoch/val_acc"]  # fp32
    assert tb["summary/best_val_acc"] == [(24, pytest.approx(summary["best_val_acc"]))]

    (records,) = wandb_records(straight)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.display_name, run.run_group, run.job_type) == ("tiny-full-seed0", "g", "full")
    assert run.run_id == json.loads((straight / "loggers.json").read_text())["wandb"]
    history = wandb_history(records)
    assert history["epoch/val_acc"] == val_acc
    assert [s for s, _ in history["train/loss"]] == steps
    assert [v for _, v in history["train/loss"]] == [pytest.approx(v) for _, v in tb["train/loss"]]

    client, mlrun = mlflow_run(straight.parent, "g")  # the default store: the parent folder
    assert mlrun.info.run_name == "tiny-full-seed0" and mlrun.info.status == "FINISHED"
    assert mlrun.info.run_id == json.loads((straight / "loggers.json").read_text())["mlflow"]
    assert mlrun.data.params["constants/LR"] == "0.1"
    assert mlrun.data.params["splits/train"] == str(config["splits"]["train"])
    assert mlrun.data.tags["arm"] == "full"
    history = [
        (m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "epoch/val_acc")
    ]
    assert sorted(history) == val_acc
    assert mlrun.data.metrics["summary/test_acc"] == summary["test_acc"]


def test_the_support_module_logs_any_arm_from_its_arguments(scripts, tmp_path, monkeypatch):
    """ExperimentLog reads no script constant: trackers, spec, arm and group arrive as
    arguments, so one support module serves arms that log differently (here W&B alone, from
    the support module of scripts that log to all three)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    experiment = script_namespace(scripts[0] / "train_full.py")["ExperimentLog"](
        ("wandb",), "other", "arm_x", group="grp"
    )
    out = tmp_path / "run"
    out.mkdir()
    experiment.start(out, "other-arm_x-seed3", {"seed": 3}, 0, False)
    experiment.log({"train/loss": 0.5, "train/eps": float("nan")}, 1)
    experiment.summary({"steps": 1, "status": "completed", "test_acc": 0.75})
    experiment.close()
    import wandb

    wandb.teardown()  # the service writes the run's file out, as at the end of a process
    (records,) = wandb_records(out)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.display_name, run.run_group, run.job_type, run.project) == (
        "other-arm_x-seed3",
        "grp",
        "arm_x",
        "other",
    )
    history = wandb_history(records)
    assert history["train/loss"] == [(1, 0.5)] and "train/eps" not in history  # NaN: dropped
    assert history["summary/test_acc"] == [(1, 0.75)]
    assert json.loads((out / "loggers.json").read_text()) == {"wandb": run.run_id}
    assert not (out / "tensorboard").exists()


def test_logging_changes_no_training(straight, scripts, tmp_path):
    plain = tmp_path / "plain"
    result = run_inprocess(scripts[1] / "train_full.py", "--out", plain)
    assert result.returncode == 0, result.stderr
    a = torch.load(straight / "last.pt", weights_only=True)["model"]
    b = torch.load(plain / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


class Crash(BaseException):
    """Stands for the process dying at a chosen point."""


def test_a_crashed_run_resumes_into_the_same_tracker_runs(
    straight, scripts, tmp_path, monkeypatch
):
    """last.pt after epoch 1, a crash in epoch 3 (epoch 2's scalars are logged, not
    checkpointed), then --resume: each tracker continues the same run, and its points equal
    the uninterrupted run's, none twice (TensorBoard purges what came after last.pt; MLflow
    skips steps it holds; W&B offline starts a second file of the same run id)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    script = scripts[0] / "train_full.py"
    run = tmp_path / "full-seed0"
    ns = script_namespace(script)
    evaluate, calls = ns["evaluate"], []

    def crash_in_epoch_3(*args):
        calls.append(1)
        if len(calls) == 3:
            raise Crash
        return evaluate(*args)

    ns["train"].__globals__["evaluate"] = crash_in_epoch_3
    # the straight run's store (a fresh one takes 8 s to set up here), another experiment
    store = ("--log-root", str(straight.parent), "--log-group", "crash")
    with pytest.raises(Crash):
        ns["main"](["--out", str(run), *STRAIGHT, *store])
    assert torch.load(run / "last.pt", weights_only=True)["state"]["epoch"] == 1
    ids = json.loads((run / "loggers.json").read_text())
    resumed = run_inprocess(script, "--out", run, "--resume", *STRAIGHT, *store)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "loggers.json").read_text()) == ids

    a = torch.load(run / "last.pt", weights_only=True)["model"]
    b = torch.load(straight / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    tb, tb_straight = tensorboard_scalars(run), tensorboard_scalars(straight)
    for tag in ("train/loss", "epoch/val_acc", "detector/grad_var"):
        assert tb[tag] == tb_straight[tag], tag
    client, mlrun = mlflow_run(straight.parent, "crash")
    assert mlrun.info.run_id == ids["mlflow"] and mlrun.info.status == "FINISHED"
    client_s, mlrun_s = mlflow_run(straight.parent, "g")
    for key in ("train/loss", "epoch/val_acc"):
        mine = sorted((m.step, m.value) for m in client.get_metric_history(ids["mlflow"], key))
        theirs = client_s.get_metric_history(mlrun_s.info.run_id, key)
        assert mine == sorted((m.step, m.value) for m in theirs), key
    runs = wandb_records(run)
    assert len(runs) == 2
    assert {r.run.run_id for rs in runs for r in rs if r.WhichOneof("record_type") == "run"} == {
        ids["wandb"]
    }
    steps = [s for rs in runs for s, _ in wandb_history(rs)["epoch/val_acc"]]
    assert steps == [8, 16, 16, 24]  # epoch 2 again after the crash: W&B offline keeps both


def test_ablate_puts_every_arm_in_one_experiment(straight, tmp_path, write_spec, monkeypatch):
    """The runs of `perturbgen ablate` (two at once) share OUT/mlflow.db, one experiment."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    text = MINIMAL.replace("stability_window: 2}", "stability_window: 2, loggers: [mlflow]}")
    out = tmp_path / "study"
    out.mkdir()
    shutil.copyfile(straight.parent / "mlflow.db", out / "mlflow.db")  # set up: saves 8 s
    result = cli("ablate", write_spec(text), "--seeds", "1", "--jobs", "2", "-o", out, "--smoke")
    assert result.exit_code == 0, result.output
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("study")
    names = sorted(r.info.run_name for r in client.search_runs([experiment.experiment_id]))
    assert names == ["tiny-baseline-smoke", "tiny-fixed-smoke"]
