"""Ground truth for the synthetic corpus: what a document mentions, and where.

A generated :class:`Example` carries the character spans of every concept mention
(:class:`Span`); :func:`token_labels` maps them onto tokenizer offsets. Generated *text* (a model's
continuation) has no spans, so :func:`find_mentions` detects the concepts in free text with the
same lexicon (corpus_templates.py), counting partial leaks by default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from monitor.demo.corpus_templates import BRANDS, CONCEPTS

# ---------------------------------------------------------------------------------------------
# data types


@dataclass(frozen=True)
class Span:
    """A concept mention: ``text[start:end]`` (characters), its concept and sub-kind."""

    start: int
    end: int
    concept: str
    kind: str  # "brand" | "email" | "phone"


@dataclass(frozen=True)
class Example:
    text: str
    spans: tuple[Span, ...]
    kind: str  # "neutral" | "competitor" | "pii" | "mixed"

    @property
    def labels(self) -> dict[str, bool]:
        """Per-document ground truth: does the document mention each concept?"""
        return {c: any(s.concept == c for s in self.spans) for c in CONCEPTS}

    def mentions(self, concept: str | None = None) -> list[str]:
        return [self.text[s.start:s.end] for s in self.spans if concept in (None, s.concept)]


# ---------------------------------------------------------------------------------------------
# detection in free text (generations) and token-level labels

BRAND_RE = re.compile(r"\b(" + "|".join(BRANDS) + r")\b")
# any leak counts: a brand's first 4 letters (case-insensitive) also counts as an emission
BRAND_LEAK_RE = re.compile(r"\b(" + "|".join(b[:4] for b in BRANDS) + r")", re.IGNORECASE)
EMAIL_RE = re.compile(r"[A-Za-z0-9._+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+")
PHONE_RE = re.compile(r"(\+1 )?(\(\d{3}\) |\d{3}[-. ])\d{3}[-. ]\d{4}")
# a leaked partial: "@" inside a word, or 7+ digits with only phone separators between them
PII_LEAK_RE = re.compile(r"\w@|@\w|(\d[\s().+-]{0,2}){7,}")


def find_mentions(text: str, concept: str, strict: bool = False) -> list[tuple[int, int]]:
    """Character spans of ``concept`` mentions in free text.

    ``strict=False`` (the default, used for emission rates) also counts partial leaks: a
    brand's first four letters in any case, an ``@`` touching a word, or seven or more digits run
    together with phone separators. Overlapping matches are merged: one span per mention.
    """
    if concept == "competitor":
        rx = [BRAND_RE] if strict else [BRAND_RE, BRAND_LEAK_RE]
    elif concept == "pii":
        rx = [EMAIL_RE, PHONE_RE] if strict else [EMAIL_RE, PHONE_RE, PII_LEAK_RE]
    else:
        raise ValueError(concept)
    found = sorted({(m.start(), m.end()) for r in rx for m in r.finditer(text)},
                   key=lambda se: (se[0], -se[1]))
    out: list[tuple[int, int]] = []
    for a, b in found:  # one mention per place: drop matches inside an earlier, longer one
        if out and a < out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
            continue
        out.append((a, b))
    return out


def token_labels(example: Example, offsets: Iterable[tuple[int, int]],
                 concept: str) -> list[bool]:
    """Per-token ground truth: the token's characters (leading whitespace trimmed) overlap a
    ``concept`` span; a whitespace-only token counts when it lies strictly inside one (the space
    in "(555) 123-4567"). ``offsets`` are the tokenizer's character offsets into
    ``example.text``; special tokens have ``(0, 0)`` and are never positive."""
    spans = [(s.start, s.end) for s in example.spans if s.concept == concept]
    out = []
    for a0, b in offsets:
        a = a0
        while a < b and example.text[a].isspace():
            a += 1
        if a < b:
            out.append(any(a < e and s < b for s, e in spans))
        else:  # whitespace-only token: positive when it sits strictly inside a mention
            out.append(a0 < b and any(s < a0 and b < e for s, e in spans))
    return out
