"""Spec errors as values: each names the file, the line and the dotted path."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class SpecError:
    """One problem with a spec, printed as ``FILE:LINE: path: message``."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        file, path, message = map(_one_line, (self.file, self.path, self.message))
        where = file if self.line is None else f"{file}:{self.line}"
        return f"{where}: {path}: {message}" if path else f"{where}: {message}"


def _one_line(text: str) -> str:
    """User text (a key, a file name) may hold line breaks: escape them, keep one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class SpecErrors(Exception):
    """Raised with every error found in one or more specs, so they print together."""

    def __init__(self, errors: list[SpecError]):
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))
