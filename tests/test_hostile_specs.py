"""Hostile specs at the front door: fuzzed and hand-made YAML, --set texts, injected strings.

Every input ends in exit 0 or exit 2; on exit 2 every line but the last is
`FILE[:LINE]: ...` and the last is the error count; no traceback; nothing written.
Each case is counted in the robustness tally (tests/robustness.py).
"""

from __future__ import annotations

import ast
import io
import re
import tempfile
import tokenize
import tracemalloc
from pathlib import Path

import pytest
import yaml
from conftest import MINIMAL, SPECS, cli
from hypothesis import given, settings
from hypothesis import strategies as st
from robustness import TALLY

from generator.loading import MAX_NODES

EXAMPLES = [yaml.safe_load(p.read_text()) for p in SPECS]


def check_cli(result, spec: Path, cls: str, out: Path | None = None, where: str = "") -> None:
    """The contract of every door: exit 0 or 2, no traceback, FILE:LINE lines, no writes."""
    traceback = "Traceback" in result.output or not (
        result.exception is None or isinstance(result.exception, SystemExit)
    )
    TALLY.record(cls, f"exit {result.exit_code}", traceback=traceback)
    assert not traceback, result.output + repr(result.exception)
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 2:
        lines = result.output.strip().splitlines()
        count = re.fullmatch(r"(\d+) error\(s\); nothing was written\.", lines[-1])
        assert count and int(count[1]) == len(lines) - 1, lines
        # the spec, a file it extends (in its folder, or `where`), or a --set option
        files = "|".join(re.escape(f) for f in (str(spec.parent), where) if f)
        located = re.compile(rf"({files}|--set )[^\n]*?(:\d+)?: \S")
        assert all(located.match(line) for line in lines[:-1]), lines
        if out is not None:
            assert not out.exists(), "an invalid spec wrote output"


def run_validate(text: str | bytes, cls: str, *extra: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.yaml"
        spec.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "replace"))
        check_cli(cli("validate", spec, *extra), spec, cls)


# --- random documents ----------------------------------------------------------------------


@settings(max_examples=100)
@given(st.text(max_size=300))
def test_random_text_is_an_error_or_a_spec(text):
    run_validate(text, "random text as a spec")


@settings(max_examples=100)
@given(st.binary(max_size=300))
def test_binary_garbage_is_an_error(data):
    run_validate(data, "binary garbage as a spec")


# --- mutations of the example specs --------------------------------------------------------

HOSTILE_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(),  # NaN and infinities included: YAML .nan, .inf
    st.sampled_from([0, -1, 2**31, 2**63, 1e308, 5e-324, 1e-300, ""]),
    st.text(max_size=12),
    st.text(alphabet="ünïcødé→∞ℕ𝕏\u200b\u00a0ı", min_size=1, max_size=8),
)
HOSTILE_VALUES = st.recursive(
    HOSTILE_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def _paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, path + (i,))


@st.composite
def mutated_specs(draw, numbers_only=False):
    """An example spec with one to three paths deleted, replaced or buried in nesting."""
    doc = yaml.safe_load(yaml.safe_dump(draw(st.sampled_from(EXAMPLES))))
    for _ in range(draw(st.integers(1, 1 if numbers_only else 3))):
        paths = [
            p
            for p in _paths(doc)
            if p
            and (
                not numbers_only
                or isinstance(_get(doc, p), (int, float))
                and not isinstance(_get(doc, p), bool)
            )
        ]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _get(doc, path[:-1])
        if numbers_only:
            parent[path[-1]] = draw(
                st.one_of(
                    st.integers(min_value=-(10**30), max_value=10**30),
                    st.floats(allow_nan=False, allow_infinity=False),
                    st.sampled_from([0, 1, 2, 10**18, 2**63, 1e-300, 1e300, 0.999999999]),
                    st.integers(1, 64),  # plausible values too, so that some specs render
                    st.floats(1e-6, 0.99),
                )
            )
            continue
        action = draw(st.sampled_from(["delete", "replace", "nest", "rename"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "replace":
            parent[path[-1]] = draw(HOSTILE_VALUES)
        elif action == "nest":
            parent[path[-1]] = {"deeper": [parent[path[-1]]] * 2}
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = parent.pop(path[-1])
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)


def _get(doc, path):
    for part in path:
        doc = doc[part]
    return doc


@settings(max_examples=200)
@given(mutated_specs())
def test_mutated_example_specs(text):
    run_validate(text, "mutated example specs")


@settings(max_examples=6)  # about half render, at ~0.3 s of black per script
@given(mutated_specs(numbers_only=True))
def test_mutated_numbers_generate_valid_code_or_nothing(text):
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "spec.yaml", Path(tmp) / "out"
        spec.write_text(text)
        result = cli("generate", spec, "-o", out)
        check_cli(result, spec, "mutated numbers, generated", out)
        if result.exit_code == 0:
            (folder,) = out.iterdir()  # one folder, no temporary siblings left behind
            for script in folder.glob("*.py"):
                ast.parse(script.read_text())


# --- YAML features -------------------------------------------------------------------------

BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi")
)
YAML_CASES = {
    "python object tag": (
        "!!python/object/apply:os.system ['echo pwned']",
        ":1: YAML tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed",
    ),
    "python name in a value": (
        MINIMAL.replace("name: tiny", "name: !!python/name:os.system"),
        ":1: name: YAML tag",
    ),
    "custom tag": (MINIMAL.replace("lr: 0.1", "lr: !float 0.1"), ":4: optimizer.lr: YAML tag"),
    "binary tag": (MINIMAL.replace("name: tiny", "name: !!binary aGk="), ":1: name: YAML tag"),
    "set": (MINIMAL.replace("[16]", "!!set {16}"), ":3: model.hidden: YAML tag"),
    "timestamp": (
        MINIMAL + "seed: 2001-12-14\n",
        ":7: seed: input should be a valid integer (got '2001-12-14')",
    ),
    "non-string key": (MINIMAL + "? [a, b]\n: 1\n", ":7: mapping keys must be plain strings"),
    "integer key": (MINIMAL + "1: 2\n", ":7: mapping keys must be plain strings"),
    "merge key": (
        MINIMAL.replace("optimizer:", "base: &b {name: sgd, lr: 0.1}\noptimizer: {<<: *b}\nx:"),
        ": base: unknown key",
    ),
    "anchor reused": (
        MINIMAL.replace("[16]", "&w [16]").replace("variants:", "extra: *w\nvariants:"),
        ":6: extra: unknown key",
    ),
    "undefined alias": (MINIMAL.replace("[16]", "*nothing"), ":3: YAML syntax error"),
    "two documents": (MINIMAL + "---\nname: other\n", ":7: YAML syntax error"),
    "empty file": ("", ":1: the document is empty"),
    "only a comment": ("# nothing\n", ":1: the document is empty"),
    "a list": ("- name: x\n", ":1: a spec must be a mapping of sections"),
    "a scalar": ("42\n", ":1: a spec must be a mapping of sections"),
    "deep flow nesting": ("x: " + "[" * 2000 + "]" * 2000, ":1: nested more than 64 levels"),
    "deep block nesting": (
        "a:\n" + "".join(" " * (i + 1) + f"k{i}:\n" for i in range(400)),
        ": nested more than 64 levels",
    ),
    "control character": (MINIMAL.replace("tiny", "ti\x07ny"), ":1: control character U+0007"),
    "NUL byte": (MINIMAL + "\x00", ":7: control character U+0000"),
    "not UTF-8": (b"name: \xff\xfe\n", ":1: not UTF-8 text (byte 0xff at offset 6)"),
    "BOM and CRLF": ("\ufeff" + MINIMAL.replace("\n", "\r\n"), None),
    "huge integer": (
        MINIMAL.replace("epochs: 2", "epochs: 1" + "0" * 30),
        ":5: train.epochs: must be < 2147483648",
    ),
    "integer of 5000 digits": (
        MINIMAL.replace("epochs: 2", "epochs: 1" + "0" * 5000),
        ":5: train.epochs: an integer of 5001 digits is too large",
    ),
    "NaN": (MINIMAL.replace("lr: 0.1", "lr: .nan"), ":4: optimizer.lr: must be a finite"),
    "infinity": (MINIMAL.replace("lr: 0.1", "lr: -.inf"), ":4: optimizer.lr: must be a finite"),
    "float overflow": (MINIMAL.replace("lr: 0.1", "lr: 1e999"), ":4: optimizer.lr: must be a"),
}


@pytest.mark.parametrize("case", YAML_CASES, ids=list(YAML_CASES))
def test_yaml_features(case, tmp_path):
    text, message = YAML_CASES[case]
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(text if isinstance(text, bytes) else text.encode())
    result = cli("validate", spec)
    check_cli(result, spec, "YAML features")
    if message is None:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 2 and message in result.output, result.output


def test_alias_bomb_is_refused_in_bounded_memory(tmp_path):
    spec = tmp_path / "bomb.yaml"
    spec.write_text(BOMB)
    tracemalloc.start()
    try:
        result = cli("validate", spec)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    check_cli(result, spec, "alias bomb")
    assert ":2: b[0][0]" not in result.output  # the bound is hit deep in the expansion ...
    assert f"document expands to more than {MAX_NODES} nodes" in result.output
    # ... long before memory matters: 100k nodes of a few hundred bytes each are tens of
    # MB, where the whole expansion would be 9**9 strings (tens of GB)
    assert peak < 200 * 2**20, f"{peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("where", ["/dev/zero", "a FIFO", "a folder named like a spec"])
def test_not_a_regular_file(where, tmp_path):
    import os

    if where == "/dev/zero":  # reading it would never end
        path = Path("/dev/zero")
    elif where == "a FIFO":  # reading it would block forever
        path = tmp_path / "fifo.yaml"
        os.mkfifo(path)
    else:  # a folder argument is a folder of specs
        path = tmp_path / "d.yaml"
        path.mkdir()
    result = cli("validate", path)
    check_cli(result, path, "YAML features", where=str(path))
    message = "folder holds no *.yaml spec" if path.is_dir() else "is not a regular file"
    assert result.exit_code == 2 and f"{path}: {message}" in result.output


def test_extends_cannot_reach_beyond_a_regular_file(write_spec):
    spec = write_spec("extends: /dev/zero\n" + MINIMAL)
    result = cli("validate", spec)
    check_cli(result, spec, "YAML features", where="/dev/zero")
    assert "/dev/zero: is not a regular file" in result.output


# --- --set ---------------------------------------------------------------------------------


@settings(max_examples=100)
@given(
    st.one_of(
        st.text(max_size=40),
        st.builds(
            "{}={}".format,
            st.sampled_from(["optimizer.lr", "train.epochs", "data", "name", "a.b.c", "x"]),
            st.one_of(
                st.text(max_size=30),
                st.sampled_from(["[", "{a: 1", "!!python/name:os", "*x", "0.05", "3", "{}"]),
            ),
        ),
    )
)
def test_set_overrides(text):
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.yaml"
        spec.write_text(MINIMAL)
        check_cli(cli("validate", spec, "--set", text), spec, "--set overrides")


# --- hostile strings -----------------------------------------------------------------------

NASTY = [
    '"',
    "'",
    '"""',
    "'''",
    "\\",
    "\\n",
    "\\x00",
    "#",
    "\n",
    "\r\n",
    "\t",
    "\x00",
    "\u2028",
    "\u0085",
    "\ufeff",
    "\u200b",
    "ʺ",
    "＂＂＂",
    "ｉｍｐｏｒｔ",
    "{{ m.arm }}",
    "{% raw %}",
    "${HOME}",
    "`rm -rf ~`",
    "); import os; os.system('x')  #",
    "__import__('os')",
    "x' + str(1) + '",
    "é",
    "𝕏",
    " ",
    "a",
]
# the two fields that take free text come up twice as often
FIELDS = [
    "name",
    "description",
    "description",
    "baseline name",
    "data.root",
    "data.root",
    "extends",
]
INERT_BASE = MINIMAL.replace("variants: [baseline, fixed]", "variants: [full]")


def _spec_with(field: str, value: str) -> tuple[dict, str]:
    """The spec with `value` in `field`, and the name of its extra baseline."""
    doc = yaml.safe_load(INERT_BASE)
    baseline = "extra"
    if field == "name":
        doc["name"] = value
    elif field == "description":
        doc["description"] = value
    elif field == "baseline name":
        baseline = value
    elif field == "data.root":
        doc["data"]["root"] = value
    else:
        doc["extends"] = value
    doc["baselines"] = {baseline: {"optimizer": {"name": "adam", "lr": 0.001}}}
    return doc, baseline


def _shape(source: str) -> str:
    """The program with every string constant's value blanked: its structure alone."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            node.value = "S"
    return ast.dump(tree)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The scripts of the benign spec, by arm kind."""
    tmp = tmp_path_factory.mktemp("reference")
    doc, _ = _spec_with("description", "benign")
    (tmp / "spec.yaml").write_text(yaml.safe_dump(doc))
    assert cli("generate", tmp / "spec.yaml", "-o", tmp / "out").exit_code == 0
    folder = tmp / "out" / "tiny"
    return {
        "full": _shape((folder / "train_full.py").read_text()),
        "extra": _shape((folder / "train_baseline_extra.py").read_text()),
    }


def generate_hostile(reference, field: str, value: str) -> int:
    """Generate the spec with `value` in `field`; if it renders, prove the value inert."""
    doc, baseline = _spec_with(field, value)
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "spec.yaml", Path(tmp) / "out"
        spec.write_text(yaml.safe_dump(doc, allow_unicode=True))
        result = cli("generate", spec, "-o", out)
        check_cli(result, spec, "hostile strings in string fields", out)
        if result.exit_code == 2:
            return 2
        (folder,) = out.iterdir()
        for arm, script in (("full", "train_full.py"), ("extra", f"train_baseline_{baseline}.py")):
            source = (folder / script).read_text()
            # the hostile value changed no code, only the values of string constants ...
            assert _shape(source) == reference[arm], f"{field}={value!r} changed {script}"
            # ... and outside string literals the marker appears in comments at most
            for token in tokenize.generate_tokens(io.StringIO(source).readline):
                if "zq" in token.string:
                    assert token.type in (tokenize.STRING, tokenize.COMMENT), token
            constants = {
                t.id: n.value.value
                for n in ast.parse(source).body
                if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
                for t in n.targets
            }
            if field == "data.root":  # the value arrives intact, not mangled
                assert constants["DATA_ROOT"] == value
            if field == "description":
                docstring = ast.get_docstring(ast.parse(source), clean=False)
                assert " ".join(value.split()) in " ".join(docstring.split())
        return 0


@settings(max_examples=16)
@given(
    st.sampled_from(FIELDS),
    st.lists(st.sampled_from(NASTY), min_size=1, max_size=5).map("".join),
)
def test_hostile_strings_are_rejected_or_inert(reference, field, payload):
    generate_hostile(reference, field, "zq" + payload)  # zq: a marker to find the value by


# Strings that validation lets through (printable, one line, no backslash or triple
# double quote): each must render, and inertly.
ACCEPTED = [
    '"; import os; os.system("x")  #',
    "'; __import__('os').system('x'); '",
    '""',
    "''' \"\" '''",
    "＂＂＂ ｉｍｐｏｒｔ ｏｓ",
    "{{ m.arm }} {% raw %} ${HOME} `id`",
    "# not a comment",
    "x' + str(1) + '",
    " trailing and  double  spaces ",
]


@pytest.mark.parametrize("field", ["description", "data.root"])
@pytest.mark.parametrize("value", ACCEPTED, ids=range(len(ACCEPTED)))
def test_accepted_hostile_strings_render_inert(reference, field, value):
    assert generate_hostile(reference, field, "zq" + value) == 0
