"""Rungs of the stop ladder that the end-to-end tests cannot hit on cue."""

from __future__ import annotations

import signal
import subprocess
import sys
from types import SimpleNamespace

from router.supervisor import WorkerProcess


def test_signal_reaches_a_worker_stopped_before_it_became_a_group_leader() -> None:
    # A child that has not called setsid() yet: there is no process group with its pid,
    # so killpg fails; the ladder must still signal the process itself.
    # The child just blocks reading stdin until it is signalled.
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        worker = WorkerProcess.__new__(WorkerProcess)
        worker._proc = SimpleNamespace(pid=child.pid)  # type: ignore[assignment]
        worker._signal_group(signal.SIGTERM)
        assert child.wait(10) == -signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        assert child.stdin is not None
        child.stdin.close()
