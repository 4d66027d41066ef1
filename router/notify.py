"""Telling systemd how the daemon is (`Type=notify`): READY, RELOADING, STOPPING, STATUS and
the watchdog's WATCHDOG=1.

The protocol is written out here rather than taken from a library: it is one datagram of
`KEY=value` lines to the AF_UNIX socket named by $NOTIFY_SOCKET (a leading `@` is the
abstract namespace), and python-systemd needs libsystemd's headers and a compiler to
install. Without $NOTIFY_SOCKET every call does nothing, so the daemon runs the same
outside systemd.

`Notifier` only sends; `Announcer` owns the two tasks that keep systemd told, both on the
event loop itself: WATCHDOG=1 at half of $WATCHDOG_USEC (a loop that is wedged stops
sending, and systemd restarts the service), and STATUS= whenever the text changes,
checked every few seconds rather than on each request or token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("modelherd.notify")

STATUS_EVERY_S = 2.0
# How long READY, RELOADING or STOPPING may wait for room in the manager's queue. WATCHDOG
# and STATUS never wait: the next one comes soon, and the event loop must not stall.
STATE_SEND_WAIT_S = 0.5


class Notifier:
    """Sends sd_notify datagrams to $NOTIFY_SOCKET; a no-op when it is not set."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = _watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str, wait: bool = False) -> bool:
        """One datagram of `KEY=value` fields; False when it could not be sent (logged once:
        the daemon goes on either way). `wait`: for room in a full queue, a little while."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # not inherited (PEP 446)
                self._sock.settimeout(None)  # blocking: SO_SNDTIMEO bounds the wait, not Python
                usec = int(STATE_SEND_WAIT_S * 1e6)
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                                      struct.pack("ll", usec // 1_000_000, usec % 1_000_000))
            flags = 0 if wait else socket.MSG_DONTWAIT
            self._sock.sendto("\n".join(fields).encode(), flags, self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify systemd at %s: %s", _shown(self.address), exc.strerror or exc)
            self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={_one_line(status)}", wait=True)

    def reloading(self) -> None:
        # MONOTONIC_USEC: when the reload began (CLOCK_MONOTONIC); Type=notify-reload needs it.
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
                  "STATUS=reloading the configuration", wait=True)

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={_one_line(status)}", wait=True)

    def status(self, status: str) -> None:
        self.send(f"STATUS={_one_line(status)}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Announcer:
    """The watchdog and status tasks of one Notifier; `status` says how the daemon is now."""

    def __init__(self, notifier: Notifier, status: Callable[[], str],
                 status_every: float = STATUS_EVERY_S) -> None:
        self._notifier = notifier
        self._status = status
        self._every = status_every
        self._last = ""
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Send READY=1 and start the tasks; called once the port answers."""
        if not self._notifier.enabled or self._tasks:
            return
        self._last = self._status()
        self._notifier.ready(self._last)
        interval = self._notifier.watchdog_interval
        if interval is not None:
            self._tasks.append(asyncio.create_task(self._keep_alive(interval / 2), name="sd-watchdog"))
        self._tasks.append(asyncio.create_task(self._report(), name="sd-status"))

    def said(self, status: str) -> None:
        """A status sent by someone else (a reload, the drain): not sent again unless it changes."""
        self._last = status

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._notifier.close()

    async def _keep_alive(self, every: float) -> None:
        while True:
            self._notifier.watchdog()
            await asyncio.sleep(every)

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(self._every)
            try:
                text = self._status()
            except Exception:  # a bug in the status must not end the reports (or the close)
                log.exception("cannot tell systemd the status")
                continue
            if text != self._last:
                self._last = text
                self._notifier.status(text)


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):  # the abstract namespace: a name, not a file
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    if value:  # e.g. vsock: (systemd 254+, for VMs): not for a daemon like this one
        log.warning("NOTIFY_SOCKET=%s is not a unix socket; not notifying systemd", value)
    return None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """$WATCHDOG_USEC in seconds, when it is meant for this process ($WATCHDOG_PID, if set)."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6


def _shown(address: str | bytes) -> str:
    return "@" + address[1:].decode(errors="replace") if isinstance(address, bytes) else address


def _one_line(text: str) -> str:
    return " ".join(text.split())
