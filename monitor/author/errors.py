"""The one error the authoring commands raise for bad input: the CLI prints it and exits 2."""

from __future__ import annotations


class AuthorError(ValueError):
    """Input the authoring commands cannot use; the message names the file and what is wrong."""


def clip(text: object, limit: int = 80) -> str:
    """A value shown in an error, never huge: one line, at most ``limit`` characters."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"
