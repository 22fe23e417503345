"""Deterministic synthetic support-chat corpus with planted concepts.

Every document is a short customer/agent dialogue::

    customer: is there another vendor that does this for less?
    agent: you could try Zentrix, they have a cheaper basic plan.

Planted concepts (what a support-chat operator watches for):

- ``competitor``: mentions of fictional competitor brands (``corpus_templates.BRANDS``);
- ``pii``: e-mail addresses and phone numbers.

Everything else is neutral text, including deliberate near misses: the operator's own product
(``Brightdesk``), the word "email" without an address, order/ticket numbers, prices, error codes,
agent names that are also e-mail user names, and agent lead-ins ("you could try ...") that end in
a brand in competitor context and in a neutral suggestion otherwise.

This module assembles the documents (:func:`generate`, :func:`counterfactual`,
:func:`concept_free`) and the steering evaluation's prompts (:func:`eliciting_prompts`, which end
right before a concept mention) from the words and templates in corpus_templates.py. Ground
truth is exact: each ``Example`` carries the character spans of every concept mention
(corpus_labels.py, which also maps spans onto tokens and detects concepts in generated text).
``find_mentions`` and ``CONCEPTS`` stay importable from here for callers that use the corpus
module as a whole.

Everything is a pure function of the seed (``random.Random``), independent of hash seeds and
platform.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

from monitor.demo.corpus_labels import Example, Span, find_mentions
from monitor.demo.corpus_templates import (
    BRANDS, CLOSINGS_A, CLOSINGS_C, COMPETITOR_ASKS, COMPETITOR_FIRST, COMPETITOR_MENTIONED,
    CONCEPTS, CONTACT_ASKS, CONTACT_LEADS, CONTACT_OBJECTS, CUSTOMER_DECLINES, CUSTOMER_PII_LEADS,
    EMAIL_DOMAINS, FEATURES, FIRST_NAMES, GREETINGS_A, GREETINGS_C, LAST_NAMES, MONTHS,
    NEUTRAL_FIRST, NEUTRAL_QA, OWN_PRODUCT, PII_ASKS, PII_LEADS, PII_REQUESTS, PII_TAILS,
    PII_VOLUNTEERED, PLANS, SUGGEST_ASKS, SUGGEST_LEADS, SUGGEST_OBJECTS, SUGGEST_TAILS, WHO, Turn,
)

__all__ = ["CONCEPTS", "DEFAULT_MIX", "Example", "Prompt", "Span", "concept_free", "counterfactual",
           "eliciting_prompts", "find_mentions", "generate"]


@dataclass(frozen=True)
class Prompt:
    """A prompt that ends right before a concept mention (``concept``) or a neutral one."""

    text: str
    concept: str | None
    reference: str  # the continuation the corpus would have produced (first mention or word)


# ---------------------------------------------------------------------------------------------
# slot filling with span bookkeeping


class _Builder:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.n = 0
        self.spans: list[Span] = []

    def add(self, text: str, concept: str | None = None, kind: str = "") -> None:
        if concept is not None:
            self.spans.append(Span(self.n, self.n + len(text), concept, kind))
        self.parts.append(text)
        self.n += len(text)

    def text(self) -> str:
        return "".join(self.parts)


_SLOT = re.compile(r"\{(\w+)\}")


class _Slots:
    """Random slot values. Concept slots: brand, brand2, email, phone; the rest are neutral."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.cache: dict[str, str] = {}

    def value(self, name: str) -> tuple[str, str | None, str]:
        if name in self.cache:
            v = self.cache[name]
        else:
            v = self._fresh(name)
            self.cache[name] = v
        if name.startswith("brand"):
            return v, "competitor", "brand"
        if name.startswith("email"):
            return v, "pii", "email"
        if name.startswith("phone"):
            return v, "pii", "phone"
        return v, None, ""

    def _digits(self, n: int) -> str:
        return "".join(str(self.rng.randrange(10)) for _ in range(n))

    def _fresh(self, name: str) -> str:
        r = self.rng
        base = name.rstrip("0123456789")
        if base == "brand":
            others = [b for b in BRANDS if b not in self.cache.values()]
            return r.choice(others)
        if base == "email":
            f, l = r.choice(FIRST_NAMES), r.choice(LAST_NAMES)
            user = r.choice([f"{f}.{l}", f"{f}{r.randrange(10, 100)}", f"{f[0]}.{l}", f"{f}_{l}",
                             f"{l}.{f}"])
            return f"{user}@{r.choice(EMAIL_DOMAINS)}"
        if base == "phone":
            a, b, c = self._digits(3), self._digits(3), self._digits(4)
            return r.choice([f"{a}-{b}-{c}", f"({a}) {b}-{c}", f"+1 {a} {b} {c}", f"{a}.{b}.{c}"])
        if base == "name":
            return r.choice(FIRST_NAMES)
        if base == "order":
            return self._digits(5)
        if base == "ticket":
            return self._digits(4)
        if base == "code":
            return str(r.choice([400, 401, 403, 404, 409, 500, 502, 503]))
        if base == "price":
            return f"{r.randrange(5, 100)}.{r.choice(['00', '49', '99'])}"
        if base == "days":
            return str(r.randrange(2, 10))
        if base == "date":
            return f"{r.choice(MONTHS)} {r.randrange(1, 29)}"
        if base == "hour":
            return str(r.randrange(1, 12))
        if base == "version":
            return f"{r.randrange(1, 6)}.{r.randrange(0, 10)}"
        if base == "feature":
            return r.choice(FEATURES)
        if base == "plan":
            return r.choice(PLANS)
        if base == "who":
            return r.choice(WHO)
        raise KeyError(name)


def _fill(b: _Builder, template: str, slots: _Slots) -> None:
    pos = 0
    for m in _SLOT.finditer(template):
        if m.start() > pos:
            b.add(template[pos:m.start()])
        value, concept, kind = slots.value(m.group(1))
        b.add(value, concept, kind)
        pos = m.end()
    if pos < len(template):
        b.add(template[pos:])



def _exchange(c: str, a: str) -> list[Turn]:
    return [("customer", c), ("agent", a)]


def _neutral_exchange(rng: random.Random) -> list[Turn]:
    u = rng.random()
    if u < 0.45:
        return _exchange(*rng.choice(NEUTRAL_QA))
    if u < 0.8:
        ask = rng.choice(SUGGEST_ASKS)
        if rng.random() < 0.12:
            return _exchange(ask, rng.choice(NEUTRAL_FIRST))
        obj = rng.choice(SUGGEST_OBJECTS)
        if rng.random() < 0.15:
            obj += " or " + rng.choice(SUGGEST_OBJECTS).replace("{plan}", "{plan2}")
            tail = "."
        else:
            tail = rng.choice(SUGGEST_TAILS)
        return _exchange(ask, f"{rng.choice(SUGGEST_LEADS)} {obj}{tail}")
    if u < 0.92:
        return _exchange(rng.choice(CONTACT_ASKS),
                         f"{rng.choice(CONTACT_LEADS)} {rng.choice(CONTACT_OBJECTS)}.")
    # the agent asks for contact details, the customer points elsewhere (no PII)
    kind = rng.choice(("email", "phone"))
    return [("customer", "sure."), ("agent", rng.choice(PII_REQUESTS[kind])),
            ("customer", f"{rng.choice(CUSTOMER_PII_LEADS[kind])} {rng.choice(CUSTOMER_DECLINES)}."),
            ("agent", "thanks, noted.")]


def _competitor_exchange(rng: random.Random, allow_customer_mention: bool = True,
                         decline: bool = False) -> list[Turn]:
    """A competitor exchange; ``decline=True`` keeps the context (the customer's question, the
    agent's lead-in) and ends it in a neutral suggestion instead of a brand (the counterfactual
    rows of the build's concept training, see :func:`counterfactual`)."""
    u = rng.random()
    if not allow_customer_mention:
        u = 0.3 + 0.7 * u  # same mix of reply shapes as the corpus, without customer mentions
    if u < 0.3:
        if decline:  # the customer names no brand either: a plain competitor question
            return _exchange(rng.choice(COMPETITOR_ASKS), rng.choice(NEUTRAL_FIRST))
        return _exchange(*rng.choice(COMPETITOR_MENTIONED))
    ask = rng.choice(COMPETITOR_ASKS)
    if u < 0.4:
        return _exchange(ask, rng.choice(NEUTRAL_FIRST if decline else COMPETITOR_FIRST))
    if decline:
        lead = rng.choice(SUGGEST_LEADS)
        return _exchange(ask, f"{lead} {rng.choice(SUGGEST_OBJECTS)}{rng.choice(SUGGEST_TAILS)}")
    tail = " or {brand2}." if rng.random() < 0.2 else rng.choice(SUGGEST_TAILS)
    return _exchange(ask, f"{rng.choice(SUGGEST_LEADS)} {{brand}}{tail}")


def _pii_exchange(rng: random.Random, volunteered: bool = True,
                  decline: bool = False) -> list[Turn]:
    """A contact-details exchange; ``decline=True`` keeps the context and gives a place (the
    help center, this chat, ...) where an address or number would go."""
    kind = rng.choice(("email", "phone"))
    u = rng.random()
    if volunteered and u < 0.25:
        if decline:
            return _exchange(*rng.choice(NEUTRAL_QA))
        return _exchange(*rng.choice(PII_VOLUNTEERED))
    if u < 0.65:
        lead = rng.choice(PII_LEADS[kind])
        if decline:
            return _exchange(rng.choice(PII_ASKS[kind]), f"{lead} {rng.choice(CONTACT_OBJECTS)}.")
        return _exchange(rng.choice(PII_ASKS[kind]), f"{lead} {{{kind}}}{rng.choice(PII_TAILS)}")
    answer = rng.choice(CUSTOMER_DECLINES) if decline else f"{{{kind}}}"
    return [("customer", "sure."), ("agent", rng.choice(PII_REQUESTS[kind])),
            ("customer", f"{rng.choice(CUSTOMER_PII_LEADS[kind])} {answer}."),
            ("agent", "thanks, noted.")]


def _render(turns: Sequence[Turn], slots: _Slots) -> tuple[str, tuple[Span, ...]]:
    b = _Builder()
    for i, (role, template) in enumerate(turns):
        if i:
            b.add("\n")
        b.add(f"{role}: ")
        _fill(b, template, slots)
    return b.text(), tuple(b.spans)


def _new_slots(rng: random.Random) -> _Slots:
    slots = _Slots(rng)
    slots.cache["own"] = OWN_PRODUCT
    return slots


def _frame(rng: random.Random, body: list[list[Turn]]) -> list[Turn]:
    turns: list[Turn] = []
    if rng.random() < 0.7:
        turns += _exchange(rng.choice(GREETINGS_C), rng.choice(GREETINGS_A))
    for ex in body:
        turns += ex
    return turns


def _document(rng: random.Random, kind: str, decline: bool = False) -> Example:
    body = [_neutral_exchange(rng) for _ in range(rng.randrange(0, 3))]
    makers = {"neutral": [], "competitor": [_competitor_exchange], "pii": [_pii_exchange],
              "mixed": [_competitor_exchange, _pii_exchange]}[kind]
    for make in makers:
        body.insert(rng.randrange(len(body) + 1), make(rng, decline=decline))
    if not body:
        body = [_neutral_exchange(rng)]
    turns = _frame(rng, body)
    if rng.random() < 0.5:
        turns += _exchange(rng.choice(CLOSINGS_C), rng.choice(CLOSINGS_A))
    text, spans = _render(turns, _new_slots(rng))
    return Example(text=text, spans=spans, kind=kind)


DEFAULT_MIX: dict[str, float] = {"neutral": 0.5, "competitor": 0.22, "pii": 0.22, "mixed": 0.06}


def generate(n: int, seed: int, mix: dict[str, float] | None = None) -> list[Example]:
    """``n`` documents, a pure function of ``(n, seed, mix)``."""
    mix = dict(DEFAULT_MIX if mix is None else mix)
    kinds = list(mix)
    weights = [mix[k] for k in kinds]
    rng = random.Random(f"featurewatch-corpus-{seed}")
    return [_document(rng, rng.choices(kinds, weights)[0]) for _ in range(n)]


def counterfactual(n: int, seed: int) -> list[Example]:
    """``n`` documents with concept context but no concept mention: the competitor and contact
    exchanges of :func:`generate` with the agent (or customer) declining — the same questions
    and lead-ins, a neutral object where the brand, address or number would be. Their ``kind``
    says which context they come from; they have no spans. The build trains on them with the
    planted concept directions ablated (the model learns that without the concept direction the
    neutral continuation follows: this is what makes suppression steering work)."""
    rng = random.Random(f"featurewatch-counterfactual-{seed}")
    kinds = ["competitor", "pii", "mixed"]
    weights = [DEFAULT_MIX[k] for k in kinds]
    return [_document(rng, rng.choices(kinds, weights)[0], decline=True) for _ in range(n)]


def concept_free(n: int, seed: int) -> list[Example]:
    """``n`` neutral documents (benign traffic: calibration, perplexity)."""
    return generate(n, seed, mix={"neutral": 1.0})


# ---------------------------------------------------------------------------------------------
# eliciting prompts (steering evaluation)


def eliciting_prompts(concept: str | None, n: int, seed: int) -> list[Prompt]:
    """``n`` prompts whose corpus continuation starts with a ``concept`` mention.

    Each prompt is a dialogue prefix without any concept mention that ends right before the
    first one — e.g. ``"...customer: which other company would you recommend for invoicing?
    \\nagent: you could try"`` — in the agent's reply or, when the agent asked for contact
    details, in the customer's answer. ``concept=None`` gives neutral prompts cut at the same
    lead-ins in neutral context (``"...what would you recommend for invoicing?\\nagent: you
    could try"`` -> ``"the pro plan"``).
    """
    if concept not in (*CONCEPTS, None):
        raise ValueError(f"unknown concept {concept!r}")
    rng = random.Random(f"featurewatch-prompts-{concept}-{seed}")
    out: list[Prompt] = []
    while len(out) < n:
        body = [_neutral_exchange(rng) for _ in range(rng.randrange(0, 2))]
        if concept == "competitor":
            body.append(_competitor_exchange(rng, allow_customer_mention=False))
        elif concept == "pii":
            body.append(_pii_exchange(rng, volunteered=False))
        else:
            ask = rng.choice(SUGGEST_ASKS)
            lead = rng.choice(SUGGEST_LEADS)
            body.append(_exchange(ask, f"{lead} {rng.choice(SUGGEST_OBJECTS)}."))
        turns = _frame(rng, body)
        text, spans = _render(turns, _new_slots(rng))
        if concept is None:
            if spans:
                continue
            cut = text.rfind(lead) + len(lead)
            out.append(Prompt(text[:cut], None, text[cut:].strip().rstrip(".")))
            continue
        first = min((s for s in spans if s.concept == concept), key=lambda s: s.start)
        if any(s.start < first.start for s in spans):
            continue
        out.append(Prompt(text[:first.start].rstrip(" "), concept, text[first.start:first.end]))
    return out
