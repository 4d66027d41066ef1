"""Worker entry point, the target the router starts with multiprocess's spawn context."""

from __future__ import annotations

import logging
import os
import sys
import threading
from multiprocessing.connection import Connection

import zmq

from protocol.loglines import WorkerFormatter
from worker import watchdog
from worker.link import Link


def run(endpoint: str, worker_id: str, lifeline: Connection, log_pipe: Connection,
        log_level: str) -> None:
    # Own process group: the router's shutdown ladder signals the whole group, and
    # a Ctrl-C meant for the daemon in a terminal does not reach workers directly.
    os.setsid()
    _route_output(log_pipe)
    _configure_logging(log_level)
    watchdog.start(lifeline)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        code = Link(ctx, endpoint, worker_id).serve()
    except Exception:
        # Logged rather than printed by multiprocessing: the router files it as an error.
        logging.getLogger("modelherd.worker").exception("worker failed")
        code = 1
    finally:
        ctx.term()
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def _configure_logging(log_level: str) -> None:
    """Every line as `<N>logger: message` (protocol.loglines): the router logs it again at
    its own level, with the model's name. Warnings and a thread's uncaught exception go
    through logging too, so they keep their level instead of arriving as bare text."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(WorkerFormatter("%(message)s"))
    logging.basicConfig(level=log_level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)

    def thread_failed(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        logging.getLogger("modelherd.worker").error("thread %s failed", name, exc_info=args.exc_value)

    threading.excepthook = thread_failed


def _route_output(log_pipe: Connection) -> None:
    """Send fds 1 and 2 (Python's and llama.cpp's C-level output) to the router's log."""
    fd = log_pipe.fileno()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
