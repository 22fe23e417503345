"""Compile validated rules against the loaded dictionaries into arrays the hot path can use.

Compilation is where references are checked (unknown source, feature out of range, probe name,
a clamp the plugin cannot run) and where steering actions are turned into ready protobuf messages,
so evaluating a batch never touches YAML, pydantic or weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from monitor.act.steering import DirectionRefused, build_steering_action
from monitor.act.units import PolicyTemplate
from monitor.encode.stage import Dictionaries, EncodeStage, SignalKey
from monitor.evaluate.rules import (
    CountWindow,
    EmaWindow,
    FeatureSignal,
    RuleError,
    RulesInvalid,
    SteerSpec,
    parse_rules,
    read_rules_text,
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
    steering: tuple  # pb.SteeringAction ready to send, or RelativeAdd (resolved when sent)
    shadow_steering: tuple = ()  # the same, for `mode: shadow` actions: computed and audited, never sent


@dataclass(frozen=True)
class CompiledRules:
    """An immutable, swappable rule set: rules grouped by layer plus the encode plan they need."""

    version: int
    yaml: str
    rules: tuple[CompiledRule, ...]
    policies: tuple  # PolicyTemplate: resolved into pb.SteeringPolicy for each plan (ResidualNorms)
    encode: EncodeStage
    feature_keys: tuple[SignalKey, ...]  # SAE features referenced by rules: the bounded label set

    @property
    def enforced_policies(self) -> tuple:
        """The policies the plugin's plan carries (not those in `mode: shadow`)."""
        return tuple(p for p in self.policies if p.mode != "shadow")

    @property
    def shadow_policies(self) -> tuple:
        return tuple(p for p in self.policies if p.mode == "shadow")

    def rules_on(self, layer: int) -> list[CompiledRule]:
        return [r for r in self.rules if r.layer == layer]

    @property
    def layers(self) -> list[int]:
        return sorted(self.encode.layers)


def compile_rules(text: str, dictionaries: Dictionaries, version: int = 0, file: str = "<rules>", *,
                  layers: Iterable[int] | None = None, direction_dirs: Sequence[str | Path] = ()) -> CompiledRules:
    """Validate and compile; raise RulesInvalid listing every problem with file, rule/policy and field.

    `layers`: the layers the sidecar asks the plugin to tap (config `tap_layers`) besides its sources'
    layers; steering on any other layer is refused. `direction_dirs`: the only directories `add.direction_file`
    may read from (a relative path resolves against the first).
    """
    spec = parse_rules(text, file)
    errors: list[RuleError] = []
    hooked = sorted(set(layers or ()) | {c.layer for c in dictionaries.configs.values()})
    checker = _References(dictionaries, file, errors, hooked, [Path(d) for d in direction_dirs])
    keys: list[SignalKey] = []
    for rule in spec.rules:
        if isinstance(rule.signal, FeatureSignal):
            if checker.feature(rule.name, "signal", rule.signal.source, rule.signal.feature):
                keys.append(SignalKey(rule.signal.source, feature=rule.signal.feature))
        else:
            if checker.probe(rule.name, "signal", rule.signal.source, rule.signal.probe):
                keys.append(SignalKey(rule.signal.source, probe=rule.signal.probe))
    steering = {rule.name: [(a.steer.mode, checker.steering(rule.name, f"actions[{i}].steer", a.steer))
                            for i, a in enumerate(rule.actions) if a.steer is not None]
                for rule in spec.rules}
    policy_actions = [[checker.steering(p.name, f"steer[{i}]", s, kind="policy") for i, s in enumerate(p.steer)]
                      for p in spec.policies]
    if errors:
        raise RulesInvalid(errors)
    policies = [PolicyTemplate(p.name, dict(p.selector), tuple(actions), p.mode)
                for p, actions in zip(spec.policies, policy_actions)]

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
            alert=any(a.alert is not None for a in rule.actions),
            steering=tuple(a for mode, a in steering[rule.name] if mode == "enforce"),
            shadow_steering=tuple(a for mode, a in steering[rule.name] if mode == "shadow"),
        ))
    feature_keys = tuple(k for k in dict.fromkeys(keys) if k.feature is not None)
    return CompiledRules(version, text, tuple(compiled), tuple(policies), encode, feature_keys)


class _References:
    """Checks names, indices, layers and files against what the sidecar has loaded, collecting errors."""

    def __init__(self, dictionaries: Dictionaries, file: str, errors: list[RuleError], layers: list[int],
                 direction_dirs: list[Path]) -> None:
        self.d, self.file, self.errors = dictionaries, file, errors
        self.layers, self.direction_dirs = layers, direction_dirs

    def _fail(self, rule: str, field: str, message: str, kind: str = "rule") -> bool:
        self.errors.append(RuleError(self.file, rule, field, message, kind))
        return False

    def feature(self, rule: str, field: str, source: str, feature: int, kind: str = "rule") -> bool:
        if source not in self.d.saes:
            known = sorted(self.d.saes)
            return self._fail(rule, f"{field}.source", f"unknown SAE source {source!r} (configured: {known})", kind)
        d_sae = self.d.saes[source].d_sae
        if feature >= d_sae:
            return self._fail(rule, f"{field}.feature", f"feature {feature} out of range for {source!r} (d_sae={d_sae})", kind)
        return True

    def probe(self, rule: str, field: str, source: str, probe: str) -> bool:
        if source not in self.d.probes:
            known = sorted(self.d.probes)
            return self._fail(rule, f"{field}.source", f"unknown probe source {source!r} (configured: {known})")
        names = list(self.d.probes[source].names)
        if probe not in names:
            return self._fail(rule, f"{field}.probe", f"unknown probe {probe!r} in {source!r} (has: {names[:20]})")
        return True

    def steering(self, rule: str, field: str, spec: SteerSpec, kind: str = "rule") -> pb.SteeringAction | None:
        what = "clamp" if spec.clamp is not None else "add"
        target = spec.clamp or spec.add
        if target.source is not None and not self.feature(rule, f"{field}.{what}", target.source, target.feature, kind):
            return None
        layer = target.layer if target.layer is not None else self.d.layer_of(target.source)
        if layer not in self.layers:
            return self._fail(rule, f"{field}.{what}.layer", f"layer {layer} is not hooked by this sidecar "
                              f"(its layers: {self.layers}; add it to tap_layers)", kind) or None
        try:
            return build_steering_action(spec, self.d, self.direction_dirs)
        except DirectionRefused as exc:
            return self._fail(rule, f"{field}.add.{exc.field}", str(exc), kind) or None
        except (ValueError, OSError) as exc:
            return self._fail(rule, f"{field}.{what}", str(exc), kind) or None


def load_and_compile(path: str | Path, dictionaries: Dictionaries, version: int = 0, **options) -> CompiledRules:
    path = Path(path)
    return compile_rules(read_rules_text(path), dictionaries, version, str(path), **options)
