"""Races and server-initiated stops, made to happen on cue with the scripted backend."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.daemon import Daemon

CONFIG = """
[server]
models_dirs = []
stop_timeout = 0.5

[models.slowload]
source = "{dir}/slowload.bin"
backend = "scripted"
options = {{ load_seconds = 60 }}

[models.slowgen]
source = "{dir}/slowgen.bin"
backend = "scripted"
options = {{ token_seconds = 0.05 }}

[models.quick]
source = "{dir}/quick.bin"
backend = "scripted"

[models.crashy]
source = "{dir}/quick.bin"
backend = "scripted"
options = {{ crash_after_tokens = 3 }}
"""


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory, isolated_env: dict[str, str]) -> Iterator[Daemon]:
    d = tmp_path_factory.mktemp("faults")
    for name in ("slowload", "slowgen", "quick"):
        (d / f"{name}.bin").write_bytes(b"scripted")
    (d / "cfg.toml").write_text(CONFIG.format(dir=d))
    with Daemon("--config", str(d / "cfg.toml"), env=isolated_env) as daemon:
        yield daemon


def chat(model: str, stream: bool = False, max_tokens: int = 4) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "stream": stream}


def test_unload_during_load_answers_waiters_503_and_leaves_no_process(faults: Daemon) -> None:
    mark = faults.mark()
    result: dict[str, httpx.Response] = {}

    def wait_for_model() -> None:
        with faults.client() as c:
            result["r"] = c.post("/v1/chat/completions", json=chat("slowload"))

    t = threading.Thread(target=wait_for_model, daemon=True)
    t.start()
    faults.wait_for_log(r"\[slowload\] scripted backend: loading", start=mark)
    pid = faults.models()["slowload"]["pid"]
    assert isinstance(pid, int) and psutil.pid_exists(pid)
    with faults.client() as c:
        assert c.post("/models/unload", json={"model": "slowload"}).json() == {"success": True}
    t.join(60)
    assert not t.is_alive(), "the request never returned"
    r = result["r"]
    assert r.status_code == 503, r.text
    assert "was loading and it was unloaded" in r.json()["error"]["message"]
    assert r.headers["retry-after"]
    assert faults.models()["slowload"]["status"]["value"] == "unloaded"  # type: ignore[index]
    assert faults.models()["slowload"]["pid"] is None
    assert pid not in {p.pid for p in faults.workers()}  # unload returns after the exit


def test_requests_racing_unloads_leave_no_orphan(faults: Daemon) -> None:
    def request(_: int) -> int:
        with faults.client() as c:
            return c.post("/v1/completions", json={"model": "quick", "prompt": "x",
                                                   "max_tokens": 2}).status_code

    def unload(_: int) -> int:
        with faults.client() as c:
            return c.post("/models/unload", json={"model": "quick"}).status_code

    barrier = threading.Barrier(8)

    def both(i: int) -> int:
        barrier.wait(10)
        return request(i) if i % 2 else unload(i)

    for _ in range(3):
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(both, range(8)))
        assert all(s in (200, 503) for s in statuses), statuses
    # Whatever the interleaving, every live worker is one /models knows about: no orphan.
    known = {m["pid"] for m in faults.models().values() if m["pid"]}
    assert {p.pid for p in faults.workers()} == known


def test_unload_mid_stream_ends_with_an_error_event_not_silence(faults: Daemon) -> None:
    with faults.client() as c, c.stream("POST", "/v1/chat/completions",
                                        json=chat("slowgen", stream=True, max_tokens=1000)) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert "assistant" in first
        with faults.client() as c2:
            assert c2.post("/models/unload", json={"model": "slowgen"}).status_code == 200
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    assert "[DONE]" not in rest
    error = json.loads(rest[-1])["error"]
    assert error["code"] == "unavailable"
    assert "unloaded" in error["message"]


def test_unload_during_non_stream_request_is_503(faults: Daemon) -> None:
    faults.load("slowgen")
    mark = faults.mark()
    result: dict[str, httpx.Response] = {}

    def call() -> None:
        with faults.client() as c:
            result["r"] = c.post("/v1/chat/completions", json=chat("slowgen", max_tokens=1000))

    t = threading.Thread(target=call, daemon=True)
    t.start()
    faults.wait_for_log(r"\[slowgen\] scripted backend: generating", start=mark)
    with faults.client() as c:
        assert c.post("/models/unload", json={"model": "slowgen"}).status_code == 200
    t.join(60)
    assert not t.is_alive(), "the request never returned"
    assert result["r"].status_code == 503, result["r"].text
    assert result["r"].json()["error"]["code"] == "unavailable"


def test_load_failure_message_reaches_the_client_and_a_crash_loop_backs_off(
        tmp_path: Path, isolated_env: dict[str, str]) -> None:
    (tmp_path / "m.bin").write_bytes(b"x")
    (tmp_path / "c.toml").write_text(f'[models.bad]\nsource = "{tmp_path}/m.bin"\nbackend = "scripted"\n'
                                     'options = { fail_load = "weights are corrupt" }\n')
    with Daemon("--config", str(tmp_path / "c.toml"), env=isolated_env) as d, d.client() as c:
        r = c.post("/v1/completions", json={"model": "bad", "prompt": "x"})
        assert r.status_code == 503
        assert "weights are corrupt" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "5"  # the backoff after a first failure
        status = d.models()["bad"]["status"]
        assert status["value"] == "failed"  # type: ignore[index]
        assert "weights are corrupt" in status["message"]  # type: ignore[index]
        assert any("weights are corrupt" in line for line in status["log_tail"])  # type: ignore[index]
        assert 0 < status["retry_in"] <= 5 and status["load_failures"] == 1  # type: ignore[index]
        # Within the backoff a request is answered from the recorded failure: no new worker.
        r = c.post("/v1/completions", json={"model": "bad", "prompt": "x"})
        assert r.status_code == 503
        message = r.json()["error"]["message"]
        assert "failed to load 1 time(s) in a row; next attempt in" in message
        assert "weights are corrupt" in message
        assert 1 <= int(r.headers["retry-after"]) <= 5
        assert d.models()["bad"]["status"]["load_failures"] == 1  # type: ignore[index]
        # An operator's explicit load tries again at once, and the backoff doubles.
        r = c.post("/models/load", json={"model": "bad", "wait": True})
        assert r.status_code == 503 and r.headers["retry-after"] == "10"
        assert "weights are corrupt" in r.json()["error"]["message"]
        assert d.models()["bad"]["status"]["load_failures"] == 2  # type: ignore[index]
        d.wait_for_log(r"model bad failed to load \(2 in a row; automatic retries paused for 10 s\)")
        r = c.post("/v1/completions", json={"model": "bad", "prompt": "x"})
        assert r.status_code == 503 and 5 < int(r.headers["retry-after"]) <= 10  # the time left


def test_worker_crash_during_non_stream_request_is_502_and_next_request_respawns(faults: Daemon) -> None:
    with faults.client() as c:
        r = c.post("/v1/chat/completions", json=chat("crashy", max_tokens=10))
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] == "worker_failed"
        assert "exit code 70" in r.json()["error"]["message"]
        status = faults.models()["crashy"]["status"]
        assert status["value"] == "failed" and status["exit_code"] == 70  # type: ignore[index]
        first = faults.mark()
        r = c.post("/v1/chat/completions", json=chat("crashy", max_tokens=2))  # below the crash point
        assert r.status_code == 200, r.text
        faults.wait_for_log(r"model crashy loaded", start=first)
