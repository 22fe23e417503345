"""Property tests of the ingest parse (issue 10): any bytes a plugin stream can carry are either
parsed exactly as protobuf parses them, or refused with DecodeError (which the servicer counts as
`malformed`); a parsed batch is either decoded or refused with a BatchRejected reason. No other
exception ever escapes. Deterministic in CI: derandomized, bounded example counts, no deadline."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from monitor.plugin.client import encode_batch
from monitor.protocol import pb
from monitor.receive.batch import BatchRejected, decode_batch
from monitor.receive.wire import DecodeError, parse_plugin_message

FUZZ = settings(derandomize=True, max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
REASONS = {"malformed", "oversized", "dtype", "unknown_layer", "position"}
U64 = st.integers(0, 2**64 - 1)


def protobuf_view(raw: bytes):
    """What protobuf makes of the bytes, with a batch's data split off (or DecodeError)."""
    msg = pb.PluginMessage.FromString(raw)
    data = None
    if msg.HasField("batch"):
        data = msg.batch.activations.data
        msg.batch.activations.data = b""
    return msg, data


def ours(raw: bytes):
    msg, data = parse_plugin_message(raw)
    if data is None and msg.HasField("batch"):  # the plain protobuf path: the data is still in the message
        data = msg.batch.activations.data
        msg.batch.activations.data = b""
    return msg, (bytes(data) if data is not None else None)


def check_parse(raw: bytes):
    """The parse agrees with protobuf or both refuse; then any batch decodes or is refused by reason."""
    try:
        expected = protobuf_view(raw)
    except DecodeError:
        try:
            ours(raw)
        except DecodeError:
            return None
        raise AssertionError("parsed bytes that protobuf refuses")
    got = ours(raw)
    assert got == expected
    msg, data = parse_plugin_message(raw)
    if msg.HasField("batch"):
        check_decode(msg.batch, data)
    return msg


def check_decode(batch: pb.ActivationBatch, data) -> None:
    d = batch.activations.shape[-1] if len(batch.activations.shape) else 8
    try:
        decoded = decode_batch(batch, d, {0, 1, 3}, 1 << 20, 4096, data, max_position=1 << 24)
    except BatchRejected as exc:
        assert exc.reason in REASONS, exc.reason
        return
    n = decoded.n_tokens
    assert decoded.activations.shape[1] == n == len(decoded.token_request) == len(decoded.generated)
    assert decoded.positions.dtype == np.int64 and (decoded.positions >= 0).all() and (decoded.positions < 1 << 24).all()
    assert n == 0 or decoded.token_request.max() < len(decoded.request_ids)


@st.composite
def batches(draw):
    """Plausible-to-hostile batches: any layer numbers, shapes that may or may not match the data,
    positions over the whole uint64 range, request ids in any Unicode, any dtype enum value."""
    n = draw(st.integers(0, 6))
    d = draw(st.sampled_from([1, 2, 8]))
    layers = draw(st.lists(st.sampled_from([0, 1, 3, 7, 2**32 - 1]), min_size=1, max_size=3))
    dtype = draw(st.sampled_from([pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16, pb.DTYPE_UNSPECIFIED, 9]))
    itemsize = 4 if dtype in (pb.FLOAT32, 9, pb.DTYPE_UNSPECIFIED) else 2
    values = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=len(layers) * n * d,
                           max_size=len(layers) * n * d))
    with np.errstate(over="ignore"):  # float32 values beyond float16's range become inf: fine, wanted even
        data = np.array(values, dtype=np.float32 if itemsize == 4 else np.float16).tobytes()
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]  # short data
    shape = [len(layers), n, d]
    if draw(st.integers(0, 5)) == 0:
        shape = draw(st.lists(st.integers(0, 2**32 - 1), max_size=4))
    ids = draw(st.lists(st.text(max_size=12), min_size=0, max_size=4))
    token_request = draw(st.lists(st.integers(0, max(len(ids), 1)), min_size=n, max_size=n))
    positions = draw(st.lists(st.one_of(st.integers(0, 64), U64), min_size=n, max_size=n))
    generated = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return pb.ActivationBatch(step=draw(U64), layers=layers, activations=pb.Tensor(dtype=dtype, shape=shape, data=data),
                              request_ids=ids, token_request_index=token_request, positions=positions,
                              is_generated=generated, captured_unix_s=draw(st.floats(allow_nan=True)))


def encodings(batch: pb.ActivationBatch) -> list[bytes]:
    """The batch as protobuf serialises it and as the real plugin's encoder writes it."""
    plain = pb.PluginMessage(batch=batch).SerializeToString()
    meta = pb.ActivationBatch()
    meta.CopyFrom(batch)
    meta.ClearField("activations")
    head = pb.Tensor(dtype=batch.activations.dtype, shape=batch.activations.shape)
    plugin = encode_batch(meta.SerializeToString(), head.SerializeToString(), memoryview(batch.activations.data))
    return [plain, plugin]


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_parse_as_protobuf_does_or_are_refused(raw):
    check_parse(raw)


@FUZZ
@given(batches())
def test_hostile_batches_parse_exactly_and_decode_or_are_refused_by_reason(batch):
    for raw in encodings(batch):
        msg = check_parse(raw)
        assert msg is not None and msg.HasField("batch")


MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("repeat"), st.integers(0, 10**6), st.integers(1, 40)),  # a span appears twice
)


def mutate(raw: bytes, mutations) -> bytes:
    b = bytearray(raw)
    for kind, at, arg in mutations:
        i = at % (len(b) + 1)
        if kind == "flip" and b:
            b[i % len(b)] = arg
        elif kind == "truncate":
            del b[i:]
        elif kind == "insert":
            b[i:i] = bytes([arg])
        elif kind == "delete" and b:
            del b[i % len(b)]
        elif kind == "repeat":
            b[i:i] = b[i:i + arg]
    return bytes(b)


@FUZZ
@given(batches(), st.lists(MUTATION, min_size=1, max_size=4), st.booleans())
def test_mutated_batches_parse_as_protobuf_does_or_are_refused(batch, mutations, plugin_encoder):
    raw = encodings(batch)[1 if plugin_encoder else 0]
    check_parse(mutate(raw, mutations))


@FUZZ
@given(st.one_of(
    st.builds(lambda m, d, e, layers: pb.PluginMessage(hello=pb.Hello(model_name=m, d_model=d, engine=e, available_layers=layers)),
              st.text(max_size=20), st.integers(0, 2**32 - 1), st.text(max_size=20), st.lists(st.integers(0, 2**32 - 1), max_size=5)),
    st.builds(lambda r, meta: pb.PluginMessage(request_start=pb.RequestStart(request_id=r, metadata=meta)),
              st.text(max_size=20), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)),
    st.builds(lambda r: pb.PluginMessage(request_finish=pb.RequestFinish(request_id=r)), st.text(max_size=20)),
    st.builds(lambda n: pb.PluginMessage(stats=pb.PluginStats(batches_sent=n)), U64),
), st.lists(MUTATION, max_size=3))
def test_other_messages_and_their_mutations_parse_as_protobuf_does(msg, mutations):
    raw = msg.SerializeToString()
    assert check_parse(raw) == msg
    check_parse(mutate(raw, mutations))
