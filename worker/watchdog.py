"""Exit when the router is gone.

The router holds the write end of a pipe whose read end only the worker has.
When the router process dies, by any signal, the kernel closes its end and our
blocking read returns EOF at once. Polling `getppid()` would miss a router that
was re-parented or whose pid was reused; the pipe cannot.
"""

from __future__ import annotations

import logging
import os
import threading
from multiprocessing.connection import Connection

log = logging.getLogger("modelherd.worker.watchdog")

EXIT_ORPHANED = 75


def start(lifeline: Connection) -> threading.Thread:
    thread = threading.Thread(target=_watch, args=(lifeline,), name="watchdog", daemon=True)
    thread.start()
    return thread


def _watch(lifeline: Connection) -> None:
    try:
        while True:
            lifeline.recv_bytes()  # the router never writes; this returns only on EOF
    except (EOFError, OSError):
        pass
    log.warning("router is gone; worker exiting")
    # Hard exit: the generation thread may be inside llama.cpp and cannot be joined.
    os._exit(EXIT_ORPHANED)
