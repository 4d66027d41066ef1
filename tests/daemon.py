"""Run the real daemon as a subprocess and wait on what it logs, never on the clock."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil

# Token ids 0 and 2 are <|endoftext|> and <|im_end|> in the tiny vocabulary: biasing
# them away makes a random model generate exactly max_tokens.
NO_EOS = {"0": -100, "2": -100}

REPO = Path(__file__).resolve().parent.parent


# Set by systemd; they would take precedence over the test's XDG dirs, or have the daemon
# talk to the service manager of whatever runs the tests.
_SCRUBBED = ("RUNTIME_DIRECTORY", "STATE_DIRECTORY", "CACHE_DIRECTORY", "CREDENTIALS_DIRECTORY",
             "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")


class Daemon:
    def __init__(self, *args: str, env: dict[str, str] | None = None, journal: bool = False) -> None:
        # Port 0: the kernel picks a free port at bind time (no window for another
        # process to take it); the real one is read from uvicorn's startup line.
        self.port = 0
        self.url = ""
        self.args = ["serve", "--host", "127.0.0.1", "--port", "0", *args]
        base = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
        self.env = {**base, **(env or {})}
        # Output to a pipe that JOURNAL_STREAM names, as systemd names the journal's stream.
        self.journal = journal
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    # ---- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = 60) -> Daemon:
        env, out = self.env, subprocess.PIPE
        if self.journal:
            read_end, out = os.pipe()
            st = os.fstat(out)
            env = {**env, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router", *self.args], cwd=REPO, env=env,
            stdout=out, stderr=subprocess.STDOUT, text=True, bufsize=1,
        )
        if self.journal:
            os.close(out)
            self.proc.stdout = open(read_end, encoding="utf-8", errors="replace")
        self._reader = threading.Thread(target=self._read, name="daemon-log", daemon=True)
        self._reader.start()
        try:
            m = self.wait_for_log(r"listening on http://127\.0\.0\.1:(\d+)", timeout)
        except BaseException:
            self.proc.kill()  # a daemon that failed to start must not outlive the test
            self.proc.wait()
            raise
        self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}"
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
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = regex.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                if self._reader is not None and not self._reader.is_alive():
                    raise AssertionError(f"daemon output ended before {pattern!r}:\n" + self.log())
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    raise AssertionError(f"no log line matched {pattern!r} within {timeout} s:\n"
                                         + self.log())

    def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
        """Re-check `predicate` (e.g. on GET /models) until it holds; each new log line, or
        a short pause without one, prompts the next check."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"never happened within {timeout} s: {what}\n" + self.log())
            with self._cond:
                self._cond.wait(0.05)

    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines[-60:])

    def workers(self) -> list[psutil.Process]:
        """The daemon's worker children; a zombie counts (an exited worker nobody reaped)."""
        assert self.proc is not None
        found = []
        for p in psutil.Process(self.proc.pid).children():
            try:
                if p.status() == psutil.STATUS_ZOMBIE or "spawn_main" in " ".join(p.cmdline()):
                    found.append(p)
            except psutil.Error:  # exited while we looked
                pass
        return found

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


def stream_request(port: int, model: str, max_tokens: int = 8000, headers: bytes = b"") -> bytes:
    """A raw streaming chat request that generates exactly `max_tokens` tokens. `headers`:
    extra raw header lines, each ending in CRLF."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "go"}],
                       "max_tokens": max_tokens, "stream": True, "logit_bias": NO_EOS}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n").encode()
    return head + headers + b"\r\n" + body


def open_stream(port: int, model: str, events: int = 3, max_tokens: int = 8000,
                headers: bytes = b"") -> tuple[socket.socket, bytes]:
    """Start a raw streaming request and read until `events` data lines arrived."""
    sock = send_raw(port, stream_request(port, model, max_tokens, headers))
    received = b""
    while received.count(b"data: ") < events:
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    return sock, received


def send_raw(port: int, request: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(request)
    return sock


def read_to_end(sock: socket.socket, received: bytes = b"") -> bytes:
    """Read until the server closes or the SSE stream's terminating chunk arrives."""
    while not received.endswith(b"0\r\n\r\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def http_body(raw: bytes) -> bytes:
    """The body bytes in a raw chunked HTTP/1.1 response, as far as it was read (a last,
    partly read chunk included): what the client has of the stream."""
    _, _, rest = raw.partition(b"\r\n\r\n")
    body = b""
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line, 16)
        if size == 0:
            break
        body += rest[:size]
        rest = rest[size + 2:]
    return body


def freeze_mid_stream(d: Daemon, model: str) -> tuple[int, socket.socket, bytes]:
    """Load `model`, start a long raw stream on it, then SIGSTOP its worker: the request is
    in flight and cannot finish until the test sends SIGCONT. (worker pid, socket, bytes read)"""
    pid = d.load(model)["pid"]
    assert isinstance(pid, int)
    sock, received = open_stream(d.port, model)
    os.kill(pid, signal.SIGSTOP)
    return pid, sock, received
