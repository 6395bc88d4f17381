"""perturbgen export: the module, its API and its errors, and the proof that it is the method
of the scripts (the Lightning and Hugging Face callbacks: test_export_lightning.py,
test_export_hf.py)."""

from __future__ import annotations

import ast
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import GENERATED, REPO, cli, load_module, readme_snippets

from generator.export import VARIANTS, export_model
from generator.plan import plan
from generator.render import load_spec, templates_dir

SPEC = REPO / "specs" / "synthetic_mlp.yaml"
MODULES = sorted(GENERATED.glob("*/adaptive_perturbation.py"))
# the detector samples every step over a window of 4: phase changes within a few dozen steps
FAST_DETECTOR = ("phase_detector.every=1", "phase_detector.window=4", "phase_detector.patience=1")


def export(tmp_path: Path, arm: str, *overrides: str, spec: Path = SPEC) -> Path:
    out = tmp_path / f"ap_{arm}.py"
    args = [a for o in overrides for a in ("--set", o)]
    result = cli("export", spec, arm, "-o", out, *args)
    assert result.exit_code == 0, result.output
    return out


def tiny(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def train(model, optimizer, perturb, steps, first=0):
    """The issue's loop on fixed synthetic batches (batch i is the same in every run)."""
    for i in range(first, first + steps):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(16, 6, generator=g), torch.randint(3, (16,), generator=g)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        perturb.step(loss)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# -- the command --------------------------------------------------------------------------


def test_every_example_spec_carries_its_full_module():
    assert len(MODULES) == len(list((REPO / "specs").glob("*.yaml")))


def test_export_writes_the_golden_module(tmp_path):
    out = tmp_path / "adaptive_perturbation.py"
    result = cli("export", REPO / "specs" / "mnist1d_cnn.yaml", "full", "-o", out)
    assert result.exit_code == 0, result.output
    assert (
        out.read_bytes() == (GENERATED / "mnist1d_cnn" / "adaptive_perturbation.py").read_bytes()
    )


def test_export_refuses_a_baseline_an_unknown_arm_and_a_bad_name(tmp_path):
    result = cli("export", SPEC, "baseline", "-o", tmp_path / "ap.py")
    assert result.exit_code == 2
    assert "arm 'baseline' adds no noise; export one of: fixed, phase_only" in result.output
    result = cli("export", SPEC, "nope", "-o", tmp_path / "ap.py")
    assert result.exit_code == 2 and "'nope' is not an arm of this spec" in result.output
    result = cli("export", SPEC, "full", "-o", tmp_path / "my-module.py")
    assert result.exit_code == 2 and "NAME an identifier" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arm", ["fixed", "phase_only", "schedule_only", "full"])
def test_module_needs_only_torch_and_the_standard_library(tmp_path, arm):
    tree = ast.parse(export(tmp_path, arm).read_text())
    top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert top - set(sys.stdlib_module_names) == {"torch"}
    optional = [n for n in tree.body if isinstance(n, ast.Try)]
    assert [a.name for n in optional for a in n.body[0].names] == ["triton"]  # in try/except


def test_module_runs_with_the_frameworks_blocked(tmp_path):
    """Imported and stepped while lightning, transformers and triton cannot be imported."""
    module = export(tmp_path, "full")
    program = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lightning", "pytorch_lightning", "transformers", "triton"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
sys.path.insert(0, {str(tmp_path)!r})
import torch
from ap_full import AdaptivePerturbation
model = torch.nn.Linear(4, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)  # the spec's: eps is lr-scaled
perturb = AdaptivePerturbation(model, optimizer, seed=0)
model(torch.randn(3, 4)).sum().backward()
optimizer.step()
print(perturb.step(1.0), perturb.phase)
try:
    import ap_full; ap_full.AdaptivePerturbationCallback
except ImportError as exc:
    print(exc)
"""
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "0.002 exploration",
        "AdaptivePerturbationCallback needs Lightning: pip install lightning",
    ]
    assert module.is_file()


def test_the_readme_plain_loop_runs(tmp_path):
    """The loop names the export it imports (a comment: `perturbgen export SPEC ARM -o
    adaptive_perturbation.py`); the test runs that command, then the loop, which must not
    draw the module's warning that its learning rate is not the spec's."""
    plain = readme_snippets("In your own training loop")[0]
    command = re.search(r"perturbgen export (\S+) (\w+) -o adaptive_perturbation\.py", plain)
    assert command, "README's plain loop must name the spec it exports"
    spec, arm = command.groups()
    module = tmp_path / "adaptive_perturbation.py"
    assert cli("export", REPO / spec, arm, "-o", module).exit_code == 0
    (tmp_path / "main.py").write_text(plain)
    result = subprocess.run(
        [sys.executable, "main.py"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == [
        "epoch 0",
        "epoch 1",
        "epoch 2",
    ]
    saved = torch.load(tmp_path / "checkpoint.pt")
    assert saved["perturb"]["steps"] == 12 and set(saved) == {"model", "optimizer", "perturb"}


def test_scale_lr_names_its_reference_lr_and_warns_once_when_the_optimizer_differs(
    tmp_path, capsys
):
    """synthetic_mlp is `scale: lr` at lr 1e-3; README's plain loop trains with SGD at 0.1,
    which multiplies every eps by 100. The module states lr_0 in its docstring, prints it once
    when built, warns in one line (once) about the optimizer's other learning rate, and with
    lr=0.1 keeps the spec's eps. A warm-up that lowers the optimizer's lr is no difference:
    the scheduler's initial_lr is what lr_0 is compared with."""
    module = export(tmp_path, "full")
    doc = ast.get_docstring(ast.parse(module.read_text()))
    assert "lr_0 the reference learning rate: the constructor argument `lr`" in doc
    assert "spec's optimizer.lr (0.001)" in doc and "seed=0, lr=0.001)" in doc
    ap = load_module(module, "ap_scale_lr")
    said, eps = [], []
    for kwargs in ({}, {}, {"lr": 0.1}, {"lr": 0.1, "warmup": True}):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        if kwargs.pop("warmup", False):
            torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
        perturb = ap.AdaptivePerturbation(model, optimizer, seed=0, **kwargs)
        train(model, optimizer, perturb, 1)
        eps.append(perturb.eps)
        perturb.remove()
        said.append(capsys.readouterr().err.splitlines())
    announced = "ap_scale_lr: noise scale 'lr': eps(t) is multiplied by lr_t / lr_0, the "
    warned = (
        "ap_scale_lr: warning: the optimizer's learning rate is 0.1, not the reference 0.001: "
        "eps is 100x the spec's; pass lr=0.1 to AdaptivePerturbation to keep the spec's eps"
    )
    assert said[0] == [announced + "reference learning rate lr_0 = 0.001 (the spec's)", warned]
    assert said[1] == []  # once per process
    assert said[2] == [announced + "reference learning rate lr_0 = 0.1 (the lr argument)"]
    assert said[3] == []  # the same line again, and no warning: the warm-up starts at 0.05
    spec_eps = ap.SPEC_SETTINGS["eps_phase"][0]  # the first step is an exploration step
    assert eps[0] == pytest.approx(100 * spec_eps) and eps[2] == pytest.approx(spec_eps)
    assert eps[3] == pytest.approx(spec_eps / 2)


def test_an_absolute_scale_module_says_nothing_about_the_lr(capsys):
    ap = load_module(GENERATED / "mnist1d_cnn" / "adaptive_perturbation.py", "ap_absolute")
    assert "Noise scale 'lr'" not in ap.__doc__
    model, optimizer = tiny()
    perturb = ap.AdaptivePerturbation(model, optimizer, seed=0)
    train(model, optimizer, perturb, 1)
    perturb.remove()
    assert capsys.readouterr().err == ""


# -- the render model: what varies by arm is a field, and the class's variants are files ----


def export_models(*overrides: str) -> dict:
    """The export render model of each perturbing arm of mnist1d_cnn (all six kinds)."""
    spec, doc = load_spec(REPO / "specs" / "mnist1d_cnn.yaml", list(overrides))
    return {m.arm: export_model(m) for m in plan(spec, doc) if m.perturbs}


def test_each_kind_picks_its_class_variant_and_the_method_modules_it_needs():
    models = export_models()
    assert {arm: m.variant for arm, m in models.items()} == {
        "fixed": "parameter_noise",
        "schedule_only": "parameter_noise",
        "phase_only": "sampled_parameter_noise",
        "full": "sampled_parameter_noise",
        "gradient_noise": "gradient_noise",
        "anti_pgd": "anti_pgd",
    }
    assert models["fixed"].method_modules == ("seeds", "eps_fixed", "noise")
    assert models["full"].method_modules == ("seeds", "detector", "eps_full", "noise", "sampling")
    assert models["anti_pgd"].method_modules == (
        *("seeds", "eps_anti_pgd", "noise", "drawn", "anti_pgd"),
    )


def test_the_docstrings_lines_follow_the_arm():
    absolute, lr = export_models(), export_models("perturbation.scale=lr")
    fixed = absolute["fixed"]
    assert fixed.intro_lines == (
        (
            "After every real optimizer step the parameters the optimizer trains receive "
            "Gaussian noise:"
        ),
        "    theta <- theta + eps(t) * xi,   xi ~ N(0, I) from a dedicated generator",
        "    eps(t) = eps_fixed",
        "    eps_fixed = 0.001",
    )
    assert fixed.example_arguments == "seed=0"
    assert (
        absolute["phase_only"].intro_lines[-1].endswith("(exploration, convergence, fine_tuning).")
    )
    assert absolute["full"].intro_lines[-1] == "t_p counts optimizer steps since p began."
    gradient = absolute["gradient_noise"].intro_lines
    assert gradient[0].startswith("Before every optimizer step the gradient receives")
    assert gradient[-1] == "t counts optimizer steps from 0."
    full = lr["full"].intro_lines
    paragraph = full[full.index("") :]  # between blank lines, with the spec's optimizer.lr
    assert paragraph[0] == paragraph[-1] == "" and "spec's optimizer.lr (0.1)." in paragraph[3]
    assert lr["full"].example_arguments == "seed=0, lr=0.1"
    for arm, m in absolute.items():
        detector = arm in ("phase_only", "full")
        assert ("the detector, " in m.state_lines[2]) == detector, arm
        assert ("Rank 0's detector decides" in m.state_lines[-1]) == detector, arm
        assert ("a snapshot of the" in m.hook_lines[1]) == detector, arm
        assert ("the detector's sample" in m.step_doc_lines[0]) == detector, arm
        # the class's first sentence names what the arm's noise reaches
        reaches = {"gradient_noise": "to the gradients", "anti_pgd": "Adds xi_(t+1) - xi_t"}
        assert reaches.get(arm, "eps(t) * xi to the parameters") in m.class_lines[0], arm
        # as the docstrings indent them (the class's by 4, step()'s by 8): under 100 columns
        assert all(len(line) < 96 for line in m.class_lines + m.hook_lines + m.state_lines), arm
        assert all(len(line) < 92 for line in m.step_doc_lines), arm


def test_every_class_variant_is_a_template():
    """Every class variant the render model can name is a file (the module's templates are
    held to the project's template budget with all the others, tests/test_support.py)."""
    templates = templates_dir()
    for variant in VARIANTS.values():
        assert (templates / "export" / f"{variant}.py.jinja").is_file(), variant


# -- the proof: the same method as the scripts ---------------------------------------------


@pytest.mark.parametrize("arm", ["full", "fixed", "gradient_noise", "anti_pgd"])
def test_plain_loop_trains_bit_for_bit_what_the_script_trains(tmp_path, arm):
    """synthetic_mlp (Adam, apply_to weights, scale lr, an LR warm-up) for 50 steps across
    an epoch boundary: train_<arm>.py against the issue's loop on the unflattened model."""
    overrides = (*FAST_DETECTOR, f"variants=[{arm}]")
    assert (
        cli(
            "generate", SPEC, "-o", tmp_path / "gen", *[a for o in overrides for a in ("--set", o)]
        ).exit_code
        == 0
    )
    script = tmp_path / "gen" / "synthetic_mlp" / f"train_{arm}.py"
    module = export(tmp_path, arm, *overrides)
    steps, run = 50, tmp_path / "run"
    subprocess.run(
        [
            sys.executable,
            script,
            "--epochs",
            "2",
            "--max-steps",
            str(steps),
            "--out",
            run,
            "--kernel",
            "torch",
        ],
        check=True,
        capture_output=True,
    )
    loop = tmp_path / "loop.pt"
    subprocess.run(
        [
            sys.executable,
            REPO / "tests" / "export_same_method.py",
            script,
            module,
            str(steps),
            "2",
            "0",
            loop,
        ],
        check=True,
    )
    ckpt = torch.load(run / "last.pt", weights_only=False)
    mine = torch.load(loop)
    assert ckpt["state"]["step"] == mine["steps"] == steps
    for name, value in ckpt["model"].items():
        assert torch.equal(value, mine["model"][name]), name
    if arm == "full":  # the detector decided too, at the same steps
        script_changes = [c["step"] for c in ckpt["state"]["phases"]]
        assert script_changes == mine["changes"] and len(script_changes) >= 1


# -- the API ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ap(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ap")
    return load_module(export(folder, "full", *FAST_DETECTOR), "ap_full_api")


def test_noise_has_the_spec_std_and_two_runs_are_identical(ap):
    runs = []
    for _ in range(2):
        model, optimizer = tiny()
        optimizer.param_groups[0]["lr"] = 0.0  # so the step changes nothing but the noise
        optimizer.param_groups[0]["momentum"] = 0.0
        before = flat(model)
        # the spec's noise is lr-scaled, on weights only: here absolute, on all parameters
        perturb = ap.AdaptivePerturbation(
            model, optimizer, seed=3, noise_scale="absolute", apply_to="all"
        )
        train(model, optimizer, perturb, 1)
        runs.append(flat(model) - before)
        assert perturb.eps == ap.EPS_PHASE[0] and perturb.phase == "exploration"
        perturb.remove()
    assert torch.equal(runs[0], runs[1])
    # 163 values: the sample std is within 20 % of eps with probability > 0.99
    assert abs(runs[0].std().item() / ap.EPS_PHASE[0] - 1) < 0.2


def test_state_dict_resumes_exactly(ap):
    model, optimizer = tiny()
    perturb = ap.AdaptivePerturbation(model, optimizer, seed=1)
    train(model, optimizer, perturb, 40)
    straight, phases = flat(model), perturb.state_dict()["detector"]
    perturb.remove()

    model, optimizer = tiny()
    perturb = ap.AdaptivePerturbation(model, optimizer, seed=1)
    train(model, optimizer, perturb, 17)
    saved = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "perturb": perturb.state_dict(),
    }
    perturb.remove()
    model, optimizer = tiny(seed=5)  # another init: everything must come from the checkpoint
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    perturb = ap.AdaptivePerturbation(model, optimizer, seed=1)
    perturb.load_state_dict(saved["perturb"])
    train(model, optimizer, perturb, 23, first=17)
    assert torch.equal(flat(model), straight)
    assert perturb.state_dict()["detector"] == phases
    assert perturb.steps == 40
    perturb.remove()


def test_a_step_the_grad_scaler_skipped_is_no_step(ap):
    model, optimizer = tiny()
    scaler = torch.amp.GradScaler("cpu")
    perturb = ap.AdaptivePerturbation(model, optimizer, seed=0)
    for poisoned in (False, True, False):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0]))
        scaler.scale(loss).backward()
        if poisoned:
            next(model.parameters()).grad[0, 0] = float("inf")
        before = flat(model)
        scaler.step(optimizer)
        scaler.update()
        eps = perturb.step(loss)
        assert (eps is None) == poisoned
        assert torch.equal(flat(model), before) == poisoned
    assert perturb.steps == 2
    perturb.remove()


def test_two_instances_with_different_settings_in_one_process(ap):
    """Settings are each instance's own (no module globals): another decay or eps beside
    the spec's changes nothing of the first instance."""
    (m1, o1), (m2, o2) = tiny(), tiny()
    spec = ap.AdaptivePerturbation(m1, o1, seed=0)
    other = ap.AdaptivePerturbation(m2, o2, seed=0, decay=0.5, eps_phase=(1.0, 1.0, 1.0))
    assert spec.epsilon(4, ap.LR) == pytest.approx(ap.EPS_PHASE[0] * math.exp(-ap.DECAY * 4))
    assert other.epsilon(4, ap.LR) == pytest.approx(math.exp(-0.5 * 4))
    assert ap.DECAY != 0.5  # the module's constants are the spec's still
    spec.remove()
    other.remove()


def test_bad_use_is_a_clear_error(ap, tmp_path):
    model, optimizer = tiny()
    with pytest.raises(ValueError, match=r"parameter\(s\) of the model are not the optimizer's"):
        ap.AdaptivePerturbation(model, torch.optim.SGD(model[0].parameters(), lr=0.1))
    with pytest.raises(ValueError, match="optimizer trains 2 parameter"):
        ap.AdaptivePerturbation(model[0], optimizer)
    with pytest.raises(TypeError, match="unknown setting.s. eps_fixd"):
        ap.AdaptivePerturbation(model, optimizer, eps_fixd=1e-3)
    with pytest.raises(ValueError, match=r"window=2: not a valid value \(the spec's is 4\)"):
        ap.AdaptivePerturbation(model, optimizer, window=2)
    perturb = ap.AdaptivePerturbation(model, optimizer)
    with pytest.raises(RuntimeError, match=r"perturb.step\(loss\) before any optimizer.step"):
        perturb.step(1.0)
    fixed = load_module(export(tmp_path, "fixed"), "ap_fixed_api").AdaptivePerturbation(*tiny())
    with pytest.raises(
        ValueError, match="from arm 'fixed' of spec 'synthetic_mlp'; this " "module is arm 'full'"
    ):
        perturb.load_state_dict(fixed.state_dict())
    with pytest.raises(ValueError, match="not an AdaptivePerturbation state dict"):
        perturb.load_state_dict({"generators": []})
    train(model, optimizer, perturb, 1)
    with pytest.raises(RuntimeError, match="again without an optimizer.step"):
        perturb.step(1.0)
    perturb.remove()
    fixed.remove()


def test_under_ddp_every_rank_draws_the_same_noise_and_takes_rank_0s_phase(tmp_path):
    (tmp_path / "adaptive_perturbation.py").write_bytes(
        (GENERATED / "mnist1d_cnn" / "adaptive_perturbation.py").read_bytes()
    )
    out = tmp_path / "replicas.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", REPO / "tests" / "export_ddp.py", tmp_path, out]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stderr[:6000]
    rank0, rank1 = json.loads(out.read_text())
    assert rank0 == rank1  # the same parameters, phase and phase start on both
    assert rank0["phase_start"] > 0  # rank 0's detector changed the phase, rank 1 followed
