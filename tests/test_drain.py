"""SIGTERM drains: in-flight streams finish, new requests get a 503, then workers stop."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import write_config
from tests.daemon import Daemon, freeze_mid_stream, read_to_end

LONG = "org/tiny-long"


@contextlib.contextmanager
def _daemon(tmp_path: Path, models_dir: Path, env: dict[str, str], stop_timeout: float) -> Iterator[Daemon]:
    config = write_config(tmp_path / "c.toml", models_dir).read_text().replace(
        "[server]\n", f"[server]\nstop_timeout = {stop_timeout}\n")
    (tmp_path / "c.toml").write_text(config)
    d = Daemon("--config", str(tmp_path / "c.toml"), env=env).start()
    try:
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


@pytest.fixture
def draining(tmp_path: Path, models_dir: Path, isolated_env: dict[str, str]) -> Iterator[Daemon]:
    # A grace far longer than any test: only the drain finishing (or a second signal) ends it.
    with _daemon(tmp_path, models_dir, isolated_env, 300) as d:
        yield d


def test_sigterm_drains_a_running_stream_to_completion(draining: Daemon) -> None:
    d = draining
    assert d.proc is not None
    pid, sock, received = freeze_mid_stream(d, LONG)
    try:
        mark = d.mark()
        d.proc.send_signal(signal.SIGTERM)
        d.wait_for_log(r"draining: refusing new requests", start=mark)
        with d.client() as c:  # the port stays open during the drain, and says why it refuses
            r = c.post("/v1/completions", json={"model": "tiny-a", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert "shutting down" in r.json()["error"]["message"]
        assert d.proc.poll() is None
    finally:
        os.kill(pid, signal.SIGCONT)
    body = read_to_end(sock, received)
    sock.close()
    assert b"data: [DONE]" in body and b'"error"' not in body
    assert d.proc.wait(60) == 0  # by itself: the drain ends when nothing is in flight
    d.wait_for_log(r"drained: no request in flight", start=mark)
    d.wait_for_log(r"worker org/tiny-long \(pid \d+\) exited: exit code 0", start=mark)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_second_signal_skips_the_wait(draining: Daemon) -> None:
    d = draining
    assert d.proc is not None
    pid, sock, received = freeze_mid_stream(d, LONG)
    mark = d.mark()
    d.proc.send_signal(signal.SIGTERM)
    d.wait_for_log(r"draining: refusing new requests", start=mark)
    d.proc.send_signal(signal.SIGTERM)
    # Without the second signal this would wait out the 300 s grace.
    assert d.proc.wait(60) == 0
    body = read_to_end(sock, received)
    sock.close()
    assert b"data: [DONE]" not in body  # cut short, as asked, and told why
    assert b"modelherd is shutting down" in body
    d.wait_for_log(r"second signal: stopping now", start=mark)
    assert not any("Traceback" in line for line in d.lines), d.log()
    proc = psutil.Process(pid) if psutil.pid_exists(pid) else None
    if proc is not None:  # the ladder ends in SIGKILL; a frozen worker is no exception
        assert psutil.wait_procs([proc], timeout=5)[1] == [] or proc.status() == psutil.STATUS_ZOMBIE


def test_a_second_signal_also_cuts_the_workers_grace(draining: Daemon) -> None:
    d = draining
    assert d.proc is not None
    _pid, sock, _ = freeze_mid_stream(d, LONG)
    mark = d.mark()
    sock.close()
    # The router is idle once it noticed; the frozen worker still has the request.
    d.wait_until(lambda: d.models()[LONG]["in_flight"] == 0, "the router saw the client go")
    d.proc.send_signal(signal.SIGTERM)
    d.wait_for_log(r"worker org/tiny-long: asked to stop; \d+(\.\d+)? s to finish", start=mark)
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(60) == 0  # not the 300 s grace
    d.wait_for_log(r"stopping 1 worker\(s\) without further grace", start=mark)


def test_the_drain_ends_at_stop_timeout_with_an_error_event(tmp_path: Path, models_dir: Path,
                                                            isolated_env: dict[str, str]) -> None:
    with _daemon(tmp_path, models_dir, isolated_env, 1) as d:
        assert d.proc is not None
        _pid, sock, received = freeze_mid_stream(d, LONG)  # frozen for good: only the deadline ends it
        mark = d.mark()
        d.proc.send_signal(signal.SIGTERM)
        body = read_to_end(sock, received)
        sock.close()
        assert b"modelherd is shutting down" in body and b"data: [DONE]" not in body
        assert d.proc.wait(60) == 0
        d.wait_for_log(r"drain timeout: stopping with requests still in flight", start=mark)
