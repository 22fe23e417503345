"""Errors the engine raises for weights files it refuses to serve."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

MAX_PROBLEM_CHARS = 400  # a refusal is read in a log line: never a whole value from a file

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")  # terminal colour / cursor sequences
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def clean(text: str, limit: int = MAX_PROBLEM_CHARS) -> str:
    """One printable line of at most ``limit`` characters: ANSI codes dropped, other control
    characters (newlines included) turned into single spaces, the middle cut if too long."""
    text = _CONTROL.sub(" ", _ANSI.sub("", text)).strip()
    if len(text) > limit:
        keep = (limit - 5) // 2
        text = f"{text[:keep]} … {text[-keep:]}"
    return text


def short(value: Any, limit: int = 80) -> str:
    """repr of a value from a file, cut to ``limit`` characters (a cfg field may be megabytes)."""
    try:
        r = repr(value)
    except RecursionError:
        r = f"<deeply nested {type(value).__name__}>"
    return clean(r, limit)


class SAEFormatError(ValueError):
    """A weights file that cannot be served as-is; the message names the file and the problem.

    A ValueError so callers that validate configuration (the sidecar's source loading) can
    report it like any other bad setting. The problem is cleaned (see ``clean``) so that
    nothing a file contains can colour a terminal or flood a log.
    """

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = clean(str(problem))
        super().__init__(f"{self.path}: {self.problem}")


class ProbeFormatError(SAEFormatError):
    """A probe bank file that cannot be served (a SAEFormatError, so one except catches both)."""
