"""Recorded token ids back to text, with each token's character span (for regexes over text).

The tokenizer is the served model's, loaded from disk (a ``tokenizer.json`` or the model
directory holding one) with the ``tokenizers`` library: no network, no model code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monitor.author.errors import AuthorError


class Detokenizer:
    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise AuthorError(f"{file}: no tokenizer file (give the model directory or its tokenizer.json)")
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as exc:  # noqa: BLE001 - the library raises plain Exception for bad files
            raise AuthorError(f"{file}: not a readable tokenizer.json ({' '.join(str(exc).split())[:200]})") from None
        self.path = file
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def spans(self, ids) -> "Text":
        """The text of ``ids`` and each token's ``[start, end)`` characters in it.

        Decoded prefix by prefix (``decode(ids[:k+1])``), so byte-level and sentencepiece tokens
        that only make sense together (a split UTF-8 character, a leading-space marker) get the
        characters they add; a token that adds none has an empty span."""
        ids = [int(i) for i in ids]
        ends = np.zeros(len(ids), dtype=np.int64)
        text = ""
        for k in range(len(ids)):
            prefix = self._tok.decode(ids[: k + 1], skip_special_tokens=True)
            if prefix.startswith(text) or len(prefix) >= len(text):
                text = prefix
            ends[k] = len(text)
        ends = np.maximum.accumulate(ends) if len(ends) else ends
        starts = np.r_[0, ends[:-1]] if len(ends) else ends
        return Text(text, starts.astype(np.int64), ends)


@dataclass(frozen=True)
class Text:
    text: str
    starts: np.ndarray  # [n] character offset where each token's characters begin
    ends: np.ndarray  # [n]

    def tokens_overlapping(self, spans: list[tuple[int, int]]) -> np.ndarray:
        """Bool per token: its characters (leading whitespace trimmed) overlap one of ``spans``."""
        out = np.zeros(len(self.starts), dtype=bool)
        for k, (a, b) in enumerate(zip(self.starts.tolist(), self.ends.tolist())):
            while a < b and self.text[a].isspace():
                a += 1
            out[k] = a < b and any(a < e and s < b for s, e in spans)
        return out
