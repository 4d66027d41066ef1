"""How every bench script runs: in a scratch directory removed afterwards, with SIGTERM
and Ctrl-C unwinding through the context managers that stop the servers it started,
so nothing outlives an interrupted run."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import FrameType


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def run_bench(run: Callable[[argparse.Namespace, Path], int], args: argparse.Namespace) -> int:
    """`run(args, work)`, `work` being the scratch directory (generated models, configs)."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        with tempfile.TemporaryDirectory(prefix="modelherd-bench-") as work:
            return run(args, Path(work))
    except KeyboardInterrupt:  # the servers are already stopped: the context managers unwound
        print("interrupted", file=sys.stderr)
        return 130
