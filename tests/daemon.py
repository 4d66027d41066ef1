"""Run the real daemon as a subprocess and wait on what it logs, never on the clock."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.env = {**os.environ, **(env or {})}
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    # ---- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = 60) -> Daemon:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router", *self.args], cwd=REPO, env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, name="daemon-log", daemon=True)
        self._reader.start()
        self.wait_for_log(r"Uvicorn running on", timeout)
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("daemon did not exit within the timeout after SIGTERM") from None
        if self._reader is not None:
            self._reader.join(10)
        return code

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()

    # ---- observation --------------------------------------------------------

    def wait_for_log(self, pattern: str, timeout: float = 30, start: int = 0) -> re.Match[str]:
        """Block until a log line from index `start` on matches `pattern`."""
        regex = re.compile(pattern)
        seen = start
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = regex.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                exited = self.proc is not None and self.proc.poll() is not None
                if exited and (self._reader is None or not self._reader.is_alive()):
                    raise AssertionError(f"daemon exited before logging {pattern!r}:\n" + self.log())
                if not self._cond.wait(timeout):
                    raise AssertionError(f"no log line matched {pattern!r} within {timeout} s:\n"
                                         + self.log())

    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines[-60:])

    def mark(self) -> int:
        """Index to pass as `start` to only look at lines logged from now on."""
        with self._cond:
            return len(self.lines)

    # ---- HTTP helpers ---------------------------------------------------------

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)  # type: ignore[arg-type]

    def models(self, **headers: str) -> dict[str, dict[str, object]]:
        with self.client() as c:
            r = c.get("/models", headers=headers)
            r.raise_for_status()
            return {m["id"]: m for m in r.json()["data"]}

    def load(self, model: str, **headers: str) -> dict[str, object]:
        with self.client() as c:
            r = c.post("/models/load", json={"model": model, "wait": True}, headers=headers)
            assert r.status_code == 200, r.text
            return r.json()["model"]  # type: ignore[no-any-return]
