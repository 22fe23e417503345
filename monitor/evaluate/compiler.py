"""Compile validated rules against the loaded dictionaries into arrays the hot path can use.

Compilation is where references are checked (unknown source, feature out of range, probe name,
a clamp the plugin cannot run) and where steering actions are turned into ready protobuf messages,
so evaluating a batch never touches YAML, pydantic or weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from monitor.act.steering import build_steering_action
from monitor.encode.stage import Dictionaries, EncodeStage, SignalKey
from monitor.evaluate.rules import (
    CountWindow,
    EmaWindow,
    FeatureSignal,
    RuleError,
    RulesInvalid,
    SteerAction,
    SteerSpec,
    parse_rules,
)
from monitor.protocol import pb

SCOPES = {"all": 0, "prompt": 1, "generated": 2}


@dataclass(frozen=True)
class CompiledRule:
    index: int
    name: str
    severity: str
    labels: dict
    key: SignalKey
    layer: int
    column: int
    above: float
    scope: int  # SCOPES value
    window: str  # token | count | ema
    count_n: int
    ema_alpha: float
    alert: bool
    steering: tuple  # pb.SteeringAction, ready to send


@dataclass(frozen=True)
class CompiledRules:
    """An immutable, swappable rule set: rules grouped by layer plus the encode plan they need."""

    version: int
    yaml: str
    rules: tuple[CompiledRule, ...]
    policies: tuple  # pb.SteeringPolicy
    encode: EncodeStage
    feature_keys: tuple[SignalKey, ...]  # SAE features referenced by rules: the bounded label set

    def rules_on(self, layer: int) -> list[CompiledRule]:
        return [r for r in self.rules if r.layer == layer]

    @property
    def layers(self) -> list[int]:
        return sorted(self.encode.layers)


def compile_rules(text: str, dictionaries: Dictionaries, version: int = 0, file: str = "<rules>") -> CompiledRules:
    """Validate and compile; raise RulesInvalid listing every problem with file, rule and field."""
    spec = parse_rules(text, file)
    errors: list[RuleError] = []
    checker = _References(dictionaries, file, errors)
    keys: list[SignalKey] = []
    for rule in spec.rules:
        if isinstance(rule.signal, FeatureSignal):
            if checker.feature(rule.name, "signal", rule.signal.source, rule.signal.feature):
                keys.append(SignalKey(rule.signal.source, feature=rule.signal.feature))
        else:
            if checker.probe(rule.name, "signal", rule.signal.source, rule.signal.probe):
                keys.append(SignalKey(rule.signal.source, probe=rule.signal.probe))
    steering = {rule.name: _compile_steering(rule.name, [a.steer for a in rule.actions if isinstance(a, SteerAction)], checker)
                for rule in spec.rules}
    policies = []
    for policy in spec.policies:
        actions = _compile_steering(policy.name, policy.steer, checker, field="steer")
        policies.append(pb.SteeringPolicy(name=policy.name, selector=policy.selector, actions=actions))
    if errors:
        raise RulesInvalid(errors)

    encode = EncodeStage(dictionaries, keys)
    compiled = []
    for index, rule in enumerate(spec.rules):
        key = keys[index]
        layer, column = encode.column(key)
        window = rule.window
        compiled.append(CompiledRule(
            index=index, name=rule.name, severity=rule.severity, labels=dict(rule.labels), key=key,
            layer=layer, column=column, above=float(rule.above), scope=SCOPES[rule.scope],
            window=window.kind,
            count_n=window.n if isinstance(window, CountWindow) else 1,
            ema_alpha=window.alpha if isinstance(window, EmaWindow) else 1.0,
            alert=any(not isinstance(a, SteerAction) for a in rule.actions),
            steering=tuple(steering[rule.name]),
        ))
    feature_keys = tuple(k for k in dict.fromkeys(keys) if k.feature is not None)
    return CompiledRules(version, text, tuple(compiled), tuple(policies), encode, feature_keys)


class _References:
    """Checks names and indices against the loaded dictionaries, collecting errors."""

    def __init__(self, dictionaries: Dictionaries, file: str, errors: list[RuleError]) -> None:
        self.d, self.file, self.errors = dictionaries, file, errors

    def _fail(self, rule: str, field: str, message: str) -> bool:
        self.errors.append(RuleError(self.file, rule, field, message))
        return False

    def feature(self, rule: str, field: str, source: str, feature: int) -> bool:
        if source not in self.d.saes:
            known = sorted(self.d.saes)
            return self._fail(rule, f"{field}.source", f"unknown SAE source {source!r} (configured: {known})")
        d_sae = self.d.saes[source].d_sae
        if feature >= d_sae:
            return self._fail(rule, f"{field}.feature", f"feature {feature} out of range for {source!r} (d_sae={d_sae})")
        return True

    def probe(self, rule: str, field: str, source: str, probe: str) -> bool:
        if source not in self.d.probes:
            known = sorted(self.d.probes)
            return self._fail(rule, f"{field}.source", f"unknown probe source {source!r} (configured: {known})")
        names = list(self.d.probes[source].names)
        if probe not in names:
            return self._fail(rule, f"{field}.probe", f"unknown probe {probe!r} in {source!r} (has: {names})")
        return True

    def steering(self, rule: str, field: str, spec: SteerSpec) -> pb.SteeringAction | None:
        target = spec.clamp or spec.add
        if getattr(target, "source", None) is not None and not self.feature(rule, f"{field}.source", target.source, target.feature):
            return None
        try:
            return build_steering_action(spec, self.d)
        except (ValueError, OSError) as exc:
            self._fail(rule, field, str(exc))
            return None


def _compile_steering(name: str, specs: list[SteerSpec], checker: _References, field: str = "actions") -> list:
    actions = []
    for i, spec in enumerate(specs):
        action = checker.steering(name, f"{field}[{i}].steer" if field == "actions" else f"{field}[{i}]", spec)
        if action is not None:
            actions.append(action)
    return actions


def load_and_compile(path: str | Path, dictionaries: Dictionaries, version: int = 0) -> CompiledRules:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RulesInvalid([RuleError(str(path), "", "", f"cannot read: {exc}")]) from exc
    return compile_rules(text, dictionaries, version, str(path))
