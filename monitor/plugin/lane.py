"""The plugin's end of a stream's lane (the sidecar's end, and why: monitor/receive/lane.py): the
forward thread sends each step's descriptor, and each RequestStart and RequestFinish, as one
packet on a Unix seqpacket socket, instead of handing it to the sender thread for the gRPC stream.

``send`` never waits and never raises: a full socket buffer (the sidecar is behind or hung), a
sidecar gone, or a message too large for one packet is reported as a reason, and the caller drops
and counts the message, as it does when its queue is full.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from monitor.protocol.unix_address import unix_address

SEND_BUFFER = 4 << 20  # bytes in flight to the sidecar before sends fail "full" (capped by wmem_max)
FULL, GONE, TOO_LARGE = "full", "gone", "too_large"


class LaneSender:
    """A connected lane. ``send`` is called by the forward thread only; ``close`` by any thread."""

    def __init__(self, path: str, sock: socket.socket) -> None:
        self.path, self._sock = path, sock
        self.opened = False  # LaneOpen is queued on the stream: messages go here from now on
        self.sent = 0

    @classmethod
    def connect(cls, path: str) -> LaneSender:
        """Connect to the announced lane, only if it is a socket of this user that nobody else can
        open (as the ring: monitor/protocol/shm_ring.py). Raises OSError."""
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a socket")
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise OSError(errno.EPERM, f"{path}: owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o} "
                                       f"(want uid {os.getuid()}, mode 600)")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            except OSError:
                pass
            sock.settimeout(1.0)  # a listening sidecar accepts into its backlog at once
            with unix_address(path) as address:
                sock.connect(address)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return cls(path, sock)

    def send(self, data: bytes) -> str | None:
        """None when sent, else why not: FULL, GONE or TOO_LARGE."""
        try:
            self._sock.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return FULL
        except OSError as exc:
            return TOO_LARGE if exc.errno == errno.EMSGSIZE else GONE
        self.sent += 1
        return None

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass
