"""CLI commands facing an unreachable store fail with one line, never a traceback."""

import socket
import subprocess
import sys


def closed_port() -> int:
    with socket.socket() as s:  # bound and closed: nothing listens there afterwards
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_alerts_tail_from_redis_that_is_down_is_one_line_without_the_password():
    url = f"redis://user:hunter2@127.0.0.1:{closed_port()}/0"
    proc = subprocess.run([sys.executable, "-m", "monitor.cli", "alerts", "tail", "--redis", url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "cannot read the event stream" in proc.stderr and "hunter2" not in proc.stderr + proc.stdout
