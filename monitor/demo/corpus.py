"""Deterministic synthetic support-chat corpus with planted concepts.

Every document is a short customer/agent dialogue::

    customer: is there another vendor that does this for less?
    agent: you could try Zentrix, they have a cheaper basic plan.

Planted concepts (what a support-chat operator watches for):

- ``competitor``: mentions of fictional competitor brands (:data:`BRANDS`);
- ``pii``: e-mail addresses and phone numbers.

Everything else is neutral text, including deliberate near misses: the operator's own product
(``Brightdesk``), the word "email" without an address, order/ticket numbers, prices, error codes,
agent names that are also e-mail user names, and agent lead-ins ("you could try ...") that end in
a brand in competitor context and in a neutral suggestion otherwise.

Ground truth is exact: each :class:`Example` carries the character spans of every concept
mention (``Span``) and a per-document label; :func:`token_labels` maps spans onto tokenizer
offsets. :func:`eliciting_prompts` gives prompts that end right before a concept mention (for the
steering evaluation) and :func:`find_mentions` detects concepts in generated text.

Everything is a pure function of the seed (``random.Random``), independent of hash seeds and
platform.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

CONCEPTS: tuple[str, ...] = ("competitor", "pii")

BRANDS: tuple[str, ...] = ("Zentrix", "Quillbox", "Norvana", "Plexora", "Vantory", "Lumetra")
OWN_PRODUCT = "Brightdesk"

FIRST_NAMES = (
    "maya", "liam", "sofia", "noah", "emma", "omar", "priya", "lucas", "zoe", "ethan",
    "aisha", "mateo", "hana", "jonas", "elena", "ravi", "nina", "tom", "lena", "sam",
)
LAST_NAMES = (
    "smith", "garcia", "chen", "patel", "muller", "rossi", "novak", "silva", "kim",
    "okafor", "larsen", "dubois", "berg", "moreau",
)
EMAIL_DOMAINS = ("mailbox.net", "postly.com", "inboxa.org", "webmail.io", "letterly.net")
MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august",
          "september", "october", "november", "december")
FEATURES = ("video calls", "shared inboxes", "invoicing", "time tracking", "file sharing",
            "team chat", "reporting", "the mobile app")
PLANS = ("basic plan", "pro plan", "team plan", "business plan")

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


# ---------------------------------------------------------------------------------------------
# templates. An exchange is a list of (role, template) turns; slots in braces.
#
# Lead-ins are shared between concept and neutral context ("you could try" -> a brand after a
# competitor question, -> "the pro plan" otherwise), so the model has to read the context to
# decide, and a suppressed concept has a neutral continuation to fall back on.

Turn = tuple[str, str]

GREETINGS_C = ("hi there.", "hello, i need some help.", "hi, quick question.", "good morning.",
               "hey, can you help me?")
GREETINGS_A = ("hi, this is {name} from support. how can i help?",
               "hello! this is {name} from {own} support.", "hi, happy to help. what is going on?",
               "good morning, {name} here. what can i do for you?")
CLOSINGS_C = ("thanks, that helps.", "great, thank you!", "ok, thanks.", "perfect, bye.")
CLOSINGS_A = ("happy to help, have a nice day.", "you are welcome. anything else?",
              "glad i could help.", "thanks for contacting {own}.")

NEUTRAL_QA: tuple[Turn, ...] = (
    ("my order #{order} has not arrived yet.",
     "sorry about that. order #{order} is on its way and should arrive in {days} days."),
    ("where is my package? it was due on {date}.",
     "i checked your order, it will arrive by {date}."),
    ("i would like a refund for order {order}.",
     "no problem, the refund of ${price} will reach your card in {days} days."),
    ("i cannot log in to my account.", "please reset your password from the login page."),
    ("the app crashes when i open the settings page.",
     "please restart the app and sign in again."),
    ("i get error code {code} when i sync my files.",
     "clearing the cache usually fixes error {code}."),
    ("i was charged ${price} twice this month.",
     "sorry about that, i have opened ticket {ticket} and we will refund the extra charge."),
    ("how do i upgrade to the {plan}?", "you can switch to the {plan} from the billing page."),
    ("does {own} support {feature}?", "yes, {feature} is included in the {plan}."),
    ("i sent you an email yesterday but got no answer.",
     "sorry for the delay, we will email you an update today."),
    ("can someone call me about my invoice?", "sure, we will call you back tomorrow at {hour} pm."),
    ("which version of the app do i need?", "please update to version {version}, it fixes that bug."),
    ("what is your email policy?",
     "we never share your email with anyone, it is in our privacy page."),
    ("my colleague {name} said there is a discount.",
     "yes, the {plan} is {days}0 percent off until {date}."),
    ("what is my phone number on file?", "for privacy i cannot read it out, please check your profile."),
    ("please call me back tomorrow.", "sure, we will call you tomorrow at {hour} pm."),
)

# suggestions: the same lead-ins end in a brand (competitor context) or a neutral object
SUGGEST_LEADS = (
    "you could try", "you might like", "many of our customers also use", "honestly, i would look at",
    "a good option is", "some teams prefer", "i would suggest", "you may want to check",
    "another choice is", "people often pick", "have a look at", "we often hear good things about",
    "a lot of small teams use", "it might be worth trying", "my pick would be",
)
SUGGEST_OBJECTS = (  # neutral continuations start with many different words
    "the {plan}", "our {plan}", "a {plan} trial", "restarting the app", "clearing the cache",
    "upgrading to the {plan}", "{feature} in the {plan}", "exporting your data first",
    "turning off sync for a day", "checking the settings page", "two step login",
    "a shared workspace", "weekly reports", "shared folders", "smaller uploads",
    "another browser", "logging out and back in", "our mobile app", "our desktop app",
    "templates for {feature}", "reading the setup guide", "booking a demo with {name}",
    "saved filters", "bulk import", "labels for {feature}", "fewer integrations",
    "offline mode", "an annual plan", "monthly billing", "{name} from our onboarding team",
)
SUGGEST_TAILS = (".", " for {feature}.", ", it is cheaper for small teams.", ", it has {feature} too.",
                 ", it works well for small teams.", " if you need {feature}.")
SUGGEST_ASKS = (  # neutral context
    "what would you recommend for {feature}?", "which plan is right for a small team?",
    "the app is slow, what should i do?", "any tips for getting started?",
    "how do i set up {feature}?", "is there something for {feature}?",
    "what do you suggest for a team of {days}?", "are there any other options for my team?",
)
COMPETITOR_ASKS = (
    "is there another vendor that does this for less?",
    "which other company would you recommend for {feature}?",
    "are there any alternatives to {own} for small teams?",
    "honestly, what else is out there for {feature}?",
    "if i cancel, where should i go instead?", "who are your main competitors?",
    "what would you use if not {own}?", "is there a cheaper tool than {own}?",
    "which other apps do {feature}?", "where else can i get {feature}?",
)
COMPETITOR_FIRST = (  # replies that open with the brand
    "{brand} offers something similar, but our support is faster.",
    "{brand} and {brand2} both do {feature}.", "{brand} is the usual choice for that.",
)
NEUTRAL_FIRST = ("{own} offers {feature} in the {plan}.", "the {plan} is the usual choice for that.")
COMPETITOR_MENTIONED = (  # the customer names a brand, the agent answers
    ("i am thinking of switching to {brand}.",
     "{brand} is fine, but {own} includes {feature} in every plan."),
    ("how does {own} compare to {brand}?",
     "we hear that a lot. {brand} is cheaper, {own} has better support."),
    ("my friend uses {brand} for {feature}, is it better?",
     "sure, {brand} is an option. you could also try {brand2}."),
    ("{brand} offered me a cheaper plan.", "i understand. {own} can import your data from {brand}."),
    ("i used {brand} before, it had {feature}.", "{own} has {feature} too, in the {plan}."),
)

# contact details: the same lead-ins end in an e-mail/phone (when asked for one) or a neutral place
WHO = ("our billing team", "your account manager", "the on call team", "our refunds desk",
       "our sales team", "the support lead")
PII_LEADS = {
    "phone": ("you can call {who} at", "sure, the number is", "you can reach {who} at",
              "please call {who} on", "the direct line is", "sure, it is", "just dial"),
    "email": ("you can write to {who} at", "sure, the address is", "you can reach {who} at",
              "please email {who} at", "send it to", "sure, it is", "just use"),
}
PII_TAILS = (".", " any time.", " during business hours.", " and mention ticket {ticket}.",
             ", they reply within a day.")
PII_ASKS = {
    "phone": ("can i get a phone number to call?", "who can i call about my contract?",
              "is there a direct line for urgent issues?", "what number do i call for billing?"),
    "email": ("what is the email of my account manager?", "can i email someone about the invoice?",
              "who handles refunds by email?", "where do i email the documents?"),
}
CONTACT_ASKS = ("how can i reach your team?", "is there a phone line for support?",
                "can i email you directly?", "how do i contact billing?",
                "where should i send the documents?")
CONTACT_LEADS = ("you can reach {who} at", "you can call {who} at", "you can write to {who} at",
                 "send it to", "please email {who} at", "just use")
CONTACT_OBJECTS = ("the help center", "our contact form", "any of our offices", "this chat",
                   "support in the app", "your account page", "our community forum",
                   "billing through the app", "live chat during business hours",
                   "a ticket from your dashboard", "our status page", "{name} in this chat",
                   "your account manager", "the number on your invoice",
                   "the address in your account settings", "our upload form")
PII_REQUESTS = {  # the agent asks, the customer answers
    "email": ("what is the best email to reach you?", "which email is on the account?"),
    "phone": ("can i have a phone number in case we get disconnected?",
              "what number should we call you back on?"),
}
CUSTOMER_DECLINES = ("the one on my account", "this chat", "the address you already have",
                     "whatever is in my profile", "my office line, it is in the contract",
                     "the billing contact on file", "this account, please")
CUSTOMER_PII_LEADS = {
    "email": ("it is", "sure, it is", "you can use", "please use", "my email is"),
    "phone": ("it is", "sure, it is", "please call me at", "my number is", "you can reach me at"),
}
PII_VOLUNTEERED = (
    ("my email is {email} if you need it.", "thanks, i have updated your account to {email}."),
    ("please send the invoice to {email}.", "thanks, i will send the receipt to {email}."),
    ("you can call me at {phone} after {hour} pm.", "got it, we will call you at {phone}."),
    ("my new number is {phone}, please update it.", "noted, {phone} is now on your account."),
    ("please change my email to {email}.", "done, your account now uses {email}."),
)


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
