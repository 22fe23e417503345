"""An alert's context as text: the token ids around the firing token, decoded with the served
model's tokenizer, the firing token marked ``⟦…⟧``.

Decoding runs on the event sink's thread, once per alert/steering event, never on the pipeline.
The tokenizer is a ``tokenizer.json`` (HF ``tokenizers``), read from disk bounded like every
operator-named file; nothing is ever downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path

from monitor.config import ConfigError
from monitor.files import read_regular_file

MAX_TOKENIZER_BYTES = 256 * 1024 * 1024
MARK_OPEN, MARK_CLOSE = "⟦", "⟧"
ELLIPSIS = "…"
# text either side of the firing token, in characters (a token can be long in odd vocabularies)
MAX_BEFORE, MAX_TOKEN, MAX_AFTER = 240, 80, 120
# model output is untrusted: no control characters (terminal escapes) reach a log or a terminal
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


class TokenizerError(ConfigError):
    """The configured tokenizer cannot be used; the message names the field and the path."""


def load_tokenizer(path: str | Path):
    """A ``tokenizers.Tokenizer`` from ``path``: a ``tokenizer.json`` or a directory holding one."""
    path = Path(path)
    shown = str(path)[:200]
    file = path / "tokenizer.json" if path.is_dir() else path
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TokenizerError(f"tokenizer: {shown!r} needs the 'tokenizers' package "
                             "(pip install 'featurewatch[tokenizer]')") from None
    try:
        text = read_regular_file(file, MAX_TOKENIZER_BYTES).decode("utf-8")
    except FileNotFoundError:
        what = "has no tokenizer.json" if file is not path else "does not exist"
        raise TokenizerError(f"tokenizer: {shown!r} {what}") from None
    except (OSError, ValueError) as exc:  # not a regular file, too large, not UTF-8
        raise TokenizerError(f"tokenizer: cannot read {str(file)[:200]!r}: {str(exc)[:200]}") from None
    try:
        return Tokenizer.from_str(text)
    except Exception as exc:  # noqa: BLE001 - the library's parse errors have no common type
        raise TokenizerError(f"tokenizer: {str(file)[:200]!r} is not a tokenizers JSON file: "
                             f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None


def _clean(text: str) -> str:
    return _CONTROL.sub("\ufffd", text.replace("\r\n", "\n").replace("\n", "⏎").replace("\t", " "))


class ContextText:
    """Renders ``(first position, ids, firing position)`` as ``…text ⟦token⟧ text``."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if ids else ""

    def render(self, start: int, ids: list[int], position: int) -> str:
        k = position - start
        if not 0 <= k < len(ids):
            raise ValueError(f"position {position} outside the context [{start}, {start + len(ids)})")
        # Decode growing prefixes and take the differences: a token decoded alone can lose its
        # leading space (SentencePiece) or split a multi-byte character.
        before = self._decode(ids[:k])
        upto = self._decode(ids[:k + 1])
        whole = self._decode(ids)
        token = upto[len(before):] if upto.startswith(before) else self._decode(ids[k:k + 1])
        after = whole[len(upto):] if whole.startswith(upto) else self._decode(ids[k + 1:])
        before, token, after = _clean(before), _clean(token), _clean(after)
        stripped = token.lstrip()
        before, token = before + token[:len(token) - len(stripped)], stripped  # space outside the mark
        if len(token) > MAX_TOKEN:
            token = token[:MAX_TOKEN] + ELLIPSIS
        lead = ELLIPSIS if start > 0 or len(before) > MAX_BEFORE else ""
        before = before[-MAX_BEFORE:].lstrip() if lead else before
        after = after[:MAX_AFTER] + (ELLIPSIS if len(after) > MAX_AFTER else "")
        return f"{lead}{before}{MARK_OPEN}{token}{MARK_CLOSE}{after}"

    def describe(self, event: dict) -> str | None:
        """The context text of an event carrying ``context_start``/``context_token_ids``."""
        ids, start, position = event.get("context_token_ids"), event.get("context_start"), event.get("position")
        if not ids or start is None or position is None:
            return None
        return self.render(int(start), [int(i) for i in ids], int(position))


def context_text(tokenizer_path: str | Path | None) -> ContextText | None:
    """The configured renderer (``tokenizer:`` in the sidecar config), or None without one."""
    return None if tokenizer_path is None else ContextText(load_tokenizer(tokenizer_path))
