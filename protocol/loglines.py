"""How a log line carries its level as text: a syslog priority prefix, `<3>` for an error.

Two readers use it. The journal (`SyslogLevelPrefix=`, on by default) files a line that
starts with `<N>` at priority N, so `journalctl -p err` works. The router reads its
workers' output through a pipe: a worker writes every line as `<N>logger: message`, so
the router can log it again under the same logger at the same level (a worker's ERROR
stays an ERROR). Lines of a multi-line record (a traceback) each carry the prefix.
"""

from __future__ import annotations

import logging
import re

# logging level -> syslog priority (RFC 5424: 2 critical, 3 error, 4 warning, 6 info, 7 debug)
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_LEVELS = {0: logging.CRITICAL, 1: logging.CRITICAL, 2: logging.CRITICAL, 3: logging.ERROR,
           4: logging.WARNING, 5: logging.INFO, 6: logging.INFO, 7: logging.DEBUG}
_WORKER_LINE = re.compile(r"<([0-7])>([^\s:<>]+):(?: (.*))?", re.DOTALL)


def priority(level: int) -> int:
    """The syslog priority of a logging level (a level between two counts as the lower one)."""
    for threshold, prio in _PRIORITIES:
        if level >= threshold:
            return prio
    return 7


class PriorityFormatter(logging.Formatter):
    """`<N>` before every line of a record, a traceback's included: a reader that splits on
    newlines files each line at the record's priority, not just the first."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


class WorkerFormatter(logging.Formatter):
    """A worker's lines for the router: `<N>logger: ` before every line of the message."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>{record.name}: "
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def parse(line: str) -> tuple[int | None, str, str]:
    """(logging level, logger, message) of a worker's line; (None, "", line) for a line
    written some other way (a print, C code writing to fd 2)."""
    m = _WORKER_LINE.fullmatch(line)
    if m is None:
        return None, "", line
    return _LEVELS[int(m.group(1))], m.group(2), m.group(3) or ""
