"""Hostile rules documents: non-finite and unbounded numbers, YAML bombs, deep nesting, duplicate keys,
direction files outside their directories or not regular files — each refused with an error that names
file, rule/policy and field, never a traceback (issue 10, items 1, 6, 8, 9)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from monitor.act.steering import SteeringController, build_steering_action
from monitor.evaluate.compiler import compile_rules
from monitor.evaluate.rules import ClampSpec, RulesInvalid, SteerSpec, parse_rules
from monitor.protocol import pb
from tests.support.dictionaries import PLANTED_FEATURE, planted_direction
from tests.support.sidecar import fixture_config

D = 64
ROOT = Path(__file__).resolve().parents[2]


def refusal(text: str, file: str = "rules.yaml") -> str:
    with pytest.raises(RulesInvalid) as exc:
        parse_rules(text, file)
    return str(exc.value)


def rule(extra: str = "", above: str = "1", actions: str = "[{alert: {}}]") -> str:
    return f"""
rules:
  - name: r
    signal: {{source: sae, feature: {PLANTED_FEATURE}}}
    above: {above}
    actions: {actions}
{extra}"""


def policy(steer: str) -> str:
    return f"""
policies:
  - name: acme
    selector: {{tenant: a}}
    steer: [{steer}]
"""


# ---------------------------------------------------------------- item 1: every number finite and bounded
@pytest.mark.parametrize("text, expected", [
    (rule(above=".nan"), "rules.yaml: rule 'r' field 'above': value must be finite (got nan)"),
    (rule(above="-.inf"), "rules.yaml: rule 'r' field 'above': value must be finite (got -inf)"),
    (rule(above="1e400"), "rules.yaml: rule 'r' field 'above': value must be finite (got '1e400')"),  # YAML 1.1: a string
    (rule("    window: {kind: ema, alpha: .nan}"), "rule 'r' field 'window.ema.alpha': value must be finite (got nan)"),
    (rule(actions="[{steer: {clamp: {source: sae, feature: 3, value: .nan}}}]"),
     "rule 'r' field 'actions[0].steer.clamp.value': value must be finite (got nan)"),
    (rule(actions="[{steer: {clamp: {source: sae, feature: 3, value: .inf}}}]"),
     "rule 'r' field 'actions[0].steer.clamp.value': value must be finite (got inf)"),
    (rule(actions="[{alert: {}}, {steer: {add: {source: sae, feature: 3, scale: 1e39}}}]"),
     "rule 'r' field 'actions[1].steer.add.scale': Input should be less than or equal to 10000 (got '1e39')"),
    (rule(actions="[{steer: {clamp: {source: sae, feature: 3, value: -20000.0}}}]"),
     "rule 'r' field 'actions[0].steer.clamp.value': Input should be greater than or equal to -10000 (got -20000.0)"),
    (policy("{add: {source: sae, feature: 3, scale: .nan}}"),
     "rules.yaml: policy 'acme' field 'steer[0].add.scale': value must be finite (got nan)"),
    (policy("{add: {source: sae, feature: 3, scale: 'NaN'}}"),
     "rules.yaml: policy 'acme' field 'steer[0].add.scale': value must be finite (got 'NaN')"),
    (policy("{clamp: {source: sae, feature: 3, value: 1e39}}"),
     "rules.yaml: policy 'acme' field 'steer[0].clamp.value': Input should be less than or equal to 10000"),
], ids=["above_nan", "above_-inf", "above_1e400", "ema_alpha_nan", "clamp_nan", "clamp_inf", "add_scale_1e39",
        "clamp_-20000", "policy_scale_nan", "policy_scale_str_NaN", "policy_clamp_1e39"])
def test_non_finite_and_unbounded_numbers_are_refused_naming_the_field(text, expected):
    assert expected in refusal(text)


def test_a_bounded_finite_steering_document_is_accepted(dictionaries):
    compiled = compile_rules(rule(actions="[{steer: {clamp: {source: sae, feature: 3, value: -10000}}}]")
                             + policy("{add: {source: sae, feature: 3, scale: 10000}}"), dictionaries)
    assert compiled.rules[0].steering[0].clamp.value == -10000 and compiled.policies[0].actions[0].add.scale == 10000


def test_the_directive_builder_refuses_non_finite_values_that_bypassed_the_schema(dictionaries):
    nan_clamp = SteerSpec.model_construct(clamp=ClampSpec.model_construct(
        source="sae", feature=PLANTED_FEATURE, value=float("nan"), layer=None), add=None)
    with pytest.raises(ValueError, match=r"clamp\.value.*finite"):
        build_steering_action(nan_clamp, dictionaries)
    # 1e39 is finite as a Python float but not as the float32 the directive carries
    huge = SteerSpec.model_construct(clamp=ClampSpec.model_construct(
        source="sae", feature=PLANTED_FEATURE, value=1e39, layer=None), add=None)
    with pytest.raises(ValueError, match=r"clamp\.value"):
        build_steering_action(huge, dictionaries)


def test_the_directive_builder_refuses_an_sae_whose_clamp_tensors_are_not_finite(dictionaries):
    real = dictionaries.saes["sae"]

    class PoisonedSAE:
        d_in = real.d_in
        d_sae = real.d_sae

        def clamp_params(self, feature):
            params = real.clamp_params(feature)
            decoder = params.decoder.clone()
            decoder[5] = float("inf")
            return dataclasses.replace(params, decoder=decoder)

    class Dicts:
        saes = {"sae": PoisonedSAE()}
        probes = {}

        def layer_of(self, source):
            return 1

        def d_model(self):
            return D

    spec = SteerSpec.model_validate({"clamp": {"source": "sae", "feature": PLANTED_FEATURE}})
    with pytest.raises(ValueError, match=r"clamp\.decoder.*finite"):
        build_steering_action(spec, Dicts())


def test_the_steering_controller_drops_a_non_finite_action_and_counts_it(dictionaries):
    good = build_steering_action(SteerSpec.model_validate({"clamp": {"source": "sae", "feature": PLANTED_FEATURE}}), dictionaries)
    bad = pb.SteeringAction()
    bad.CopyFrom(good)
    bad.clamp.value = float("nan")
    withheld = []
    controller = SteeringController(True, "open", on_withheld=withheld.append)
    directive = controller.directive("req-1", "r", 4, [bad, good])
    assert list(directive.actions) == [good] and controller.dropped_nonfinite == 1
    assert controller.directive("req-2", "r", 4, [bad]) is None and controller.dropped_nonfinite == 2
    assert withheld == ["nonfinite", "nonfinite"]  # exported: steering_withheld_actions_total{reason}


# ---------------------------------------------------------------- item 6: bounded YAML
def bomb(levels: int) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_before_it_expands():
    text = bomb(9)  # 9^9 = 387M strings once expanded
    assert len(text.encode()) < 450
    message = refusal(text)
    assert "aliases expand" in message and "limit 200000" in message
    assert len(message) < 300


def test_a_medium_alias_expansion_is_refused_and_never_echoed():
    message = refusal(bomb(6))  # 531441 strings: pydantic would echo every one of them
    assert "aliases expand" in message and len(message) < 300


def test_recursive_aliases_are_refused():
    assert "recursive alias" in refusal("rules: &x [*x]\n")


def test_deep_nesting_is_refused_without_recursion():
    message = refusal("rules: " + "[" * 5000 + "]" * 5000)
    assert "nesting deeper than 32" in message


def test_an_oversized_document_is_refused():
    text = "# padding\n" * 110_000  # 1.1 MB of comments: parses as an empty document
    assert "1100000 bytes, limit 1048576" in refusal(text)


def test_echoed_values_are_truncated():
    message = refusal(rule().replace("name: r", "name: " + "x-" * 50_000 + "!"))
    assert "field 'name'" in message and len(message) < 400


def test_non_utf8_bytes_are_refused_with_the_offset():
    from monitor.evaluate.rules import parse_rules_bytes

    with pytest.raises(RulesInvalid, match=r"r\.yaml: file: not UTF-8: byte 0xff at offset 7"):
        parse_rules_bytes(b"rules: \xff\xfe", "r.yaml")


@pytest.mark.parametrize("text, expected", [
    ("rules: [{name: 2001-02-30}]", "not valid YAML"),  # a timestamp datetime() refuses
    ("rules: [{name: r, above: " + "1" * 5000 + "}]", "not valid YAML"),  # int() digit limit
    ("rules: !!binary 'not base64!'", "not valid YAML"),
    ("rules: !!python/object/apply:os.system ['true']", "not valid YAML"),
    ("? [a, b]\n: 1\n", "not valid YAML"),
], ids=["bad_date", "int_5000_digits", "bad_base64", "python_tag", "unhashable_key"])
def test_yaml_constructor_failures_are_refusals(text, expected):
    assert expected in refusal(text)


# ---------------------------------------------------------------- item 9: meaningless documents
def test_a_duplicated_top_level_key_is_refused_with_its_lines():
    text = rule() + "rules: []\n"
    message = refusal(text)
    assert "rules.yaml: file field 'rules': duplicate key 'rules' at line 7 (first at line 2)" in message


def test_a_duplicated_key_inside_a_rule_is_refused_with_its_path():
    text = rule().replace("    above: 1\n", "    above: 1\n    above: 2\n")
    assert "field 'rules[0].above': duplicate key 'above' at line 6 (first at line 5)" in refusal(text)


def test_merge_keys_may_be_overridden():
    text = """
defaults: &d {source: sae, feature: 3}
rules:
  - name: r
    signal: {<<: *d, feature: 4}
    above: 1
"""
    with pytest.raises(RulesInvalid, match="field 'defaults': Extra inputs"):
        parse_rules(text)  # refused for the unknown top-level key only, not for `feature` twice


@pytest.mark.parametrize("text, field", [
    (rule("    window: {kind: count, n: 1180591620717411303424}"), "window.count.n"),  # 2^70
    (rule().replace("feature: 3}", "feature: 1180591620717411303424}"), "signal.feature"),
    (rule(actions="[{steer: {clamp: {source: sae, feature: 3, layer: -1}}}]"), "actions[0].steer.clamp.layer"),
    (rule(actions="[{steer: {add: {direction_file: d.npy, layer: 99999999999, scale: 1}}}]"), "actions[0].steer.add.layer"),
], ids=["count_2^70", "feature_2^70", "layer_-1", "layer_huge"])
def test_unbounded_counts_indices_and_layers_are_refused(text, field):
    assert f"field '{field}'" in refusal(text)


def test_steering_on_a_layer_the_sidecar_does_not_hook_is_refused(dictionaries):
    text = rule(actions="[{steer: {clamp: {source: sae, feature: 3, layer: 7}}}]")
    with pytest.raises(RulesInvalid) as exc:
        compile_rules(text, dictionaries, file="r.yaml")
    assert "r.yaml: rule 'r' field 'actions[0].steer.clamp.layer': layer 7 is not hooked" in str(exc.value)
    # a layer the sidecar is configured to tap (tap_layers) is fine
    compiled = compile_rules(text, dictionaries, layers=[1, 7])
    assert compiled.rules[0].steering[0].layer == 7


def test_a_policy_referencing_an_unknown_source_is_called_a_policy(dictionaries):
    with pytest.raises(RulesInvalid) as exc:
        compile_rules(policy("{clamp: {source: nope, feature: 3}}"), dictionaries, file="r.yaml")
    assert "r.yaml: policy 'acme' field 'steer[0].clamp.source': unknown SAE source 'nope'" in str(exc.value)


# ---------------------------------------------------------------- item 8: direction files
@pytest.fixture
def dirs(tmp_path):
    allowed = tmp_path / "directions"
    allowed.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    return allowed, outside


def add_rule(path, scale: float = 2.0) -> str:
    return rule(actions=f"[{{steer: {{add: {{direction_file: '{path}', layer: 1, scale: {scale}}}}}}}]")


FIELD = "rule 'r' field 'actions[0].steer.add.direction_file'"


def compile_refusal(text, dictionaries, allowed) -> str:
    with pytest.raises(RulesInvalid) as exc:
        compile_rules(text, dictionaries, file="r.yaml", direction_dirs=[allowed])
    [error] = exc.value.errors
    return str(error)


def test_direction_files_load_from_the_configured_directories(dictionaries, dirs):
    allowed, _ = dirs
    np.save(allowed / "u.npy", planted_direction(D))
    save_file({"direction": planted_direction(D, seed=1)}, str(allowed / "v.safetensors"))
    for name, seed in (("u.npy", 0), (str(allowed / "v.safetensors"), 1)):  # relative: against the first dir
        compiled = compile_rules(add_rule(name), dictionaries, direction_dirs=[allowed])
        add = compiled.rules[0].steering[0].add
        np.testing.assert_allclose(np.frombuffer(add.direction.data, np.float32), planted_direction(D, seed=seed), rtol=1e-6)


def test_direction_files_outside_the_directories_are_refused(dictionaries, dirs):
    allowed, outside = dirs
    np.save(outside / "u.npy", planted_direction(D))
    assert "outside the direction directories" in compile_refusal(add_rule(outside / "u.npy"), dictionaries, allowed)
    assert "outside the direction directories" in compile_refusal(add_rule("../elsewhere/u.npy"), dictionaries, allowed)
    (allowed / "link.npy").symlink_to(outside / "u.npy")
    message = compile_refusal(add_rule("link.npy"), dictionaries, allowed)
    assert message.startswith(f"r.yaml: {FIELD}") and "outside the direction directories" in message
    with pytest.raises(RulesInvalid, match="no direction directories are configured"):
        compile_rules(add_rule(allowed / "u.npy"), dictionaries)


def test_a_fifo_is_refused_without_blocking(dictionaries, dirs):
    allowed, _ = dirs
    fifo = allowed / "pipe.npy"
    os.mkfifo(fifo)

    def writer():  # unblocks a reader that opened the FIFO for reading (the old code did, and hung)
        os.close(os.open(fifo, os.O_WRONLY))

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        message = compile_refusal(add_rule("pipe.npy"), dictionaries, allowed)
        assert message.startswith(f"r.yaml: {FIELD}") and "not a regular file" in message
    finally:
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # held open: the writer's open() returns
        thread.join()
        os.close(reader)


@pytest.mark.parametrize("name, content, expected", [
    ("bad.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage", "cannot read"),
    ("bad.npy", b"\x93NUMPY\x01\x00", "cannot read"),
    ("pickled.npy", None, "cannot read"),
    ("short.npy", np.zeros(D - 1, np.float32), f"{D - 1} values (shape [{D - 1}]), model d_model is {D}"),
    ("nan.npy", np.full(D, np.nan, np.float32), "values must be finite"),
    ("words.npy", np.array(["a"] * D), "numeric"),
    ("nodir.safetensors", {"other": np.zeros(D, np.float32)}, "no tensor named 'direction'"),
    ("u.txt", b"1 2 3", "must be .npy or .safetensors"),
])
def test_bad_direction_files_are_refused_naming_the_field(dictionaries, dirs, name, content, expected):
    allowed, _ = dirs
    path = allowed / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        save_file(content, str(path))
    elif content is None:
        np.save(path, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    else:
        np.save(path, content)
    message = compile_refusal(add_rule(name), dictionaries, allowed)
    assert message.startswith(f"r.yaml: {FIELD}: ") and expected in message, message


def test_oversized_and_non_regular_direction_files_are_refused(dictionaries, dirs):
    allowed, _ = dirs
    with open(allowed / "big.npy", "wb") as f:
        f.truncate(17 * 1024 * 1024)  # sparse: nothing is written
    assert "17825792 bytes, limit 16777216" in compile_refusal(add_rule("big.npy"), dictionaries, allowed)
    (allowed / "adir.npy").mkdir()
    assert "not a regular file" in compile_refusal(add_rule("adir.npy"), dictionaries, allowed)
    assert "cannot read" in compile_refusal(add_rule("missing.npy"), dictionaries, allowed)


def test_a_direction_file_is_normalised_and_a_zero_one_refused(dictionaries, dirs):
    """`add.scale` multiplies the unit direction (issue 16), so no element of what is added can pass
    |scale| <= 1e4: a loud file is scaled down, a zero one has no direction."""
    allowed, _ = dirs
    np.save(allowed / "loud.npy", np.full(D, 100.0, np.float32))
    add = compile_rules(add_rule("loud.npy", scale=200), dictionaries, direction_dirs=[allowed]).rules[0].steering[0].add
    direction = np.frombuffer(add.direction.data, np.float32)
    assert add.scale == 200 and np.linalg.norm(direction) == pytest.approx(1.0)
    np.testing.assert_allclose(direction, np.full(D, 1 / np.sqrt(D)), rtol=1e-6)
    np.save(allowed / "zero.npy", np.zeros(D, np.float32))
    message = compile_refusal(add_rule("zero.npy"), dictionaries, allowed)
    assert message.startswith(f"r.yaml: {FIELD}: ") and "norm 0" in message


# ---------------------------------------------------------------- the CLI: refusal, exit 2, no traceback
def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitor.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


@pytest.mark.parametrize("content, expected", [
    (b"rules: \xff\n", "not UTF-8: byte 0xff at offset 7"),
    (("rules: " + "[" * 5000 + "]" * 5000).encode(), "nesting deeper than 32"),
    (bomb(9).encode(), "aliases expand"),
    ((rule() + "rules: []\n").encode(), "duplicate key 'rules' at line 7"),
    (rule("    window: {kind: count, n: 1180591620717411303424}").encode(), "window.count.n"),
    (b"rules: [{name: 2001-02-30}]", "not valid YAML"),
], ids=["not_utf8", "deep_5000", "alias_bomb", "duplicate_key", "count_2^70", "bad_date"])
def test_rules_validate_prints_the_refusal_and_exits_2(tmp_path, content, expected):
    path = tmp_path / "rules.yaml"
    path.write_bytes(content)
    result = cli("rules", "validate", str(path))
    assert result.returncode == 2, result.stderr
    assert expected in " ".join(result.stderr.split()) and "Traceback" not in result.stderr


def test_rules_validate_with_config_refuses_an_unhooked_layer_and_a_fifo(tmp_path):
    config = fixture_config(tmp_path, D)
    (tmp_path / "fw.yaml").write_text(json.dumps(config))
    path = tmp_path / "rules.yaml"
    path.write_text(rule(actions="[{steer: {clamp: {source: sae, feature: 3, layer: 7}}}]"))
    result = cli("rules", "validate", str(path), "--config", str(tmp_path / "fw.yaml"))
    assert result.returncode == 2 and "layer 7 is not hooked" in result.stderr and "Traceback" not in result.stderr
    os.mkfifo(tmp_path / "pipe.npy")  # the rules file's directory is the default direction directory
    path.write_text(add_rule("pipe.npy"))
    result = cli("rules", "validate", str(path), "--config", str(tmp_path / "fw.yaml"))
    assert result.returncode == 2 and "not a regular file" in result.stderr, result.stderr


def test_rules_apply_refuses_a_non_utf8_file_locally(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_bytes(b"rules: \xff\n")
    result = subprocess.run([sys.executable, "-m", "monitor.cli", "rules", "apply", str(path), "--token", "t",
                             "--address", "unix:///nonexistent.sock"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "not UTF-8" in result.stderr and "Traceback" not in result.stderr
