"""A sandbox component killed a moment ago still holds its port until its last thread is gone.

The case behind the flaky API-server restart: a killed Go server's main thread is a zombie
while its other threads still exit and hold the listener. The sandbox must see such a
process as not gone yet and wait for its port, not move the component to another port.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from argosy_sandbox.cluster import _has_exited, _is_zombie, _port_released, free_port, port_is_free

# Listens on the port, starts a thread that keeps running, then ends only the main thread
# (pthread_exit): the process lives on with a zombie main thread and an open listener.
HALF_EXITED = """
import ctypes, socket, sys, threading, time
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen()
threading.Thread(target=time.sleep, args=(600,)).start()
print("listening", flush=True)
ctypes.CDLL(None).pthread_exit(None)
"""


def _wait(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_process_whose_main_thread_exited_still_holds_its_port_and_is_not_gone() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", HALF_EXITED, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        stat = Path(f"/proc/{proc.pid}/stat")
        assert _wait(lambda: _is_zombie(stat.read_text())), "the main thread did not exit"
        # What the sandbox used to take for "gone": a zombie main thread. The port is still taken.
        assert not _has_exited(proc.pid)
        assert not port_is_free(port)
        assert not _port_released(port, 0.5)
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # still accepting connections into its backlog
    finally:
        proc.send_signal(signal.SIGKILL)
    assert _wait(lambda: _has_exited(proc.pid))
    assert _port_released(port, 10.0)
    proc.wait(timeout=10)
    assert _has_exited(proc.pid)
