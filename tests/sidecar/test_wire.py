"""The zero-copy ingest parse must mean exactly what protobuf's own parse means."""

import random

import numpy as np
import pytest

from monitor.protocol import pb
from monitor.receive.wire import DecodeError, parse_plugin_message
from tests.support.plugin_client import PluginClient


def _batch_args(n=12, d=8, seed=0):
    x = np.random.default_rng(seed).standard_normal((2, n, d)).astype(np.float32)
    return (7, [1, 3], x, ["a", "b", "c"], [0, 1, 2] * (n // 3), list(range(n)), [True, False] * (n // 2))


def _protobuf_view(raw: bytes):
    """What protobuf makes of the bytes: (message without data, data) or DecodeError."""
    msg = pb.PluginMessage.FromString(raw)
    data = msg.batch.activations.data if msg.HasField("batch") else None
    if data is not None:
        msg.batch.activations.data = b""
    return msg, data


def _ours(raw: bytes):
    msg, data = parse_plugin_message(raw)
    if data is None and msg.HasField("batch"):  # the plain path: data is still in the message
        data = msg.batch.activations.data
        msg.batch.activations.data = b""
    return msg, (bytes(data) if data is not None else None)


@pytest.mark.parametrize("encode", [PluginClient.encoded_batch, lambda *a: PluginClient.batch(*a).SerializeToString()],
                         ids=["plugin-encoder", "protobuf-serializer"])
def test_batch_data_is_a_view_on_the_received_bytes(encode):
    args = _batch_args()
    raw = encode(*args)
    msg, data = parse_plugin_message(raw)
    assert data is not None and data.obj is raw  # no copy of the activations
    assert bytes(data) == args[2].tobytes()
    assert msg.batch.activations.data == b""
    assert list(msg.batch.activations.shape) == [2, 12, 8]
    assert _ours(raw) == _protobuf_view(raw)


def test_irregular_and_other_messages_take_the_protobuf_path():
    raw = PluginClient.encoded_batch(*_batch_args())
    merged = raw + PluginClient.encoded_batch(*_batch_args(seed=1))  # two batch records: protobuf merges them
    msg, data = parse_plugin_message(merged)
    assert data is None
    assert _ours(merged) == _protobuf_view(merged)
    hello = pb.PluginMessage(hello=pb.Hello(model_name="m", d_model=8)).SerializeToString()
    assert parse_plugin_message(hello) == (pb.PluginMessage.FromString(hello), None)
    assert parse_plugin_message(b"") == (pb.PluginMessage(), None)


def test_corrupted_bytes_parse_as_protobuf_does():
    """Random truncations and byte flips: both paths agree on the result or both reject it."""
    raw = PluginClient.encoded_batch(*_batch_args())
    rng = random.Random(0)
    agreed_errors = 0
    for trial in range(600):
        b = bytearray(raw)
        if trial % 3 == 0:
            b = b[: rng.randrange(len(b))]
        else:
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(min(len(b), 200))] = rng.randrange(256)  # the header, where structure lives
        b = bytes(b)
        try:
            expected = _protobuf_view(b)
        except DecodeError:
            with pytest.raises(DecodeError):
                _ours(b)
            agreed_errors += 1
            continue
        assert _ours(b) == expected, f"trial {trial}"
    assert agreed_errors > 50  # the corruptions did exercise the error path
