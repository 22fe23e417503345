"""Property tests of the rules loader (issue 10, item 9): arbitrary bytes, YAML-ish text and mutations of
a valid document are accepted or refused with errors that name file and field — never any other
exception — in process, and through a real sidecar's PutRules (never UNKNOWN, the rules in force kept).

Deterministic: `derandomize=True` (examples derived from the test), no example database, no deadline.
"""

from __future__ import annotations

import math
import os

import grpc
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.config import SourceConfig
from monitor.encode.stage import Dictionaries
from monitor.evaluate.compiler import compile_rules
from monitor.evaluate.rules import RulesInvalid, parse_rules, parse_rules_bytes
from monitor.protocol import pb, pb_grpc
from tests.support.dictionaries import planted_direction, planted_rules, write_probe_bank, write_saelens_jumprelu
from tests.support.sidecar import ADMIN_TOKEN, SidecarProcess, fixture_config

D = 64
FILE = "fuzz.yaml"
AUTH = [("authorization", f"Bearer {ADMIN_TOKEN}")]
VALID = planted_rules("    window: {kind: ema, alpha: 0.5}\n").replace("policies:", """  - name: pushed
    signal: {source: sae, feature: 1}
    above: 4
    window: {kind: count, n: 2}
    actions: [{steer: {add: {direction_file: u.npy, layer: 1, scale: 2}}}]
policies:""")
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=300,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "directions").mkdir()
    np.save(tmp / "directions" / "u.npy", planted_direction(D))
    (tmp / "directions" / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    os.mkfifo(tmp / "directions" / "pipe.npy")
    return tmp


@pytest.fixture(scope="module")
def dictionaries(workdir):
    return Dictionaries([
        SourceConfig(name="sae", kind="sae", layer=1, path=write_saelens_jumprelu(workdir / "sae", D)),
        SourceConfig(name="probes", kind="probes", layer=1, path=write_probe_bank(workdir / "p.safetensors", D)),
    ])


def assert_refusal(exc: RulesInvalid, named: bool = False) -> None:
    """A refusal lists short errors naming the file; `named`: each also names a field or rule."""
    assert exc.errors
    for e in exc.errors:
        text = str(e)
        assert text.startswith(f"{FILE}: ") and len(text) < 800, text
        if named:
            assert e.field or e.rule, text


def assert_sane(spec, compiled=None) -> None:
    """What an accepted document may never contain: non-finite or unbounded numbers, steering on an
    unhooked layer, a directive value the plugin could not write into the residual stream."""
    for rule in spec.rules:
        assert math.isfinite(rule.above)
        window = rule.window
        assert window.kind != "count" or 1 <= window.n <= 2**24
        assert window.kind != "ema" or 0 < window.alpha <= 1
    if compiled is None:
        return
    actions = [a for r in compiled.rules for a in r.steering] + [a for p in compiled.policies for a in p.actions]
    for action in actions:
        assert action.layer == 1, action.layer
        which = action.WhichOneof("kind")
        value = action.clamp.value if which == "clamp" else action.add.scale
        assert math.isfinite(value) and abs(value) <= 1e4
        tensors = [action.clamp.decoder, action.clamp.encoder] if which == "clamp" else [action.add.direction]
        for t in tensors:
            v = np.frombuffer(t.data, np.float32)
            assert v.size == D and np.isfinite(v).all()
        if which == "add":
            assert np.abs(np.frombuffer(action.add.direction.data, np.float32) * value).max() <= 1e4


def load(text_or_bytes, dictionaries=None, workdir=None, named=False):
    """Parse (and compile, given dictionaries): return the result or None for a refusal."""
    try:
        if isinstance(text_or_bytes, bytes):
            spec = parse_rules_bytes(text_or_bytes, FILE)
        else:
            spec = parse_rules(text_or_bytes, FILE)
        assert_sane(spec)
        if dictionaries is not None:
            compiled = compile_rules(text_or_bytes if isinstance(text_or_bytes, str) else text_or_bytes.decode(),
                                     dictionaries, file=FILE, direction_dirs=[workdir / "directions"])
            assert_sane(spec, compiled)
            return compiled
        return spec
    except RulesInvalid as exc:
        assert_refusal(exc, named)
        return None


def test_the_seed_document_is_valid(dictionaries, workdir):
    compiled = load(VALID, dictionaries, workdir)
    assert compiled is not None and len(compiled.rules) == 3 and len(compiled.policies) == 1


# ---------------------------------------------------------------- strategies
TOKENS = list("[]{}:,-&*!|>'\"#?\n \t.e0123456789") + [
    "rules", "policies", "name", "signal", "source", "feature", "above", "window", "kind", "count", "ema",
    "actions", "steer", "clamp", "add", "scale", "value", "layer", "direction_file", "sae", "probes",
    "&a ", "*a", "<<: ", "!!binary ", "!!python/object:os.system ", "!!float ", "!!set ", "---\n", "...\n",
    ".nan", ".inf", "-.inf", "1e39", "2001-02-30", "[" * 400, "{a: " * 200, "9" * 5000, "\\xff", "\\ud800", '"\\ud800"', "%YAML 1.1\n", "\u00e9", "\x85",
]
yamlish = st.lists(st.sampled_from(TOKENS), max_size=80).map("".join)

KEYS = ["rules", "policies", "name", "signal", "source", "feature", "probe", "above", "scope", "window", "kind",
        "n", "alpha", "severity", "labels", "actions", "alert", "steer", "clamp", "add", "scale", "value", "layer",
        "direction_file", "selector", "description"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["sae", "probes", "planted", "token", "count", "ema", "generated", "prompt", "critical",
                     "nan", ".inf", "1e39", "-1", "u.npy", "pipe.npy", "corrupt.safetensors", "../u.npy",
                     "/etc/passwd", "directions/u.npy", "1", "0.5", "1e400", 2**70, 10_000, 10_001, -0.0]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=4), max_leaves=10)


def paths(node, prefix=()):
    """Every (container path, key) inside a parsed document, for structured mutations."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix, k
            yield from paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield prefix, i
            yield from paths(v, prefix + (i,))


@st.composite
def mutated(draw) -> str:
    """The valid document with 1-3 values replaced, keys deleted or added, then maybe a text edit."""
    doc = yaml.safe_load(VALID)
    for _ in range(draw(st.integers(1, 3))):
        where = list(paths(doc))
        container_path, key = draw(st.sampled_from(where))
        container = doc
        for p in container_path:
            container = container[p]
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if op == "replace" or (op == "delete" and isinstance(container, list)):
            container[key] = draw(values)
        elif op == "delete":
            del container[key]
        elif isinstance(container, dict):
            container[draw(st.sampled_from(KEYS))] = draw(values)
        else:
            container.append(draw(values))
    text = yaml.safe_dump(doc, allow_unicode=draw(st.booleans()))
    if draw(st.booleans()):  # a text-level edit: delete/insert/replace a slice
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 20)))
        text = text[:i] + draw(yamlish) + text[j:]
    return text


# ---------------------------------------------------------------- in process
@FUZZ
@given(data=st.binary(max_size=400))
def test_arbitrary_bytes_are_refused_or_accepted_never_raised(data):
    load(data)


@FUZZ
@given(prefix=st.sampled_from([b"", VALID.encode()[:200], VALID.encode()]), data=st.binary(max_size=64),
       at=st.integers(0, 2000))
def test_valid_documents_with_stray_bytes(prefix, data, at):
    load(prefix[:at] + data + prefix[at:])


@FUZZ
@given(text=yamlish)
def test_yamlish_text(text, dictionaries, workdir):
    load(text, dictionaries, workdir)


@FUZZ
@given(text=mutated())
def test_mutated_valid_documents_are_refused_naming_the_field(text, dictionaries, workdir):
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        raw = None
    load(text, dictionaries, workdir, named=isinstance(raw, dict) and bool(raw))


@FUZZ
@given(doc=st.dictionaries(st.sampled_from(["rules", "policies"]), st.lists(values, max_size=3), max_size=2))
def test_random_rule_shaped_documents(doc, dictionaries, workdir):
    load(yaml.safe_dump(doc), dictionaries, workdir, named=bool(doc))


def test_lone_surrogates_from_yaml_escapes_are_refused(dictionaries, workdir):
    text = VALID.replace("selector: {tenant: b}", 'selector: {tenant: "\\ud800"}')
    with pytest.raises(RulesInvalid, match=r"fuzz\.yaml: .*(not valid Unicode|invalid Unicode)"):
        compile_rules(text, dictionaries, file=FILE, direction_dirs=[workdir / "directions"])


# ---------------------------------------------------------------- through a real sidecar's PutRules
@pytest.fixture(scope="module")
def sidecar(workdir):
    config = fixture_config(workdir, D, direction_dirs=[str(workdir / "directions")])
    with SidecarProcess(workdir, config) as proc:
        stub = pb_grpc.AdminStub(grpc.insecure_channel(proc.tcp_address))
        reply = stub.PutRules(pb.PutRulesRequest(yaml=VALID, author="seed"), metadata=AUTH, timeout=30)
        assert reply.ok, list(reply.errors)
        yield proc, stub


def put(stub, text: str):
    """PutRules; returns the reply, asserting a refusal leaves the stored rules exactly as they were."""
    before = stub.GetRules(pb.GetRulesRequest(), metadata=AUTH, timeout=30)
    try:
        reply = stub.PutRules(pb.PutRulesRequest(yaml=text, author="fuzz"), metadata=AUTH, timeout=60)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
        reply = None
    if reply is None or not reply.ok:
        after = stub.GetRules(pb.GetRulesRequest(), metadata=AUTH, timeout=30)
        assert (after.version, after.yaml) == (before.version, before.yaml)
    if reply is not None and not reply.ok:
        for e in reply.errors:
            assert e.file == "<admin>" and len(e.message) < 800, e
    return reply


HOSTILE = [
    ("bomb", "a0: &a0 [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9)), "", "aliases expand"),
    ("deep", "rules: " + "[" * 5000 + "]" * 5000, "", "nesting deeper than 32"),
    ("duplicate", VALID + "rules: []\n", "", "duplicate key 'rules'"),
    ("nan_policy", VALID.replace("steer: [{clamp: {source: sae, feature: 3, value: 0}}]",
                                 "steer: [{add: {source: sae, feature: 3, scale: .nan}}]"),
     "policy:tenant_b_suppress", "value must be finite"),
    ("huge_count", VALID.replace("n: 2}", "n: 1180591620717411303424}"), "pushed", "less than or equal to 16777216"),
    ("unhooked", VALID.replace("layer: 1, scale", "layer: 5, scale"), "pushed", "layer 5 is not hooked"),
    ("fifo", VALID.replace("u.npy", "pipe.npy"), "pushed", "not a regular file"),
    ("corrupt", VALID.replace("u.npy", "corrupt.safetensors"), "pushed", "cannot read .safetensors"),
    ("escape", VALID.replace("u.npy", "../p.safetensors"), "pushed", "outside the direction directories"),
    ("oversized", "#" * (2 * 1024 * 1024), "", "limit 1048576"),
]


@pytest.mark.parametrize("name, text, rule, message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_documents_are_refused_by_put_rules(sidecar, name, text, rule, message):
    proc, stub = sidecar
    reply = put(stub, text)
    assert reply is not None and not reply.ok
    assert any(e.rule == rule and message in e.message for e in reply.errors), list(reply.errors)
    assert proc.proc.poll() is None


@settings(FUZZ, max_examples=40)
@given(text=st.one_of(mutated(), yamlish))
def test_put_rules_fuzz_never_unknown(sidecar, text):
    proc, stub = sidecar
    put(stub, text)
    assert proc.proc.poll() is None
