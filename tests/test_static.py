"""Layer 4: static checks of every emitted file, for every arm of every spec."""

from __future__ import annotations

import ast
import copy
import difflib
import shutil
import subprocess
import sys

import pytest
from conftest import GENERATED, MINIMAL, REPO, SCRIPTS, cli, generate

ids = [p.relative_to(GENERATED).as_posix() for p in SCRIPTS]


def test_there_are_scripts_to_check():
    assert len(SCRIPTS) >= 6


def ruff_names(*paths):
    """ruff's undefined-name, unused-import and syntax rules over paths: the finished run."""
    ruff = [sys.executable, "-m", "ruff"] if shutil.which("ruff") is None else ["ruff"]
    return subprocess.run(
        [*ruff, "check", "--no-cache", "--isolated", "--select", "F821,F401,F811,F841,E9"]
        + [str(p) for p in paths],
        capture_output=True,
        text=True,
    )


def test_ruff_finds_no_undefined_or_unused_names(tmp_path, write_spec):
    # the golden record, plus every arm of a spec using the other options
    spec = write_spec()
    assert cli("generate", spec, "-o", tmp_path / "out").exit_code == 0
    result = ruff_names(GENERATED, tmp_path / "out")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=ids)
def test_script_reads_like_a_script(script):
    source = script.read_text()
    tree = ast.parse(source)
    assert ast.get_docstring(tree).startswith(script.parent.name)
    assert max(len(line) for line in source.splitlines()) < 100
    calls = {
        n.func.id
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }
    assert not calls & {"exec", "eval", "globals", "compile"}
    # no work at import time: the module body holds only imports, constants, defs and the guard
    for node in tree.body:
        assert isinstance(
            node,
            (
                ast.Import,
                ast.ImportFrom,
                ast.Assign,
                ast.FunctionDef,
                ast.ClassDef,
                ast.If,
                ast.Expr,
                ast.Try,
            ),
        ), ast.dump(node)[:80]
        if isinstance(node, ast.Try):  # only an optional import with its fallback
            assert all(isinstance(n, ast.Import) for n in node.body)
            assert [h.type.id for h in node.handlers] == ["ImportError"]
    sections = [line for line in source.splitlines() if line.startswith("# ")]
    order = [
        s
        for s in ["# Data", "# Model", "# Perturbation", "# Checkpointing", "# Training"]
        if s in sections
    ]
    assert order == [s for s in sections if s in order]


# The names each arm's script must define or import from the support module, and those it
# must not: an arm holds only the code its ablation needs (a detector arm names only the
# subclass that samples).
ARM_NAMES = {
    "baseline": set(),
    "fixed": {"Perturbation", "Epsilon", "EPS_FIXED"},
    "phase_only": {
        "SampledPerturbation", "Epsilon", "PhaseDetector", "EPS_PHASE", "EVERY", "WINDOW",
    },
    "schedule_only": {"Perturbation", "Epsilon", "EPS_BASE", "DECAY"},
    "gradient_noise": {
        "Perturbation", "DrawnNoise", "GradientNoise", "Epsilon", "NOISE_ETA", "NOISE_GAMMA",
    },
    "anti_pgd": {"Perturbation", "DrawnNoise", "AntiPGD", "Epsilon", "SIGMA"},
    "full": {
        "SampledPerturbation", "Epsilon", "PhaseDetector", "EPS_PHASE", "DECAY", "EVERY",
        "WINDOW",
    },
}


def _support_import(node):
    """Whether a top-level statement imports from the spec's shared support module."""
    return isinstance(node, ast.ImportFrom) and node.module.endswith("_support")


@pytest.mark.parametrize("script", SCRIPTS, ids=ids)
def test_each_arm_holds_only_the_code_it_needs(script):
    # what the arm defines, and what it takes from the support module: the shared module
    # holds the noise machinery, but only the arms that perturb name it
    tree = ast.parse(script.read_text())
    defined = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    defined |= {a.name for n in tree.body if _support_import(n) for a in n.names}
    defined |= {
        t.id
        for n in tree.body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    arm = script.stem.removeprefix("train_")
    kind = "baseline" if arm.startswith("baseline") else arm
    everything = set().union(*ARM_NAMES.values())
    assert defined & everything == ARM_NAMES[kind]


# ---- The arms differ by the perturbation alone ------------------------------------------
#
# Each perturbing arm's syntax tree is compared with its baseline's after removing what the
# perturbation adds, which is documented in README.md ("How the arms differ"):
#   - the Perturbation section, the constants only the arm has, the optional imports of
#     the noise kernels (IMPORTS) and the names only the arm imports from the support module;
#   - its call sites: statements (and dict entries and call arguments) that use a name of
#     the perturbation
#     (the section's names, those constants, `perturbation`, and what its step returns,
#     `eps` and `change`) or one of its record keys (KEYS);
#   - the baseline's optimizer step that an arm hands to perturbation.step (HANDED_OVER),
#     one per call of perturbation.step;
#   - the text of messages (log, fail, --help), which may say "noise" only where there is.
# Anything else that differs fails, with the differing lines.

IMPORTS = {"triton", "tl", "ThreadPoolExecutor"}
RETURNED = {"perturbation", "eps", "change"}
KEYS = {"eps", "kernel", "perturbation", "phase_steps"}
HANDED_OVER = {"optimizer.step()", "stepped = scaler_step(scaler, optimizer)"}
MESSAGES = {"log", "fail", "help", "description"}  # calls and keywords that take messages
BODIES = ("body", "handlers", "orelse", "finalbody")


def _bound(node):
    """Names a top-level statement binds."""
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, ast.Try):
        return set().union(*(_bound(n) for n in node.body))
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    return set()


def _uses(node, names):
    return any(
        (isinstance(n, ast.Name) and n.id in names)
        or (isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in KEYS)
        for n in ast.walk(node)
    )


class _Normalize(ast.NodeTransformer):
    """Drops the perturbation's dict entries and call arguments, and blanks the text of
    messages."""

    def __init__(self, names):
        self.names = names

    def visit_Dict(self, node):
        # decided before the inner calls lose their perturbation arguments; an entry holding
        # a dict is kept, and its own entries are decided in turn
        pairs = [
            (k, v)
            for k, v in zip(node.keys, node.values)
            if not (k is not None and _uses(k, self.names))
            and (isinstance(v, ast.Dict) or not _uses(v, self.names))
        ]
        node.keys, node.values = [k for k, _ in pairs], [v for _, v in pairs]
        return self.generic_visit(node)

    def visit_Call(self, node):
        # an argument that hands the call something of the perturbation's is a call site
        node.args = [a for a in node.args if not _uses(a, self.names)]
        node.keywords = [k for k in node.keywords if not _uses(k.value, self.names)]
        called = node.func.id if isinstance(node.func, ast.Name) else None
        for arg in [*node.args, *(k.value for k in node.keywords if k.arg in MESSAGES)]:
            if called in MESSAGES or arg not in node.args:
                for n in ast.walk(arg):
                    if isinstance(n, ast.JoinedStr):
                        n.values = [v for v in n.values if isinstance(v, ast.FormattedValue)]
        return self.generic_visit(node)


def _lines(statements, depth, names, out):
    """Each statement as (depth, text, is a call site): a compound statement as its header
    line, then its bodies; one that is a call site as a whole. Whether it is one is decided
    on the statement as written, its text after _Normalize."""
    for node in statements:
        bodies = [f for f in BODIES if getattr(node, f, None)]
        header = node
        if bodies:
            header = copy.copy(node)
            for f in bodies:
                setattr(header, f, [])
        site = _uses(header, names)
        text = ast.unparse(_Normalize(names).visit(copy.deepcopy(node)))
        if site or not bodies or text in HANDED_OVER:
            out.append((depth, text, site))
            continue
        out.append((depth, ast.unparse(_Normalize(names).visit(copy.deepcopy(header))), False))
        for f in bodies:
            if f in ("orelse", "finalbody"):
                out.append((depth, "else:" if f == "orelse" else "finally:", False))
            _lines(getattr(node, f), depth + 1, names, out)


def _sections(source):
    """Top-level nodes by banner section ('# Data', '# Perturbation', ...)."""
    banners, section, previous = {}, None, ""
    for number, line in enumerate(source.splitlines(), 1):
        if previous.startswith("# ---"):
            section = line.split(" from ")[0]  # "# Settings from the spec; ..."
        banners[number], previous = section, line
    return banners


def _without(node, names):
    """An import from the support module without the perturbation's names."""
    node = copy.copy(node)
    node.names = [a for a in node.names if a.name not in names]
    return node


def arm_differences(baseline_source, arm_source):
    """The lines in which an arm differs from its baseline beyond the perturbation."""
    trees, banners = [], []
    for source in (baseline_source, arm_source):
        tree = ast.parse(source)
        trees.append(tree)
        banners.append(_sections(source))
    base_tree, arm_tree = trees
    base_bound = set().union(*(_bound(n) for n in base_tree.body))
    section = [n for n in arm_tree.body if banners[1][n.lineno] == "# Perturbation"]
    constants = {
        name
        for n in arm_tree.body
        if isinstance(n, ast.Assign) and banners[1][n.lineno] == "# Settings"
        for name in _bound(n) - base_bound
    }
    shared = {a.name for n in arm_tree.body if _support_import(n) for a in n.names}
    names = set().union(*(_bound(n) for n in section)) | constants | IMPORTS | RETURNED
    names |= shared - base_bound
    kept = []
    for tree in trees:
        body = [
            _without(n, names) if _support_import(n) else n
            for n in tree.body[1:]  # the module docstring names the arm and its eps(t)
            if n not in section and not (_bound(n) and _bound(n) <= names | {"ARM"})
        ]
        out = []
        _lines(body, 0, names, out)
        kept.append(out)
    base, arm = kept
    problems = []
    matcher = difflib.SequenceMatcher(None, [l[:2] for l in base], [l[:2] for l in arm], False)
    for op, b1, b2, a1, a2 in matcher.get_opcodes():
        if op == "equal":
            continue
        # each perturbation.step(...) takes over one optimizer step of the baseline
        takers = sum("perturbation.step(" in l[1] for l in arm[a1:a2])
        lost = []
        for line in base[b1:b2]:
            if line[1] in HANDED_OVER and takers > 0:
                takers -= 1
            else:
                lost.append(line)
        added = [l for l in arm[a1:a2] if not l[2]]
        problems += [f"- {'    ' * d}{text}" for d, text, _ in lost]
        problems += [f"+ {'    ' * d}{text}" for d, text, _ in added]
    return problems


PAIRS = [
    (p.parent / "train_baseline.py", p)
    for p in SCRIPTS
    if p.stem.removeprefix("train_") != "baseline" and not p.stem.startswith("train_baseline_")
]


@pytest.mark.parametrize(
    "pair", PAIRS, ids=[p[1].relative_to(GENERATED).as_posix() for p in PAIRS]
)
def test_arms_differ_from_the_baseline_by_the_perturbation_alone(pair):
    base, arm = (p.read_text() for p in pair)
    problems = arm_differences(base, arm)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_the_guard_holds_under_amp(amp, tmp_path):
    arms = ("fixed", "phase_only", "full", "gradient_noise", "anti_pgd")
    text = MINIMAL.replace("[baseline, fixed]", f"[baseline, {', '.join(arms)}]")
    folder = generate(tmp_path, text, f"train.amp={amp}")
    base = (folder / "train_baseline.py").read_text()
    for arm in arms:
        problems = arm_differences(base, (folder / f"train_{arm}.py").read_text())
        assert not problems, arm + "\n" + "\n".join(problems)


@pytest.fixture
def doubled_loss():
    """train_fixed.py of mnist1d_cnn with `share = share * 2.0` before its backward: a change to
    the training that is not the perturbation."""
    source = (GENERATED / "mnist1d_cnn" / "train_fixed.py").read_text()
    anchor = "                scaler.scale(share).backward()\n"
    assert source.count(anchor) == 1
    return source.replace(anchor, "                share = share * 2.0\n" + anchor)


def test_the_guard_fails_on_a_doubled_loss(doubled_loss):
    base = (GENERATED / "mnist1d_cnn" / "train_baseline.py").read_text()
    assert arm_differences(base, doubled_loss) == ["+                 share = share * 2.0"]


def test_the_guard_fails_on_a_lost_line_and_on_other_settings():
    base = (GENERATED / "mnist1d_cnn" / "train_baseline.py").read_text()
    fixed = (GENERATED / "mnist1d_cnn" / "train_fixed.py").read_text()
    lost = fixed.replace("    model.train()\n    for epoch in", "    for epoch in")
    assert arm_differences(base, lost) == ["-     model.train()"]
    other_lr = fixed.replace("\nLR = 0.1  #", "\nLR = 0.2  #")
    assert arm_differences(base, other_lr) == ["- LR = 0.1", "+ LR = 0.2"]


def test_exported_modules_of_every_perturbing_arm_pass_ruff(tmp_path):
    """`perturbgen export` of each perturbing arm, with the detector's absolute thresholds
    and a loss_smooth threshold, checked like the scripts (the golden record carries `full`)."""
    spec = REPO / "specs" / "synthetic_mlp.yaml"
    sets = ["--set", "phase_detector.thresholds={mode: absolute, tau_smooth: 0.1}"]
    sets += ["--set", "variants=[fixed, phase_only, schedule_only, full, gradient_noise, anti_pgd]"]
    for arm in ("fixed", "phase_only", "schedule_only", "full", "gradient_noise", "anti_pgd"):
        out = tmp_path / f"ap_{arm}.py"
        assert cli("export", spec, arm, "-o", out, *sets).exit_code == 0
        source = out.read_text()
        ast.parse(source)
        assert max(len(line) for line in source.splitlines()) < 100
    ruff = [sys.executable, "-m", "ruff"] if shutil.which("ruff") is None else ["ruff"]
    result = subprocess.run(
        [
            *ruff,
            "check",
            "--no-cache",
            "--isolated",
            "--select",
            "F821,F401,F811,F841,E9",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
