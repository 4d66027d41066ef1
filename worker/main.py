"""Worker entry point, the target the router starts with multiprocess's spawn context."""

from __future__ import annotations

import logging
import os
import sys
from multiprocessing.connection import Connection

import zmq

from worker import watchdog
from worker.link import Link


def run(endpoint: str, worker_id: str, lifeline: Connection, log_pipe: Connection,
        log_level: str) -> None:
    # Own process group: the router's shutdown ladder signals the whole group, and
    # a Ctrl-C meant for the daemon in a terminal does not reach workers directly.
    os.setsid()
    _route_output(log_pipe)
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    watchdog.start(lifeline)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        code = Link(ctx, endpoint, worker_id).serve()
    finally:
        ctx.term()
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def _route_output(log_pipe: Connection) -> None:
    """Send fds 1 and 2 (Python's and llama.cpp's C-level output) to the router's log."""
    fd = log_pipe.fileno()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
