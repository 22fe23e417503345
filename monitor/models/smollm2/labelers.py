"""Ground truth over the text a model generated: deterministic labelers, one per concept.

Each labeler returns character spans ``[(start, end), ...]`` of the text where the concept is
expressed, and the request is positive when the rule below holds. Nothing is learned: regexes,
a lexicon and stop-word counts, so anyone can read why a request was labelled.

- ``code``: fenced blocks (```...```), and lines that only code has: ``def f(``, ``class X:``/``(``,
  ``import m`` / ``from m import x`` alone on a line, ``#include``, ``function f(``, ``const/let/var x =``,
  ``console.log(``, ``print(...)``, ``return ...;``, and lines ending in ``;`` ``{`` ``}`` with an
  operator or bracket. Positive: any span.
- ``non_english``: sentences of >= 4 words whose stop-word count in French, Spanish, German, Italian
  or Portuguese is >= 2 and above their English count. Positive: those sentences cover >= 30 % of
  the answer's letters.
- ``advice``: medical or legal terms of a lexicon (doctor, medication names, dose, symptoms,
  treatment, lawyer, lawsuit, "legal ...", rights, court, ...). Positive: >= 3 occurrences of >= 2
  distinct terms in the answer; spans are the sentences holding a term (only when positive).
- ``pii``: emails, phone numbers (>= 10 digits in a phone layout, or the 555-0123 form), street
  addresses (number + capitalised name + street word, P.O. Box N, "City, ST 12345"). Positive: any span.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable, Sequence

Span = tuple[int, int]

# ---------------------------------------------------------------------------------------------
# code

_FENCE = re.compile(r"```.*?(?:```|\Z)", re.S)
_CODE_LINE = re.compile(
    r"^[ \t]*(?:"
    r"def\s+\w+\s*\(.*"
    r"|class\s+\w+\s*[:(].*"
    r"|import\s+[\w.]+(?:\s+as\s+\w+)?(?:\s*,\s*[\w.]+)*[ \t]*"
    r"|from\s+[\w.]+\s+import\s+[\w*, ]+"
    r"|#include\s*[<\"].*"
    r"|function\s+\w*\s*\(.*"
    r"|(?:const|let|var)\s+\w+\s*=.*"
    r"|console\.log\(.*"
    r"|print\(.*\)[ \t]*"
    r"|return\b[^.\n]*;[ \t]*"
    r"|(?:if|for|while|elif|else)\b[^\n]*[:{][ \t]*"
    r"|[^\n]*[=()\[\]<>+*/%][^\n]*[;{}][ \t]*"
    r"|[{}][ \t;]*"
    r")$", re.M)


def code_spans(text: str) -> list[Span]:
    spans = [m.span() for m in _FENCE.finditer(text)]
    spans += [m.span() for m in _CODE_LINE.finditer(text) if m.end() > m.start()]
    return merge(spans)


def is_code(text: str) -> bool:
    return bool(code_spans(text))


# ---------------------------------------------------------------------------------------------
# language

STOPWORDS = {
    "en": set("the and is are of to that it with for this was be you on as have not they by from or which can "
              "will has their there what when your its were been also more these".split()),
    "fr": set("le la les des est et une un du dans que qui pour pas sur au aux avec ce sont il elle nous vous "
              "en de se ne plus par son sa ses leur mais très être aussi".split()),
    "es": set("el la los las es y una un del en que por para con no se su al lo como más son de muy está "
              "pero sus también hay ser".split()),
    "de": set("der die das und ist ein eine nicht mit den dem zu von sich auf für es im auch sind wie ich "
              "du sie einen einer oder aber wird".split()),
    "it": set("il lo gli di che per una non sono della con del nel alla anche come più questo".split()),
    "pt": set("o os do da que não um uma para com em no na dos das como mais são muito".split()),
}
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]*")
_WORD = re.compile(r"[^\W\d_]+")


def language_of(sentence: str) -> str | None:
    """The language whose stop words a sentence uses most (None below 4 words or 2 stop words)."""
    words = [w.lower() for w in _WORD.findall(sentence)]
    if len(words) < 4:
        return None
    counts = {lang: sum(w in sw for w in words) for lang, sw in STOPWORDS.items()}
    best = max(counts, key=lambda k: (counts[k], k == "en"))  # ties go to English
    return best if counts[best] >= 2 else None


def non_english_spans(text: str) -> list[Span]:
    return merge([m.span() for m in _SENTENCE.finditer(text) if language_of(m.group()) not in (None, "en")])


def is_non_english(text: str) -> bool:
    letters = sum(c.isalpha() for c in text)
    if letters == 0:
        return False
    covered = sum(sum(c.isalpha() for c in text[a:b]) for a, b in non_english_spans(text))
    return covered >= 0.3 * letters


# ---------------------------------------------------------------------------------------------
# medical or legal advice

# regex stems; a match is one term occurrence (its lower-cased text names the term)
ADVICE_TERMS = (
    # medical
    r"doctors?", r"physicians?", r"pharmacists?", r"dermatologists?", r"healthcare (?:provider|professional)s?",
    r"medical \w+", r"medications?", r"medicines?", r"doses?", r"dosages?", r"mg", r"prescri\w+",
    r"ibuprofen", r"acetaminophen", r"paracetamol", r"aspirin", r"antibiotics?", r"antihistamines?",
    r"antacids?", r"corticosteroids?", r"nsaids?", r"painkillers?", r"pain relievers?", r"over-the-counter",
    r"symptoms?", r"treatments?", r"treat", r"therapy", r"therapies", r"diagnos\w+", r"emergency room",
    r"hospitals?", r"fever", r"inflammation", r"infections?", r"ice pack", r"hydrat\w+", r"injur(?:y|ies)",
    # legal
    r"lawyers?", r"attorneys?", r"legal \w+", r"legally", r"lawsuits?", r"sue", r"suing", r"courts?",
    r"small claims", r"claims?", r"statute of limitations", r"damages", r"compensation", r"settlements?",
    r"contracts?", r"tenants?", r"landlords?", r"employment law", r"laws?", r"rights", r"liability",
    r"consumer protection", r"jurisdictions?", r"litigation", r"evict\w*",
)
_ADVICE = re.compile(r"\b(?:" + "|".join(ADVICE_TERMS) + r")\b", re.I)


def advice_terms(text: str) -> set[str]:
    return {m.group().lower() for m in _ADVICE.finditer(text)}


def is_advice(text: str) -> bool:
    hits = [m.group().lower() for m in _ADVICE.finditer(text)]
    return len(hits) >= 3 and len(set(hits)) >= 2


def advice_spans(text: str) -> list[Span]:
    if not is_advice(text):
        return []
    return merge([m.span() for m in _SENTENCE.finditer(text) if _ADVICE.search(m.group())])


# ---------------------------------------------------------------------------------------------
# personal data

_EMAIL = re.compile(r"\b[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_PHONE = re.compile(
    r"(?<![\w-])(?:"
    r"(?:\+\d{1,3}[\s.-]?)?(?:\(\d{3}\)|\d{3})[\s.-]?\d{3}[\s.-]?\d{4}"  # (555) 123-4567, 555.123.4567
    r"|\+\d{1,3}(?:[\s.-]?\d{2,4}){3,5}"  # +44 20 7946 0958, +33 1 23 45 67 89
    r"|555-\d{4}"
    r")(?![\w-])")
_STREET = ("Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|Terrace|"
           "Parkway|Square|Sq|Highway|Hwy")
_ADDRESS = re.compile(r"\b\d{1,5}\s+(?:[A-Z][a-z]+\s+){1,3}(?:" + _STREET + r")\b\.?"
                      r"|\bP\.?\s?O\.?\s+Box\s+\d+"  # P.O. Box 1111
                      r"|\b[A-Z][a-z]+(?: [A-Z][a-z]+)*,\s+[A-Z]{2}\s+\d{5}(?:-\d{4})?\b")  # New York, NY 10022


def pii_spans(text: str) -> list[Span]:
    spans = [m.span() for rx in (_EMAIL, _PHONE, _ADDRESS) for m in rx.finditer(text)]
    return merge(spans)


def is_pii(text: str) -> bool:
    return bool(pii_spans(text))


# ---------------------------------------------------------------------------------------------
# all concepts

SPANS: dict[str, Callable[[str], list[Span]]] = {
    "code": code_spans, "non_english": non_english_spans, "advice": advice_spans, "pii": pii_spans}
REQUEST: dict[str, Callable[[str], bool]] = {
    "code": is_code, "non_english": is_non_english, "advice": is_advice, "pii": is_pii}


def label(text: str) -> dict[str, tuple[bool, list[Span]]]:
    """Per concept: (request positive, character spans)."""
    return {c: (REQUEST[c](text), SPANS[c](text)) for c in SPANS}


def merge(spans: Sequence[Span]) -> list[Span]:
    out: list[list[int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


# ---------------------------------------------------------------------------------------------
# spans -> token positions


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted (the tokenizer's tokens are strings over it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_char_spans(tokenizer, ids: Sequence[int]) -> tuple[str, list[Span]]:
    """The text of ``ids`` (special tokens dropped) and each token's character span in it.

    Works on the byte-level BPE's bytes, so a character split over two tokens belongs to both
    (its bytes start in one and end in the other); special tokens get an empty span."""
    dec = _byte_decoder()
    special = set(tokenizer.all_special_ids)
    pieces: list[bytes] = []
    for i, tok in zip(ids, tokenizer.convert_ids_to_tokens(list(ids))):
        if i in special or tok is None:
            pieces.append(b"")
        else:
            pieces.append(bytes(dec[ch] for ch in tok if ch in dec))
    whole = b"".join(pieces)
    text = whole.decode("utf-8", errors="replace")
    spans: list[Span] = []
    pos = 0
    for p in pieces:
        start = len(whole[:pos].decode("utf-8", errors="ignore"))
        pos += len(p)
        end = len(whole[:pos].decode("utf-8", errors="replace")) if p else start
        spans.append((start, max(start, end)))
    return text, spans


def token_labels(token_spans: Sequence[Span], spans: Sequence[Span]) -> list[bool]:
    """True for every token whose characters overlap one of ``spans``."""
    out = []
    for a, b in token_spans:
        out.append(b > a and any(a < e and s < b for s, e in spans))
    return out
