"""Processes and connections: disconnects, worker deaths, single-flight loads, shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from tests.daemon import NO_EOS, Daemon, open_stream

LONG = "org/tiny-long"  # n_ctx 8192: room for a generation that outlives the test's actions


@pytest.mark.parametrize("model", [LONG, "mlx-long"])
def test_client_disconnect_cancels_generation(daemon: Daemon, model: str) -> None:
    pid = daemon.load(model)["pid"]
    assert isinstance(pid, int)
    mark = daemon.mark()
    sock, _ = open_stream(daemon.port, model)
    # Freeze the worker so generation cannot finish on its own while the client leaves.
    os.kill(pid, signal.SIGSTOP)
    try:
        # Abortive close (RST), like a phone dropping off Wi-Fi.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    finally:
        os.kill(pid, signal.SIGCONT)
    m = daemon.wait_for_log(r"request \d+ cancelled after (\d+) tokens", timeout=30, start=mark)
    assert int(m.group(1)) < 8000
    # The worker is free at once: a new request on the same model is served.
    with daemon.client() as c:
        r = c.post("/v1/chat/completions", json={"model": model, "max_tokens": 3,
                                                 "messages": [{"role": "user", "content": "again"}]})
    assert r.status_code == 200, r.text


def test_worker_killed_mid_stream_ends_stream_with_error(daemon: Daemon) -> None:
    pid = daemon.load(LONG)["pid"]
    assert isinstance(pid, int)
    body = {"model": LONG, "messages": [{"role": "user", "content": "go"}], "max_tokens": 8000,
            "stream": True, "logit_bias": NO_EOS}
    lines: list[str] = []
    with daemon.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            lines.append(line)
            if len(lines) == 3:
                os.kill(pid, signal.SIGKILL)
    data = [ln[6:] for ln in lines if ln.startswith("data: ")]
    assert "[DONE]" not in data
    error = json.loads(data[-1])["error"]
    assert error["code"] == "worker_failed"
    assert "SIGKILL" in error["message"]
    entry = daemon.models()[LONG]
    assert entry["status"]["value"] == "failed"  # type: ignore[index]
    assert entry["status"]["exit_code"] == -signal.SIGKILL  # type: ignore[index]
    assert "SIGKILL" in entry["status"]["message"]  # type: ignore[index]
    # The router keeps serving, and the next request starts a fresh worker.
    with daemon.client() as c:
        r2 = c.post("/v1/completions", json={"model": LONG, "prompt": "x", "max_tokens": 2})
    assert r2.status_code == 200, r2.text
    assert daemon.models()[LONG]["pid"] not in (None, pid)


def test_api_keys(models_dir: Path, isolated_env: dict[str, str]) -> None:
    with Daemon("--models-dir", str(models_dir), "--api-key", "k-one", "--api-key", "k-two",
                env=isolated_env) as d, d.client() as c:
        assert c.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "k-on"},
                        {"Authorization": "Basic k-one"}):
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["error"]["type"] == "authentication_error"
        r = c.post("/v1/chat/completions", json={"model": "tiny-a", "messages": []})
        assert r.status_code == 401  # auth comes before validation: nothing leaks to strangers
        assert c.get("/models", headers={"Authorization": "Bearer k-one"}).status_code == 200
        assert c.get("/v1/models", headers={"x-api-key": "k-two"}).status_code == 200
        import openai

        with openai.OpenAI(base_url=d.url + "/v1", api_key="k-two", max_retries=0, timeout=60) as client:
            out = client.chat.completions.create(model="tiny-a", max_tokens=2,
                                                 messages=[{"role": "user", "content": "hi"}])
        assert out.choices[0].message.content is not None
        with openai.OpenAI(base_url=d.url + "/v1", api_key="nope", max_retries=0, timeout=60) as bad:
            try:
                bad.models.list()
            except openai.AuthenticationError:
                pass
            else:
                raise AssertionError("a wrong key was accepted")


def test_no_autoload(models_dir: Path, isolated_env: dict[str, str]) -> None:
    with Daemon("--models-dir", str(models_dir), "--no-autoload", env=isolated_env) as d, d.client() as c:
        body = {"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 400
        assert "not loaded" in r.json()["error"]["message"]
        assert d.models()["tiny-a"]["status"]["value"] == "unloaded"  # type: ignore[index]
        d.load("tiny-a")
        assert c.post("/v1/chat/completions", json=body).status_code == 200
        assert c.post("/models/unload", json={"model": "tiny-a"}).json() == {"success": True}
        assert d.models()["tiny-a"]["status"]["value"] == "unloaded"  # type: ignore[index]
        assert c.post("/v1/chat/completions", json=body).status_code == 400
        assert c.post("/models/load", json={"model": "nope"}).status_code == 404


def test_concurrent_first_requests_start_one_worker(models_dir: Path, isolated_env: dict[str, str]) -> None:
    with Daemon("--models-dir", str(models_dir), env=isolated_env) as d:
        barrier = threading.Barrier(6)

        def ask(i: int) -> int:
            with d.client() as c:
                barrier.wait(10)
                return c.post("/v1/completions", json={"model": "tiny-b", "prompt": str(i),
                                                       "max_tokens": 2}).status_code
        with ThreadPoolExecutor(6) as pool:
            assert list(pool.map(ask, range(6))) == [200] * 6
        d.wait_for_log("model tiny-b loaded")  # the log reader may lag the HTTP replies
        assert sum("model tiny-b loaded" in line for line in d.lines) == 1
        assert len(d.workers()) == 1


def still_running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Wait up to 5 s; a zombie counts as gone (PID 1 of a container may never reap it)."""
    _gone, alive = psutil.wait_procs(procs, timeout=5)
    running = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                running.append(p)
        except psutil.Error:
            pass
    return running


def test_sigterm_stops_workers_and_exits_zero(models_dir: Path, isolated_env: dict[str, str]) -> None:
    d = Daemon("--models-dir", str(models_dir), env=isolated_env).start()
    try:
        pids = [d.load(m)["pid"] for m in ("tiny-a", "tiny-b")]
        procs = [psutil.Process(p) for p in pids]  # type: ignore[arg-type]
    finally:
        code = d.stop()
    assert code == 0
    assert not still_running(procs)
    assert sum("exited: exit code 0" in line for line in d.lines) == 2, d.log()


def test_kill9_of_daemon_leaves_no_worker(models_dir: Path, short_dir: Path) -> None:
    tmp_path = short_dir
    env = {"XDG_RUNTIME_DIR": str(tmp_path), "XDG_DATA_HOME": str(tmp_path)}
    d = Daemon("--models-dir", str(models_dir), env=env).start()
    assert d.proc is not None
    try:
        pids = [d.load(m)["pid"] for m in ("tiny-a", "tiny-b")]
        procs = [psutil.Process(p) for p in pids]  # type: ignore[arg-type]
    finally:
        d.proc.kill()
        d.proc.wait(10)
    alive = still_running(procs)
    assert not alive, f"orphaned workers: {[p.pid for p in alive]}"
    # The killed router's sockets dir is left behind; the next start removes it.
    stale = list(tmp_path.glob("modelherd-*"))
    assert len(stale) == 1 and (stale[0] / "router.pid").is_file()
    with Daemon("--models-dir", str(models_dir), env=env) as again:
        again.wait_for_log(rf"removed stale runtime dir {stale[0]}")
        assert not stale[0].exists()
        assert len(list(tmp_path.glob("modelherd-*"))) == 1  # its own
    assert not list(tmp_path.glob("modelherd-*"))  # and a clean stop removes its own


def test_model_that_fails_to_load_reports_why(tmp_path: Path, isolated_env: dict[str, str]) -> None:
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\x00" * 64)  # a header and nothing else
    with Daemon("--models-dir", str(tmp_path), env=isolated_env) as d, d.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "broken",
                                                 "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"]
        assert "failed to load" in r.json()["error"]["message"]
        status = d.models()["broken"]["status"]
        assert status["value"] == "failed" and status["failed"] is True  # type: ignore[index]
        assert status["message"]  # type: ignore[index]
        assert d.models()["broken"]["pid"] is None
        assert c.get("/health").status_code == 200
