"""One logging configuration for the daemon: ours, uvicorn's and the workers' lines alike.

`config()` is a dictConfig that the CLI applies at start and hands to uvicorn (`log_config=`,
which applies it again: the same config, so nothing changes). Every line goes to stderr.
Under systemd (stderr is the journal: `$JOURNAL_STREAM` names its device and inode) a line
is `<N>logger: message`: the journal adds the time and files the line at priority N, so
`journalctl -p warning` works. Elsewhere it is `time LEVEL logger: message`. Worker lines
arrive through router.supervisor, at the level the worker logged them, as `[model] ...`.

The access log is a request observer (router.requestlog): one line per request at info,
with the key's name, never the key. uvicorn's own access log stays off.
"""

from __future__ import annotations

import logging
import logging.config
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from protocol.loglines import PriorityFormatter

if TYPE_CHECKING:  # the CLI imports this module before it needs Starlette
    from router.requestlog import RequestFacts

access_log = logging.getLogger("modelherd.access")

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"


def journal_stream(env: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """Whether `fd` is the journal's stream. systemd sets JOURNAL_STREAM=DEV:INODE for the
    stream it connects; a process whose stderr was redirected since (a shell started from a
    service, a pipe) inherits the variable but not the stream, so both must match."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def config(level: str, journal: bool | None = None) -> dict[str, Any]:
    """The dictConfig: one stderr handler on the root logger, uvicorn's loggers propagating
    to it. `journal`: the journal's format (default: when stderr is the journal)."""
    journal = journal_stream() if journal is None else journal
    formatter: dict[str, Any] = (
        {"()": PriorityFormatter, "format": JOURNAL_FORMAT} if journal else {"format": PLAIN_FORMAT})
    return {
        "version": 1,
        # Loggers made at import time (every module's `log`) must keep working.
        "disable_existing_loggers": False,
        "formatters": {"modelherd": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "modelherd",
                                "stream": "ext://sys.stderr"}},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {name: {"handlers": [], "propagate": True, "level": level.upper()}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }


def configure(level: str) -> dict[str, Any]:
    """Apply config(level) now (lines logged before uvicorn starts share the format); the
    same dict goes to uvicorn."""
    settings = config(level)
    logging.config.dictConfig(settings)
    return settings


def log_access(facts: RequestFacts) -> None:
    """A request observer: `METHOD path status model=... tokens=P+C 0.123s key=NAME`."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    access_log.info("%s %s %s model=%s tokens=%d+%d %.3fs key=%s", facts.method, facts.path,
                    facts.status or "-", facts.model or "-", facts.prompt_tokens,
                    facts.completion_tokens, facts.duration, facts.key_name or "-")
