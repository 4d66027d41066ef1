"""systemd's notify protocol (router.notify), against a datagram socket the test binds: READY
once the port answers, WATCHDOG=1 from the event loop, RELOADING/READY around a reload (a
failed one included), STATUS, and STOPPING when the drain starts."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from router.notify import Announcer, Notifier
from tests.daemon import Daemon


class Listener:
    """The service manager's end: a thread reads every datagram at once (as systemd does, so
    the daemon never finds the queue full) and keeps it as its `KEY=value` fields."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.messages: list[dict[str, str]] = []
        self._seen = 0  # messages already looked at by wait_for
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, name="notify-listener", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:  # closed
                return
            if not data:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            with self._cond:
                self.messages.append(fields)
                self._cond.notify_all()

    def wait_for(self, predicate: Callable[[dict[str, str]], bool], what: str,
                 timeout: float = 30) -> dict[str, str]:
        """The first message not looked at yet for which `predicate` holds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while self._seen < len(self.messages):
                    message = self.messages[self._seen]
                    self._seen += 1
                    if predicate(message):
                        return message
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    raise AssertionError(f"no {what} within {timeout} s; got {self.messages[-10:]}")

    def wait_key(self, key: str, value: str = "1", timeout: float = 30) -> dict[str, str]:
        return self.wait_for(lambda m: m.get(key) == value, f"{key}={value}", timeout)


@pytest.fixture
def listener(short_dir: Path) -> Iterator[Listener]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(short_dir / "notify"))
    listener = Listener(sock)
    yield listener
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    listener._thread.join(10)


def test_the_daemon_tells_systemd_how_it_is(listener: Listener, short_dir: Path, models_dir: Path,
                                            isolated_env: dict[str, str]) -> None:
    config = short_dir / "c.toml"
    good = (f'[server]\nmodels_dirs = []\n\n[models.tiny-a]\nsource = "{models_dir / "tiny-a.gguf"}"\n'
            "n_ctx = 256\n")
    config.write_text(good)
    env = {**isolated_env, "NOTIFY_SOCKET": str(short_dir / "notify"), "WATCHDOG_USEC": "400000"}
    with Daemon("--config", str(config), env=env) as d:
        ready = listener.wait_key("READY")
        assert httpx.get(d.url + "/health").status_code == 200  # READY=1 means the port answers
        assert ready["STATUS"].startswith("0 model(s) loaded")
        assert not any("RELOADING" in m or "STOPPING" in m for m in listener.messages)

        # WATCHDOG=1 again and again, every WATCHDOG_USEC / 2 (0.2 s here).
        for _ in range(3):
            listener.wait_key("WATCHDOG", timeout=10)

        # STATUS follows what runs (checked every few seconds, not per request).
        d.load("tiny-a")
        listener.wait_for(lambda m: m.get("STATUS", "").startswith("1 model(s) loaded (tiny-a)"),
                          "a STATUS naming the loaded model")

        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        reloading = listener.wait_key("RELOADING")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert "reload failed" not in listener.wait_key("READY")["STATUS"]

        # An invalid config: the reload fails, systemd still hears READY=1, and it serves on.
        config.write_text(good + "\n[models.broken]\nsourc = 1\n")
        d.proc.send_signal(signal.SIGHUP)
        listener.wait_key("RELOADING")
        after = listener.wait_key("READY")
        assert "the last reload failed" in after["STATUS"] and "sourc" in after["STATUS"]
        with d.client() as c:
            assert c.get("/health").status_code == 200
            r = c.post("/v1/chat/completions", json={"model": "tiny-a", "max_tokens": 2,
                                                     "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text

        d.proc.send_signal(signal.SIGTERM)
        stopping = listener.wait_key("STOPPING")
        assert stopping["STATUS"].startswith("draining")
        assert d.proc.wait(60) == 0


def test_notifier_sends_to_an_abstract_socket() -> None:
    name = f"modelherd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(10)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.enabled
        notifier.ready("serving\nwith a newline")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving with a newline"
        notifier.stopping("bye")
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=bye"
        notifier.close()


def test_notifier_without_a_socket_does_nothing() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_interval is None
    assert notifier.send("READY=1") is False
    notifier.ready("x")
    notifier.watchdog()
    notifier.close()
    # A socket that is gone: the daemon goes on, the send says it failed.
    gone = Notifier({"NOTIFY_SOCKET": "/nonexistent/notify"})
    assert gone.enabled and gone.send("READY=1") is False


def test_a_full_queue_never_stalls_the_loop_for_long() -> None:
    name = f"modelherd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())  # and nobody reads: a wedged service manager
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        sent = [notifier.send("WATCHDOG=1") for _ in range(1000)]  # these never wait
        assert sent[0] and not sent[-1]
        started = time.monotonic()
        assert notifier.send("READY=1", wait=True) is False  # waits a little, then gives up
        assert time.monotonic() - started < 5
        notifier.close()


def test_watchdog_interval_honours_watchdog_pid() -> None:
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval == 30.0
    mine = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval == 30.0
    # Meant for another process (e.g. the parent that started this one): not ours to send.
    other = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(other).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval is None


def test_the_watchdog_beats_only_while_the_event_loop_runs() -> None:
    name = f"modelherd-test-{uuid.uuid4().hex}"
    received: list[bytes] = []

    def drain(sock: socket.socket) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(sock.recv(4096))
            except BlockingIOError:
                return out

    async def main(sock: socket.socket) -> None:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "20000"})  # every 10 ms
        status = ["starting"]
        announcer = Announcer(notifier, lambda: status[0], status_every=0.01)
        announcer.start()
        loop = asyncio.get_running_loop()
        arrived = asyncio.Event()

        def readable() -> None:
            received.extend(drain(sock))
            arrived.set()

        async def until(predicate: Callable[[], bool]) -> None:
            while not predicate():
                arrived.clear()
                await arrived.wait()

        loop.add_reader(sock.fileno(), readable)
        await asyncio.wait_for(until(lambda: received.count(b"WATCHDOG=1") >= 3), 10)
        status[0] = "busy"
        await asyncio.wait_for(until(lambda: b"STATUS=busy" in received), 10)
        loop.remove_reader(sock.fileno())
        received.extend(drain(sock))
        # A wedged loop (this blocks it on purpose): no task runs, so no WATCHDOG=1 goes out
        # and systemd would restart the service after WatchdogSec.
        time.sleep(0.2)  # noqa: ASYNC251 # noqa: sleep-ok wedging the loop is the test
        assert drain(sock) == []
        await announcer.close()

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.setblocking(False)
        asyncio.run(main(sock))
    assert received[0].startswith(b"READY=1\nSTATUS=starting")
