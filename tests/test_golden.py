"""Layer 3: the golden record in generated/ is exactly what the CLI emits now."""

from __future__ import annotations

import difflib
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import GENERATED, REPO, SPECS, cli

from generator import render
from generator.plan import plan
from generator.spec import schema_text

REFRESH = "perturbgen generate specs -o generated"


def tree(root):
    """Every file under root, but Python's bytecode caches (not the generator's output: they
    appear beside the support module when a script runs in place)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_golden_record_matches(tmp_path):
    result = cli("generate", REPO / "specs", "-o", tmp_path)
    assert result.exit_code == 0, result.output
    fresh, golden = tree(tmp_path), tree(GENERATED)
    problems = []
    for name in sorted(set(fresh) | set(golden)):
        if fresh.get(name) != golden.get(name):
            diff = difflib.unified_diff(
                golden.get(name, b"").decode().splitlines(),
                fresh.get(name, b"").decode().splitlines(),
                f"generated/{name}",
                f"fresh/{name}",
                lineterm="",
                n=2,
            )
            problems.append("\n".join(list(diff)[:40]))
    assert not problems, (
        "generated/ is stale; refresh it with: " + REFRESH + "\n" + "\n".join(problems)
    )


def test_check_passes_on_the_committed_record():
    result = cli("generate", "specs/", "--check", cwd=REPO)
    assert result.exit_code == 0, result.output
    assert "up to date" in result.output


def test_check_reports_drift_after_a_template_edit(tmp_path, monkeypatch):
    spec = "specs/synthetic_mlp.yaml"  # one spec is enough, and each render costs seconds
    templates = tmp_path / "templates"
    shutil.copytree(render.templates_dir(), templates)
    partial = templates / "_model.py.jinja"
    partial.write_text(partial.read_text().replace("# Model", "# Model (edited)"))
    monkeypatch.setattr(render, "templates_dir", lambda: templates)
    render.environment.cache_clear()
    try:
        result = cli("generate", spec, "--check", cwd=REPO)
    finally:
        render.environment.cache_clear()
    assert result.exit_code == 1
    assert "drift: generated/synthetic_mlp/train_baseline.py differs" in result.output
    assert f"refresh it with: perturbgen generate {spec} -o generated" in result.output


def test_output_is_identical_under_two_hash_seeds(tmp_path):
    outputs = []
    for seed in ("0", "12345"):  # the richest spec: every arm and two extra baselines
        out = tmp_path / seed
        # the golden folder as the previous output: a script is reused only where its
        # unformatted source hashes to the recorded one, so that hash is compared too
        shutil.copytree(GENERATED / "mnist1d_cnn", out / "mnist1d_cnn")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "generator",
                "generate",
                "specs/mnist1d_cnn.yaml",
                "-o",
                str(out),
            ],
            cwd=REPO,
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        outputs.append(tree(out))
    assert outputs[0] == outputs[1] and outputs[0]
    assert outputs[0] == {k: v for k, v in tree(GENERATED).items() if k.startswith("mnist1d_cnn/")}


def test_manifest_lists_every_file_with_its_hash():
    import hashlib

    for folder in sorted(p for p in GENERATED.iterdir() if p.is_dir()):
        manifest = json.loads((folder / "manifest.json").read_text())
        files = {
            p.name: p for p in folder.iterdir() if p.name not in ("manifest.json", "__pycache__")
        }
        assert set(manifest["files"]) == set(files)
        for name, digest in manifest["files"].items():
            assert hashlib.sha256(files[name].read_bytes()).hexdigest() == digest
        assert manifest["resolved_spec"]["name"] == folder.name


def test_schema_file_is_current():
    assert (
        REPO / "specs" / "spec.schema.json"
    ).read_text() == schema_text(), "refresh with: perturbgen schema -o specs/spec.schema.json"


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_example_specs_point_editors_at_the_schema(path):
    assert path.read_text().startswith("# yaml-language-server: $schema=spec.schema.json\n")


def test_every_spec_has_a_golden_folder():
    assert sorted(p.name for p in GENERATED.iterdir() if p.is_dir()) == sorted(
        p.stem for p in SPECS
    )


def _sources(spec_path, arms=()):
    spec, doc = render.load_spec(spec_path)
    models = plan(spec, doc)
    support = render.support_source(models)
    chosen = [m for m in models if not arms or m.arm in arms]
    return {
        f"{models[0].support_module}.py": support,
        **{m.script: render.script_source(m, support) for m in chosen},
    }


def test_blockwise_black_equals_whole_file_black():
    # every arm of the richest spec and the fullest arm of every other: each template path
    import black

    sources = _sources(REPO / "specs" / "mnist1d_cnn.yaml")
    for path in (p for p in SPECS if p.stem != "mnist1d_cnn"):
        sources.update({f"{path.stem}/{k}": v for k, v in _sources(path, ["full"]).items()})
    # mnist1d_cnn: 7 variants, 2 extra baselines; every spec: its support module
    assert len(sources) == 9 + 2 * len(SPECS) - 1
    render._FORMATTED.clear()  # no block formatted earlier in this process may stand in
    blockwise = render.format_sources(sources)
    for name, source in sources.items():
        assert len(render.blocks(source)) > 5, name  # the cut really happens
        assert blockwise[name] == black.format_str(source, mode=render.BLACK_MODE), name


AWKWARD = """\
\"\"\"Doc.\"\"\"
import os
x = 1
def stub(): ...
def hugged(): ...



class A:
    def m(self):
        return 1
    # an indented comment after a body stays with the body
x = [1,
  2]
@staticmethod  # after an assignment: no cut
def decorated():
  pass
# a column-0 comment moves with what follows

def tail(): return os
if __name__ == "__main__":
    tail()
"""


def test_blocks_cut_only_where_black_forces_two_blank_lines():
    import black

    parts = render.blocks(AWKWARD)
    assert [p.splitlines()[0] for p in parts] == [
        '"""Doc."""',  # stubs hug their neighbours, an indented comment keeps A whole,
        "# a column-0 comment moves with what follows",
        'if __name__ == "__main__":',
    ]
    render._FORMATTED.clear()
    assert render.format_sources({"m": AWKWARD})["m"] == black.format_str(
        AWKWARD, mode=render.BLACK_MODE
    )


def test_check_of_an_unchanged_record_runs_no_black(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("black was called")

    monkeypatch.setattr(render, "format_sources", lambda todo: {} if not todo else refuse())
    result = cli("generate", "specs/", "--check", cwd=REPO)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: (d / "train_fixed.py").write_text("# edited by hand\n"),
        lambda d: (d / "manifest.json").write_text(
            (d / "manifest.json").read_text().replace('"formatter": "black', '"formatter": "old')
        ),
        lambda d: (d / "train_fixed.py").unlink(),
        lambda d: (d / "manifest.json").write_text("{not json"),
    ],
    ids=["edited-script", "other-formatter", "missing-script", "broken-manifest"],
)
def test_reuse_never_hides_drift(tmp_path, tamper):
    folder = tmp_path / "synthetic_mlp"
    shutil.copytree(GENERATED / "synthetic_mlp", folder)
    tamper(folder)
    result = cli("generate", "specs/synthetic_mlp.yaml", "-o", tmp_path, "--check", cwd=REPO)
    assert result.exit_code == 1, result.output
    result = cli("generate", "specs/synthetic_mlp.yaml", "-o", tmp_path, cwd=REPO)
    assert result.exit_code == 0, result.output
    assert tree(folder) == tree(GENERATED / "synthetic_mlp")  # repaired from the templates


def test_formatting_workers_are_not_forked_from_the_caller():
    """The formatter's pool must not fork the calling process: a pytest worker or a CLI run
    may hold threads (a tracker's, a logger's), and a child that inherits a lock one of them
    held waits forever. The workers' parent is a fresh single-threaded server instead."""
    with render._pool(2) as pool:
        parents = {pool.apply(os.getppid) for _ in range(4)}
    assert os.getpid() not in parents
