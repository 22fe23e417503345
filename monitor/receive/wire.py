"""Read a PluginMessage off the wire without copying its activation bytes.

gRPC hands the ingest servicer each message as one ``bytes`` object. A plain protobuf parse copies
the activations into the message, and every read of ``Tensor.data`` copies them again: two copies
of 2.3 MB per 256-token step at d=2304, on the event loop thread that also receives. Here only the
small fields go through protobuf; the activations stay a ``memoryview`` on the received bytes.

Anything unusual (a field repeated, an unexpected wire type, a truncated record) takes the plain
protobuf path, so a message always means exactly what protobuf says it means.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from monitor.protocol import pb

_LEN = 2
# Field numbers on the activation path (proto/featurewatch/v1/featurewatch.proto).
_PLUGIN_BATCH = pb.PluginMessage.DESCRIPTOR.fields_by_name["batch"].number
_BATCH_ACTIVATIONS = pb.ActivationBatch.DESCRIPTOR.fields_by_name["activations"].number
_TENSOR_DATA = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number


class _Irregular(Exception):
    """The fast path does not apply; parse the whole message with protobuf."""


def _varint(buf: memoryview, i: int, end: int) -> tuple[int, int]:
    shift = value = 0
    while i < end:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            break
    raise _Irregular


def _records(buf: memoryview, start: int, end: int):
    """(field number, wire type, record start, value start, value end) for each field in [start, end)."""
    i = start
    while i < end:
        record = i
        key, i = _varint(buf, i, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(buf, i, end)
            value = i
        elif wire == 1:
            value, i = i, i + 8
        elif wire == _LEN:
            n, value = _varint(buf, i, end)
            i = value + n
        elif wire == 5:
            value, i = i, i + 4
        else:  # groups are not used by this protocol
            raise _Irregular
        if i > end:
            raise _Irregular
        yield field, wire, record, value, i


def _split(buf: memoryview, start: int, end: int, field: int) -> tuple[bytes, int, int]:
    """The other records of a message joined (protobuf accepts fields in any order) and the value
    range of ``field``, which must occur exactly once, length-delimited."""
    rest, found = [], None
    for number, wire, record, value, stop in _records(buf, start, end):
        if number == field:
            if found is not None or wire != _LEN:
                raise _Irregular
            found = (value, stop)
        else:
            rest.append(buf[record:stop])
    if found is None:
        raise _Irregular
    return b"".join(rest), found[0], found[1]


def parse_plugin_message(raw: bytes) -> tuple[pb.PluginMessage, memoryview | None]:
    """``(message, activation bytes)``; for a batch the message's ``activations.data`` is left empty
    and the bytes are a view on ``raw``. Other kinds (and irregular batches) come back fully
    parsed, with ``None``. Raises ``google.protobuf.message.DecodeError`` for a malformed message."""
    buf = memoryview(raw)
    try:
        top, b0, b1 = _split(buf, 0, len(buf), _PLUGIN_BATCH)
        if top:
            raise _Irregular  # another top-level field next to the batch: let protobuf decide
        meta, t0, t1 = _split(buf, b0, b1, _BATCH_ACTIVATIONS)
        head, d0, d1 = _split(buf, t0, t1, _TENSOR_DATA)
        batch = pb.ActivationBatch.FromString(meta)
        batch.activations.MergeFromString(head)
        return pb.PluginMessage(batch=batch), buf[d0:d1]
    except _Irregular:
        return pb.PluginMessage.FromString(raw), None


__all__ = ["DecodeError", "parse_plugin_message"]
