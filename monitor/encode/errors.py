"""Errors the engine raises for weights files it refuses to serve."""

from __future__ import annotations

from pathlib import Path


class SAEFormatError(ValueError):
    """A weights file that cannot be served as-is; the message names the file and the problem.

    A ValueError so callers that validate configuration (the sidecar's source loading) can
    report it like any other bad setting.
    """

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ProbeFormatError(SAEFormatError):
    """A probe bank file that cannot be served (a SAEFormatError, so one except catches both)."""
