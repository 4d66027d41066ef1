"""A worker that hangs without dying (SIGSTOP stands in for a stuck driver or a swap storm)
is found by its missed heartbeats: its requests end with a 503 or an error event saying it
is not responding, it is stopped by the shutdown ladder, /models shows it failed, and the
next request starts a fresh worker."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.daemon import Daemon, http_body, open_stream, read_to_end

TIMEOUT = 2.0  # heartbeat_timeout: short, so the test waits seconds, not the default 30


@pytest.fixture(scope="module")
def hung_daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path,
                isolated_env: dict[str, str]) -> Iterator[Daemon]:
    config = tmp_path_factory.mktemp("hung") / "c.toml"
    config.write_text(f'[server]\nmodels_dirs = []\nheartbeat_interval = 0.25\n'
                      f'heartbeat_timeout = {TIMEOUT}\n\n'
                      f'[models.long]\nsource = "{models_dir / "tiny-b.gguf"}"\nn_ctx = 8192\n')
    with Daemon("--config", str(config), env=isolated_env) as d:
        yield d


def _resume_if_alive(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def test_a_stopped_worker_is_found_stopped_and_replaced(hung_daemon: Daemon) -> None:
    d = hung_daemon
    pid = d.load("long")["pid"]
    assert isinstance(pid, int)
    sock, received = open_stream(d.port, "long")
    mark = d.mark()
    os.kill(pid, signal.SIGSTOP)  # never resumed: the ladder must end it as it is
    try:
        raw = read_to_end(sock, received)  # ends when the router gives up on the worker
        sock.close()
        psutil.Process(pid).wait(timeout=30)  # stopped: only the ladder's SIGKILL ends it
    finally:
        _resume_if_alive(pid)
    events = [ln[6:] for ln in http_body(raw).decode().splitlines() if ln.startswith("data: ")]
    assert "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert error["code"] == "unavailable", error
    assert "not responding" in error["message"]

    d.wait_for_log(r"not responding", timeout=10, start=mark)
    with d.client() as c:
        listed = {m["id"]: m for m in c.get("/models").json()["data"]}
    status = listed["long"]["status"]
    assert status["value"] in ("failed", "unloaded"), status
    assert "not responding" in json.dumps(status)

    # The next request starts a fresh worker and is answered.
    with d.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "long", "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert d.models()["long"]["pid"] not in (None, pid)


def test_a_request_waiting_on_a_hung_worker_gets_a_503(hung_daemon: Daemon) -> None:
    d = hung_daemon
    pid = d.load("long")["pid"]
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGSTOP)
    try:
        with d.client() as c:
            r = c.post("/v1/chat/completions", json={"model": "long", "max_tokens": 2,
                                                     "messages": [{"role": "user", "content": "hi"}]})
    finally:
        _resume_if_alive(pid)
    assert r.status_code == 503, r.text
    assert "not responding" in r.json()["error"]["message"]
