"""The rules language: YAML validated by pydantic into typed rules and steering policies.

A rule watches one signal (an SAE feature of a named source, or a probe's probability) on the tokens
of one request, fires once per request when its window condition holds, and then alerts and/or
steers that request from its next token on. A policy steers every request whose metadata matches
its selector, from the first token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from monitor.evaluate.loader import MAX_BYTES, YamlRefused, clip, decode_utf8, load_yaml, shorten
from monitor.files import read_regular_file

NAME = r"^[a-zA-Z_][a-zA-Z0-9_\-]*$"
Name = Annotated[str, Field(pattern=NAME, max_length=128)]

# Numbers that reach the residual stream are bounded: a clamp value or an add scale of at most 1e4
# (and, for an add, every element of scale × direction) keeps the steered residual far inside float16's
# 65504, so steering cannot overflow a half-precision model, while leaving room above what steering
# uses in practice (clamps at small multiples of a feature's maximum activation, add scales of 1-100s).
MAX_STEER = 1e4
Finite = Annotated[float, Field(allow_inf_nan=False)]
SteerValue = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_STEER, le=MAX_STEER)]
Index = Annotated[int, Field(ge=0, lt=2**31)]  # features, probe columns: uint32 on the wire
Layer = Annotated[int, Field(ge=0, lt=2**16)]  # far above any model's depth; checked against the hooked set
MAX_COUNT = 2**24  # tokens: above any served context length (10M), exact in float32 and int32


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureSignal(_Strict):
    source: Name
    feature: Index


class ProbeSignal(_Strict):
    source: Name
    probe: Annotated[str, Field(max_length=128)]


def _signal_kind(value) -> str | None:
    if isinstance(value, dict):
        return "FeatureSignal" if "feature" in value else "ProbeSignal" if "probe" in value else None
    return type(value).__name__ if isinstance(value, (FeatureSignal, ProbeSignal)) else None


# Chosen by key, so a bad feature gives one error at `signal.feature`, not one per union member.
Signal = Annotated[Union[Annotated[FeatureSignal, Tag("FeatureSignal")], Annotated[ProbeSignal, Tag("ProbeSignal")]],
                   Discriminator(_signal_kind, custom_error_type="signal_kind",
                                 custom_error_message="a signal has either `feature` or `probe` (with `source`)")]
_TAGS = {"FeatureSignal", "ProbeSignal"}  # dropped from error locations


class TokenWindow(_Strict):
    """Fire on the first in-scope token above the threshold."""

    kind: Literal["token"] = "token"


class CountWindow(_Strict):
    """Fire when `n` in-scope tokens of the request have been above the threshold."""

    kind: Literal["count"]
    n: int = Field(ge=1, le=MAX_COUNT)


class EmaWindow(_Strict):
    """Fire when the exponential moving average of the signal over the request goes above."""

    kind: Literal["ema"]
    alpha: Finite = Field(gt=0, le=1)


Window = Annotated[Union[TokenWindow, CountWindow, EmaWindow], Field(discriminator="kind")]


class ClampSpec(_Strict):
    """Clamp an SAE feature to `value`, keeping the SAE error term (value 0 = suppression)."""

    source: Name
    feature: Index
    value: SteerValue = 0.0
    layer: Layer | None = None  # default: the source's layer


class AddSpec(_Strict):
    """Add `scale` × a unit-norm direction (an SAE feature's decoder row, or a vector from a file,
    normalised), × the layer's median residual norm measured from live traffic when
    `scale_unit: residual_norm` (so `scale: -0.1` there removes a tenth of a typical residual)."""

    scale: SteerValue
    scale_unit: Literal["absolute", "residual_norm"] = "absolute"
    source: Name | None = None
    feature: Index | None = None
    # .npy or .safetensors ("direction" tensor), [d_model]; relative to the first direction directory
    direction_file: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    layer: Layer | None = None

    @model_validator(mode="after")
    def _one_direction(self) -> "AddSpec":
        by_feature = self.source is not None and self.feature is not None
        if by_feature == (self.direction_file is not None):
            raise ValueError("give either source+feature or direction_file")
        if self.direction_file is not None and self.layer is None:
            raise ValueError("a direction_file needs an explicit layer")
        return self


# enforce: sent to the plugin; shadow: computed, counted (mode="shadow") and audited, never sent
Mode = Literal["enforce", "shadow"]


class PolicySteer(_Strict):
    """One action of a policy (a policy's `mode` is the policy's own, not per action)."""

    clamp: ClampSpec | None = None
    add: AddSpec | None = None

    @model_validator(mode="after")
    def _exactly_one(self):
        if (self.clamp is None) == (self.add is None):
            raise ValueError("a steer action has exactly one of clamp or add")
        return self


class SteerSpec(PolicySteer):
    """A rule's steer action; `mode: shadow` computes and audits its directive without sending it."""

    mode: Mode = "enforce"


class Action(_Strict):
    """`{alert: {...}}` or `{steer: {...}}`: one model (not a union) so errors name `actions[0].steer...`."""

    alert: dict | None = None
    steer: SteerSpec | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Action":
        if (self.alert is None) == (self.steer is None):
            raise ValueError("an action has exactly one of alert or steer")
        return self


class Rule(_Strict):
    name: Name
    description: Annotated[str, Field(max_length=4096)] = ""
    signal: Signal
    above: Finite
    scope: Literal["prompt", "generated", "all"] = "all"
    window: Window = TokenWindow()
    severity: Literal["info", "warning", "critical"] = "warning"
    labels: dict[str, str] = Field(default_factory=dict)
    actions: list[Action] = Field(default_factory=lambda: [Action(alert={})], min_length=1)


class Policy(_Strict):
    name: Name
    selector: dict[str, str] = Field(default_factory=dict)
    steer: list[PolicySteer] = Field(min_length=1)
    mode: Mode = "enforce"  # shadow: never in the plugin's plan; matching requests are counted and audited


class RuleFile(_Strict):
    rules: list[Rule] = Field(default_factory=list)
    policies: list[Policy] = Field(default_factory=list)

    @field_validator("rules", "policies")
    @classmethod
    def _unique_names(cls, items: list, info):
        names = [i.name for i in items]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"{info.field_name} names must be unique, repeated: {dupes[:10]}")
        return items


@dataclass(frozen=True)
class RuleError:
    """One problem in a rules file, located precisely enough to fix it.

    `kind` says whether `rule` names a rule or a policy. On the wire (PutRules' RuleError has no kind)
    a policy travels as ``rule="policy:<name>"``: names cannot contain ':', so it is unambiguous.
    """

    file: str
    rule: str
    field: str
    message: str
    kind: str = "rule"  # rule | policy

    def __str__(self) -> str:
        return format_error(self.file, self.wire_rule, self.field, self.message)

    @property
    def wire_rule(self) -> str:
        return f"policy:{self.rule}" if self.kind == "policy" and self.rule else self.rule


def format_error(file: str, rule: str, field: str, message: str) -> str:
    """`file: rule 'r' field 'f': message` (`policy 'p'` for a wire rule `policy:p`, `file` for none)."""
    kind, _, name = rule.partition(":") if rule.startswith("policy:") else ("rule", "", rule)
    where = f"{kind} {clip(name, 80)!r}" if name else "file"
    field = f" field {clip(field, 120)!r}" if field else ""
    return f"{file}: {where}{field}: {clip(message, 400)}"


class RulesInvalid(ValueError):
    def __init__(self, errors: list[RuleError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


def parse_rules(text: str, file: str = "<rules>") -> RuleFile:
    """Parse and validate rules YAML; raise RulesInvalid naming file, rule/policy and field.

    The YAML is loaded with bounds on size, nesting and alias expansion (`monitor.evaluate.loader`).
    """
    try:
        raw = load_yaml(text) if text.strip() else {}
    except YamlRefused as exc:
        raise RulesInvalid([RuleError(file, "", exc.path, str(exc))]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RulesInvalid([RuleError(file, "", "", f"top level must be a mapping, got {type(raw).__name__}")])
    try:
        return RuleFile.model_validate(raw)
    except ValidationError as exc:
        raise RulesInvalid([_locate(file, raw, err) for err in exc.errors(include_url=False)[:50]]) from None
    except RecursionError:  # not reachable within the loader's depth bound; never a traceback
        raise RulesInvalid([RuleError(file, "", "", "document nested too deeply")]) from None


def parse_rules_bytes(data: bytes, file: str = "<rules>") -> RuleFile:
    """`parse_rules` for raw bytes: refuses non-UTF-8 and oversized input with a short reason."""
    return parse_rules(decode_text(data, file), file)


def decode_text(data: bytes, file: str) -> str:
    try:
        return decode_utf8(data)
    except YamlRefused as exc:
        raise RulesInvalid([RuleError(file, "", "", str(exc))]) from None


def _location(loc) -> str:
    out = ""
    for part in loc:
        if part in _TAGS:
            continue
        out += f"[{part}]" if isinstance(part, int) else f".{clip(part, 60)}"
    return out.lstrip(".")


def _locate(file: str, raw: dict, err: dict) -> RuleError:
    loc = list(err["loc"])
    rule, kind = "", "rule"
    if len(loc) >= 2 and loc[0] in ("rules", "policies") and isinstance(loc[1], int):
        kind = "rule" if loc[0] == "rules" else "policy"
        items = raw.get(loc[0]) or []
        item = items[loc[1]] if isinstance(items, list) and loc[1] < len(items) else None
        name = item.get("name") if isinstance(item, dict) else None
        rule = name if isinstance(name, str) and name and len(name) <= 128 else f"{loc[0]}[{loc[1]}]"
        loc = loc[2:]
    value = err.get("input")
    if err["type"] == "finite_number":
        message = "value must be finite"
    else:
        message = err["msg"].removeprefix("Value error, ")
    whole = isinstance(value, dict) or (isinstance(value, list) and err["type"] == "value_error")
    shown = "" if whole or err["type"] == "missing" else f" (got {shorten(value)})"
    return RuleError(file, rule, _location(loc), f"{clip(message, 200)}{shown}", kind)


def load_rules_file(path: str | Path) -> RuleFile:
    path = Path(path)
    return parse_rules(read_rules_text(path), str(path))


def read_rules_text(path: str | Path) -> str:
    """A rules file's text: a regular file of at most 1 MiB, strict UTF-8."""
    try:
        data = read_regular_file(path, MAX_BYTES)
    except (OSError, ValueError) as exc:
        raise RulesInvalid([RuleError(str(path), "", "", f"cannot read: {exc}")]) from None
    return decode_text(data, str(path))
