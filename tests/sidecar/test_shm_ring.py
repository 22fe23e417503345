"""The shared-memory ring (monitor/protocol/shm_ring.py): ownership, seqlock detection of torn and
overwritten slots, drop when full, attach checks, and a property test against a model of the ring."""

from __future__ import annotations

import gc
import os
import stat

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.protocol.shm_ring import (
    RingError,
    RingReader,
    RingWriter,
    SlotRejected,
    remove_stale,
)


@pytest.fixture
def ring(tmp_path):
    reader = RingReader.create(tmp_path, 4, 256)
    g = reader.geometry
    writer = RingWriter.attach(g.path, g.n_slots, g.slot_bytes, g.nonce)
    yield reader, writer
    reader.close()
    writer.detach()


def write(writer: RingWriter, step: int, payload: bytes):
    got = writer.acquire(len(payload))
    if got is None:
        return None
    slot, seq, view = got
    view[:] = np.frombuffer(payload, dtype=np.uint8)
    writer.publish(slot, seq, step, len(payload))
    return slot, seq


def test_segment_is_private_and_unlinked_on_close(tmp_path):
    reader = RingReader.create(tmp_path, 2, 64)
    mode = stat.S_IMODE(os.stat(reader.path).st_mode)
    assert mode == 0o600
    reader.close()
    assert not reader.path.exists()


def test_payload_round_trip_without_copy_and_release_when_views_are_gone(ring):
    reader, writer = ring
    x = np.arange(16, dtype=np.float32)
    slot, seq = write(writer, 7, x.tobytes())
    view = reader.take(slot, seq, 7, x.nbytes)
    t = torch.frombuffer(view, dtype=torch.float32)
    assert torch.equal(t, torch.from_numpy(x))
    assert writer.free_slots() == 3
    del view
    gc.collect()
    assert writer.free_slots() == 3  # the tensor still reads the slot
    row = t[2:5]
    del t
    assert writer.free_slots() == 3  # a view of the tensor too
    del row
    assert writer.free_slots() == 4
    assert reader.released == 1


def test_full_ring_drops_and_counts_without_waiting(ring):
    reader, writer = ring
    descs = [write(writer, i, b"\1" * 8) for i in range(4)]
    assert all(descs)
    assert write(writer, 4, b"\1" * 8) is None
    assert writer.full == 1
    held = reader.take(*descs[0], 0, 8)
    assert write(writer, 5, b"\1" * 8) is None  # taken is not freed
    del held
    assert write(writer, 6, b"\2" * 8) is not None
    assert writer.full == 2


def test_a_step_larger_than_a_slot_is_not_written(ring):
    _, writer = ring
    assert writer.acquire(257) is None
    assert writer.full == 0  # not a full ring: the caller sends it as bytes


def test_torn_slot_is_rejected(ring):
    reader, writer = ring
    slot, seq, view = writer.acquire(8)
    view[:] = 1  # the writer dies before publish: seq_end never written
    with pytest.raises(SlotRejected) as e:
        reader.take(slot, seq, 0, 8)
    assert e.value.reason == "shm_torn"


def test_overwritten_slot_is_rejected(ring):
    reader, writer = ring
    first = write(writer, 1, b"a" * 8)
    view = reader.take(*first, 1, 8)
    del view  # released
    for step in range(2, 6):  # round the ring: slot 0 is written again
        write(writer, step, b"b" * 8)
    with pytest.raises(SlotRejected) as e:
        reader.take(*first, 1, 8)
    assert e.value.reason == "shm_overwritten"


def test_a_descriptor_taken_twice_is_rejected(ring):
    reader, writer = ring
    d = write(writer, 1, b"a" * 8)
    view = reader.take(*d, 1, 8)
    with pytest.raises(SlotRejected) as e:
        reader.take(*d, 1, 8)
    assert e.value.reason == "shm_torn"
    del view


@pytest.mark.parametrize("slot,nbytes,step", [(4, 8, 1), (-1, 8, 1), (0, 257, 1), (0, 16, 1), (0, 8, 2)])
def test_out_of_range_or_mismatched_descriptors_are_malformed(ring, slot, nbytes, step):
    reader, writer = ring
    s, seq = write(writer, 1, b"a" * 8)
    with pytest.raises(SlotRejected) as e:
        reader.take(slot, seq, step, nbytes)
    assert e.value.reason == "malformed"


def test_a_slot_rewritten_while_held_is_counted_not_freed(ring):
    reader, writer = ring
    s, seq = write(writer, 1, b"a" * 8)
    view = reader.take(s, seq, 1, 8)
    writer._seg.headers[s][0] = seq + 100  # a writer that broke the protocol
    del view
    assert reader.overwritten_in_use == 1 and reader.released == 0


def test_attach_refuses_wrong_nonce_mode_owner_or_size(tmp_path):
    reader = RingReader.create(tmp_path, 2, 64)
    g = reader.geometry
    with pytest.raises(RingError, match="header"):
        RingWriter.attach(g.path, g.n_slots, g.slot_bytes, b"x" * 16)
    with pytest.raises(RingError, match="bytes"):
        RingWriter.attach(g.path, 3, g.slot_bytes, g.nonce)
    os.chmod(g.path, 0o644)
    with pytest.raises(RingError, match="mode"):
        RingWriter.attach(g.path, g.n_slots, g.slot_bytes, g.nonce)
    with pytest.raises(RingError, match="cannot open"):
        RingWriter.attach(str(tmp_path / "missing.ring"), 2, 64, g.nonce)
    link = tmp_path / "link.ring"
    link.symlink_to(g.path)
    with pytest.raises(RingError):
        RingWriter.attach(str(link), g.n_slots, g.slot_bytes, g.nonce)
    reader.close()


def test_remove_stale_unlinks_only_dead_sidecars_rings_and_lanes(tmp_path):
    live = RingReader.create(tmp_path, 1, 64)
    dead = tmp_path / "featurewatch-ring-999999999-0123456789abcdef.ring"
    dead.write_bytes(b"")
    dead_lane = dead.with_suffix(".lane")
    dead_lane.write_bytes(b"")
    other = tmp_path / "unrelated.ring"
    other.write_bytes(b"")
    assert sorted(remove_stale(tmp_path)) == sorted([dead.name, dead_lane.name])
    assert live.path.exists() and other.exists() and not dead.exists() and not dead_lane.exists()
    live.close()


def test_reader_closed_rejects_and_late_release_is_harmless(ring):
    reader, writer = ring
    d = write(writer, 1, b"a" * 8)
    view = reader.take(*d, 1, 8)
    reader.close()
    del view  # released after close: nothing to free, nothing raised
    with pytest.raises(SlotRejected) as e:
        reader.take(*d, 1, 8)
    assert e.value.reason == "shm_closed"


OPS = st.lists(st.one_of(st.tuples(st.just("write"), st.integers(1, 256)),
                         st.tuples(st.just("take"), st.integers(0, 20)),
                         st.tuples(st.just("drop"), st.integers(0, 20)),
                         st.tuples(st.just("stale"), st.integers(0, 20))), max_size=60)


@settings(max_examples=60, deadline=None)
@given(OPS)
def test_ring_matches_its_model(tmp_path_factory, ops):
    """Whatever the interleaving: a published slot reads back exactly what was written; a full ring
    (every slot written or held) refuses a write; a descriptor is readable once, and a stale one
    (its slot since rewritten) is always rejected as overwritten."""
    reader = RingReader.create(tmp_path_factory.mktemp("ring"), 3, 256)
    g = reader.geometry
    writer = RingWriter.attach(g.path, g.n_slots, g.slot_bytes, g.nonce)
    published: list[tuple] = []  # (slot, seq, step, payload) not yet taken
    held: list[tuple] = []  # (view, payload)
    spent: list[tuple] = []  # descriptors taken and since released
    busy = 0
    step = 0
    try:
        for op, arg in ops:
            if op == "write":
                step += 1
                payload = bytes((step + i) % 256 for i in range(arg))
                d = write(writer, step, payload)
                assert (d is None) == (busy == 3)
                if d is not None:
                    busy += 1
                    published.append((*d, step, payload))
            elif op == "take" and published:
                slot, seq, s, payload = published.pop(arg % len(published))
                view = reader.take(slot, seq, s, len(payload))
                assert view.tobytes() == payload
                held.append(((slot, seq, s, len(payload)), view, payload))
            elif op == "drop" and held:
                desc, view, payload = held.pop(arg % len(held))
                assert view.tobytes() == payload  # nobody wrote it while held
                del view
                busy -= 1
                spent.append(desc)
            elif op == "stale" and spent:
                slot, seq, s, n = spent[arg % len(spent)]
                with pytest.raises(SlotRejected) as e:
                    reader.take(slot, seq, s, n)
                assert e.value.reason in ("shm_overwritten", "shm_torn")
        assert writer.free_slots() == 3 - busy
    finally:
        held.clear()
        reader.close()
        writer.detach()
