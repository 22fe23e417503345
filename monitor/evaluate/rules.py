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

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

NAME = r"^[a-zA-Z_][a-zA-Z0-9_\-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureSignal(_Strict):
    source: str
    feature: int = Field(ge=0)


class ProbeSignal(_Strict):
    source: str
    probe: str


Signal = Union[FeatureSignal, ProbeSignal]


class TokenWindow(_Strict):
    """Fire on the first in-scope token above the threshold."""

    kind: Literal["token"] = "token"


class CountWindow(_Strict):
    """Fire when `n` in-scope tokens of the request have been above the threshold."""

    kind: Literal["count"]
    n: int = Field(ge=1)


class EmaWindow(_Strict):
    """Fire when the exponential moving average of the signal over the request goes above."""

    kind: Literal["ema"]
    alpha: float = Field(gt=0, le=1)


Window = Annotated[Union[TokenWindow, CountWindow, EmaWindow], Field(discriminator="kind")]


class ClampSpec(_Strict):
    """Clamp an SAE feature to `value`, keeping the SAE error term (value 0 = suppression)."""

    source: str
    feature: int = Field(ge=0)
    value: float = 0.0
    layer: int | None = None  # default: the source's layer


class AddSpec(_Strict):
    """Add `scale` × a direction: an SAE feature's decoder row, or a vector from a file."""

    scale: float
    source: str | None = None
    feature: int | None = Field(default=None, ge=0)
    direction_file: Path | None = None  # .npy or .safetensors ("direction" tensor), [d_model]
    layer: int | None = None

    @model_validator(mode="after")
    def _one_direction(self) -> "AddSpec":
        by_feature = self.source is not None and self.feature is not None
        if by_feature == (self.direction_file is not None):
            raise ValueError("give either source+feature or direction_file")
        if self.direction_file is not None and self.layer is None:
            raise ValueError("a direction_file needs an explicit layer")
        return self


class SteerSpec(_Strict):
    clamp: ClampSpec | None = None
    add: AddSpec | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "SteerSpec":
        if (self.clamp is None) == (self.add is None):
            raise ValueError("a steer action has exactly one of clamp or add")
        return self


class AlertAction(_Strict):
    alert: dict = Field(default_factory=dict)


class SteerAction(_Strict):
    steer: SteerSpec


Action = Union[AlertAction, SteerAction]


class Rule(_Strict):
    name: str = Field(pattern=NAME)
    description: str = ""
    signal: Signal
    above: float
    scope: Literal["prompt", "generated", "all"] = "all"
    window: Window = TokenWindow()
    severity: Literal["info", "warning", "critical"] = "warning"
    labels: dict[str, str] = Field(default_factory=dict)
    actions: list[Action] = Field(default_factory=lambda: [AlertAction()], min_length=1)


class Policy(_Strict):
    name: str = Field(pattern=NAME)
    selector: dict[str, str] = Field(default_factory=dict)
    steer: list[SteerSpec] = Field(min_length=1)


class RuleFile(_Strict):
    rules: list[Rule] = Field(default_factory=list)
    policies: list[Policy] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> "RuleFile":
        for kind, items in (("rules", self.rules), ("policies", self.policies)):
            names = [i.name for i in items]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{kind} names must be unique, repeated: {dupes}")
        return self


@dataclass(frozen=True)
class RuleError:
    """One problem in a rules file, located precisely enough to fix it."""

    file: str
    rule: str
    field: str
    message: str

    def __str__(self) -> str:
        where = f"rule {self.rule!r}" if self.rule else "file"
        field = f" field {self.field!r}" if self.field else ""
        return f"{self.file}: {where}{field}: {self.message}"


class RulesInvalid(ValueError):
    def __init__(self, errors: list[RuleError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


def parse_rules(text: str, file: str = "<rules>") -> RuleFile:
    """Parse and validate rules YAML; raise RulesInvalid naming file, rule and field."""
    try:
        raw = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise RulesInvalid([RuleError(file, "", "", f"not valid YAML: {exc}")]) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RulesInvalid([RuleError(file, "", "", f"top level must be a mapping, got {type(raw).__name__}")])
    try:
        return RuleFile.model_validate(raw)
    except ValidationError as exc:
        raise RulesInvalid([_locate(file, raw, err) for err in exc.errors()]) from exc


def _locate(file: str, raw: dict, err: dict) -> RuleError:
    loc = list(err["loc"])
    rule = ""
    if len(loc) >= 2 and loc[0] in ("rules", "policies") and isinstance(loc[1], int):
        items = raw.get(loc[0]) or []
        item = items[loc[1]] if loc[1] < len(items) else None
        rule = str(item.get("name")) if isinstance(item, dict) and item.get("name") else f"{loc[0]}[{loc[1]}]"
        loc = loc[2:]
    field = ".".join(str(p) for p in loc)
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return RuleError(file, rule, field, f"{err['msg']}{shown}")


def load_rules_file(path: str | Path) -> RuleFile:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RulesInvalid([RuleError(str(path), "", "", f"cannot read: {exc}")]) from exc
    return parse_rules(text, str(path))
