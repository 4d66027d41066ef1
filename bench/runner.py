"""How every bench script runs: SIGTERM and Ctrl-C unwind through the context
managers that stop the servers it started, so nothing outlives an interrupted run."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from types import FrameType


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def run_bench(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return run(args)
    except KeyboardInterrupt:  # the servers are already stopped: the context managers unwound
        print("interrupted", file=sys.stderr)
        return 130
