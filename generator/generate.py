"""Generate: a spec → its output folder in memory (every arm's script, README.md, the
drop-in module, manifest.json), formatting only what an earlier output does not hold."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from generator import __version__
from generator.export import golden_sources
from generator.loading import Located
from generator.output import Rendered
from generator.plan import ReadmeModel, RenderModel, plan, spec_hash, support_module
from generator.render import (
    check_arms,
    format_sources,
    formatter_id,
    load_spec,
    render_readme,
    script_source,
    support_source,
)
from generator.spec import Spec, arm_names


def render_spec(
    path: Path, overrides: list[str] = (), arms: list[str] = (), previous: Path | None = None
) -> Rendered:
    spec, doc = load_spec(path, overrides)
    return render(spec, doc, path, arms, previous)


def render(
    spec: Spec, doc: Located, path: Path, arms: list[str] = (), previous: Path | None = None
) -> Rendered:
    """A loaded spec's arms (all, or those named), README and manifest, in memory."""
    return render_all([(spec, doc, path)], arms, previous)[0]


def render_all(
    loaded: list[tuple[Spec, Located, Path]],
    arms: list[str] = (),
    previous: Path | None = None,
    keep_arms: bool = False,
) -> list[Rendered]:
    """Several loaded specs at once, so that black sees all their blocks in one batch.

    `previous` is a folder of earlier output (OUT): a script whose unformatted source hashes
    to what OUT/<spec>/manifest.json recorded under the same formatter, and whose file there
    is intact, is taken from there instead of being formatted again. With `keep_arms`, the
    spec's arms that OUT/<spec> holds are rendered beside those in `arms`, so that writing
    some arms into a folder keeps the others (made again from this spec: one folder, one
    spec, one manifest).
    """
    drafts = []
    for spec, doc, path in loaded:
        check_arms(spec, path, arms)
        chosen = set(arms)
        if arms and keep_arms and previous:
            chosen.update(arms_in(previous / spec.name, spec))
        every_arm = plan(spec, doc)
        models = [m for m in every_arm if not chosen or m.arm in chosen]
        support = support_source(every_arm)  # the same file whichever arms are written
        sources = {m.script: script_source(m, support) for m in models}
        sources[f"{support_module(spec.name)}.py"] = support
        sources.update(golden_sources(models))  # the drop-in module (perturbgen export)
        drafts.append((spec, models, sources))
    scripts, todo = {}, {}
    for spec, _, sources in drafts:
        recorded = _formatted_on_disk(previous / spec.name) if previous else {}
        for script, source in sources.items():
            key = f"{spec.name}/{script}"
            if (script, _sha256(source.encode())) in recorded:
                scripts[key] = recorded[script, _sha256(source.encode())]
            else:
                todo[key] = source
    scripts.update((key, text.encode()) for key, text in format_sources(todo).items())
    return [_folder(spec, models, sources, scripts) for spec, models, sources in drafts]


def arms_in(folder: Path, spec: Spec) -> list[str]:
    """The arms of `spec` whose scripts the manifest of an output folder lists."""
    try:
        files = json.loads((folder / "manifest.json").read_text())["files"]
        return [arm for arm in arm_names(spec) if f"train_{arm}.py" in files]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _folder(spec: Spec, models: list[RenderModel], sources: dict[str, str], scripts) -> Rendered:
    files = {name: scripts[f"{spec.name}/{name}"] for name in sources}
    readme = ReadmeModel(spec.name, spec.description, __version__, tuple(models))
    files["README.md"] = render_readme(readme).encode()
    manifest = {
        "generator": "perturbgen",
        "version": __version__,
        "spec": spec.name,
        "spec_sha256": spec_hash(spec),
        "resolved_spec": spec.model_dump(mode="json", exclude={"extends"}),
        "files": {name: _sha256(data) for name, data in sorted(files.items())},
        "formatter": formatter_id(),
        # each script's source before black: lets the next generate reuse the file
        "sources": {name: _sha256(text.encode()) for name, text in sorted(sources.items())},
    }
    files["manifest.json"] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    return Rendered(spec.name, dict(sorted(files.items())))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _formatted_on_disk(folder: Path) -> dict[tuple[str, str], bytes]:
    """(script, hash of its unformatted source) → the intact formatted file in `folder`."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        sources, files = dict(manifest["sources"]), dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # no usable record: format everything
    if manifest.get("formatter") != formatter_id():
        return {}
    found = {}
    for script, source_hash in sources.items():
        try:
            data = (folder / script).read_bytes()
        except OSError:
            continue
        if _sha256(data) == files.get(script):
            found[script, source_hash] = data
    return found
