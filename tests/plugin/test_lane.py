"""The plugin's end of the lane (monitor/plugin/lane.py) against the sidecar's (monitor/receive/lane.py),
in process: it connects only to a private socket of this user, at any path length; a send never
waits (a sidecar that does not read makes it fail "full", a closed one "gone", a packet larger
than the socket takes "too_large"); packets arrive whole and in order; one larger than the
sidecar takes is cut short and reported, and the next one still arrives."""

from __future__ import annotations

import os
import select
import socket

import pytest

from monitor.plugin import lane as plugin_lane
from monitor.plugin.lane import FULL, GONE, TOO_LARGE, LaneSender
from monitor.receive import lane as sidecar_lane
from monitor.receive.lane import LaneError, LaneReader


def ring_path(directory) -> str:
    return str(directory / "featurewatch-ring-1-0123456789abcdef.ring")


def received(reader: LaneReader, n: int) -> list:
    out: list = []
    while len(out) < n:
        select.select([reader.fileno()], [], [], 5.0)
        got = list(reader.receive())
        assert got, "nothing arrived"
        out += got
    return out


def test_packets_arrive_whole_and_in_order_and_the_lane_file_goes_once_accepted(tmp_path):
    reader = LaneReader.create(ring_path(tmp_path))
    assert oct(os.lstat(reader.path).st_mode & 0o777) == "0o600"
    sender = LaneSender.connect(str(reader.path))
    packets = [bytes([i]) * (1 + 1000 * i) for i in range(20)]
    for p in packets:
        assert sender.send(p) is None
    reader.accept()
    assert not reader.path.exists()  # nobody else can connect
    assert received(reader, len(packets)) == packets
    with pytest.raises(LaneError):
        reader.accept()  # one connection per lane
    sender.close()
    select.select([reader.fileno()], [], [], 5.0)
    assert list(reader.receive()) == [] and reader.closed  # the plugin's end closed: end of lane
    reader.close()


def test_a_send_never_waits_full_then_gone(tmp_path, monkeypatch):
    monkeypatch.setattr(plugin_lane, "SEND_BUFFER", 64 * 1024)
    reader = LaneReader.create(ring_path(tmp_path))
    sender = LaneSender.connect(str(reader.path))
    reader.accept()  # and never reads: a hung sidecar
    results = [sender.send(b"x" * 1000) for _ in range(2000)]  # far more than 64 KiB
    assert FULL in results and results[0] is None
    first_full = results.index(FULL)
    assert set(results[first_full:]) == {FULL}
    reader.close()  # the sidecar's end goes away
    assert sender.send(b"x") == GONE
    sender.close()


def test_a_packet_larger_than_the_socket_takes_is_refused_at_the_sender(tmp_path, monkeypatch):
    monkeypatch.setattr(plugin_lane, "SEND_BUFFER", 64 * 1024)
    reader = LaneReader.create(ring_path(tmp_path))
    sender = LaneSender.connect(str(reader.path))
    reader.accept()
    assert sender.send(b"x" * (8 << 20)) == TOO_LARGE
    assert sender.send(b"ok") is None
    assert received(reader, 1) == [b"ok"]
    reader.close()
    sender.close()


def test_a_packet_over_the_sidecars_limit_is_reported_and_the_next_arrives(tmp_path, monkeypatch):
    monkeypatch.setattr(sidecar_lane, "MAX_PACKET", 1024)
    reader = LaneReader.create(ring_path(tmp_path))
    sender = LaneSender.connect(str(reader.path))
    reader.accept()
    assert sender.send(b"y" * 5000) is None and sender.send(b"small") is None
    assert received(reader, 2) == [None, b"small"]
    reader.close()
    sender.close()


def test_connect_refuses_what_is_not_a_private_socket_of_this_user(tmp_path):
    plain = tmp_path / "plain.lane"
    plain.write_bytes(b"")
    os.chmod(plain, 0o600)
    with pytest.raises(OSError, match="not a socket"):
        LaneSender.connect(str(plain))
    reader = LaneReader.create(ring_path(tmp_path))
    os.chmod(reader.path, 0o666)
    with pytest.raises(OSError, match="mode 666"):
        LaneSender.connect(str(reader.path))
    reader.close()
    with pytest.raises(OSError):
        LaneSender.connect(str(tmp_path / "missing.lane"))


def test_a_directory_past_the_unix_address_limit_still_works(tmp_path):
    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    path = ring_path(deep)
    assert len(path) > 107
    reader = LaneReader.create(path)
    assert reader.path.exists()
    sender = LaneSender.connect(str(reader.path))
    reader.accept()
    assert sender.send(b"deep") is None
    assert received(reader, 1) == [b"deep"]
    reader.close()
    sender.close()


def test_only_one_connection_is_accepted(tmp_path):
    reader = LaneReader.create(ring_path(tmp_path))
    first = LaneSender.connect(str(reader.path))
    reader.accept()
    with pytest.raises(OSError):  # the file is gone: a second process cannot connect
        LaneSender.connect(str(reader.path))
    stray = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with pytest.raises(OSError):
        stray.connect(str(reader.path))
    stray.close()
    first.close()
    reader.close()
