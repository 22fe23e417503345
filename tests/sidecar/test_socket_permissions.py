"""The sidecar's Unix socket is never connectable by others, not even between bind and chmod."""

import asyncio
import os
import stat

import grpc

from monitor.sidecar import Sidecar


def test_unix_socket_is_created_0600_before_the_server_starts(tmp_path):
    path = tmp_path / "fw.sock"
    old = os.umask(0o000)  # the most permissive umask a process could inherit
    try:
        async def bind_only():
            server = grpc.aio.server()
            Sidecar._bind(server, f"unix:{path}")
            mode = stat.S_IMODE(os.stat(path).st_mode)
            await server.stop(0)
            return mode
        mode = asyncio.run(bind_only())
    finally:
        os.umask(old)
    assert mode == 0o600
    assert os.umask(old) == old  # the process umask is restored
