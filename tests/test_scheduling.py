"""The pool end to end: eviction, waiting, idle unload, memory admission, backpressure.

Real daemons and real llama.cpp workers (the scripted backend only where a slow load
or a slow generation must happen on cue). Busy models are made to stay busy by
freezing their worker (SIGSTOP), never by hoping a generation is still running.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from protocol.messages import DEFAULT_CACHE_RAM_MB, DEFAULT_PARALLEL
from tests.daemon import Daemon, freeze_mid_stream, read_to_end

MIB = 1024 * 1024
LONG = "long"  # n_ctx 8192: a generation that outlives the test's actions


def _config(path: Path, models_dir: Path, server: str = "", extra: str = "") -> Path:
    path.write_text(f"""
[server]
models_dirs = []
{server}

[defaults]
n_ctx = 1024

[models.tiny-a]
source = "{models_dir / 'tiny-a.gguf'}"

[models.tiny-b]
source = "{models_dir / 'tiny-b.gguf'}"

[models.long]
source = "{models_dir / 'tiny-b.gguf'}"
n_ctx = 8192
{extra}
""")
    return path


def _chat(c: httpx.Client, model: str) -> httpx.Response:
    return c.post("/v1/chat/completions", json={"model": model, "max_tokens": 2,
                                                "messages": [{"role": "user", "content": "hi"}]})


def _status(d: Daemon, model: str) -> str:
    return d.models()[model]["status"]["value"]  # type: ignore[index,no-any-return]


@pytest.fixture
def two_places(tmp_path: Path, models_dir: Path, isolated_env: dict[str, str]) -> Iterator[Daemon]:
    config = _config(tmp_path / "c.toml", models_dir)
    with Daemon("--config", str(config), "--max-models", "2", env=isolated_env) as d:
        yield d


def test_lru_eviction_with_two_places_and_three_models(two_places: Daemon) -> None:
    d = two_places
    with d.client() as c:
        for model in ("tiny-a", "tiny-b", "tiny-a"):  # tiny-b is now the least recently used
            assert _chat(c, model).status_code == 200
        b_pid = d.models()["tiny-b"]["pid"]
        assert _chat(c, LONG).status_code == 200
    d.wait_for_log(r"evicting model tiny-b \(idle, least recently used\) to make room for long")
    models = d.models()
    assert [_status(d, m) for m in ("tiny-a", "tiny-b", LONG)] == ["loaded", "unloaded", "loaded"]
    assert not psutil.pid_exists(b_pid) or psutil.Process(b_pid).status() == psutil.STATUS_ZOMBIE  # type: ignore[arg-type]
    assert len(d.workers()) == 2
    memory = models["tiny-a"]["memory"]
    assert memory["rss"] > 0 and memory["estimate"] > 0  # type: ignore[index,operator]


def test_busy_model_is_not_evicted_and_the_waiter_is_served_when_it_finishes(
        tmp_path: Path, models_dir: Path, isolated_env: dict[str, str]) -> None:
    config = _config(tmp_path / "c.toml", models_dir)
    with Daemon("--config", str(config), "--max-models", "1", env=isolated_env) as d:
        pid, sock, received = freeze_mid_stream(d, LONG)  # busy until the test says so
        mark = d.mark()
        result: dict[str, httpx.Response] = {}

        def waiter() -> None:
            with d.client() as c:
                result["r"] = _chat(c, "tiny-a")

        t = threading.Thread(target=waiter, daemon=True)
        try:
            t.start()
            d.wait_for_log(r"model tiny-a waits to load: max_models is reached; waiting for one of "
                           r"long to become idle", start=mark)
            models = d.models()
            assert models[LONG]["status"]["value"] == "loaded"  # type: ignore[index]
            assert "max_models" in models["tiny-a"]["status"]["queued"]  # type: ignore[index]
            assert models["tiny-a"]["waiting"] == 1
        finally:
            os.kill(pid, signal.SIGCONT)
        body = read_to_end(sock, received)  # the busy stream runs to its end, untouched
        sock.close()
        assert b"data: [DONE]" in body
        t.join(60)
        assert result["r"].status_code == 200, result["r"].text
        d.wait_for_log(r"evicting model long \(idle, least recently used\) to make room for tiny-a",
                       start=mark)


def test_a_client_leaving_the_queue_affects_nothing(tmp_path: Path, models_dir: Path,
                                                     isolated_env: dict[str, str]) -> None:
    config = _config(tmp_path / "c.toml", models_dir)
    with Daemon("--config", str(config), "--max-models", "1", env=isolated_env) as d:
        pid, stream, received = freeze_mid_stream(d, LONG)
        try:
            mark = d.mark()
            queued = socket.create_connection(("127.0.0.1", d.port), timeout=30)
            body = b'{"model": "tiny-a", "prompt": "x", "max_tokens": 2}'
            queued.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            d.wait_for_log(r"model tiny-a waits to load", start=mark)
            queued.close()  # the client gives up while queued
            d.wait_for_log(r"model tiny-a left the load queue: nobody waits for it any more", start=mark)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert b"data: [DONE]" in read_to_end(stream, received)
        stream.close()
        models = d.models()
        assert models[LONG]["status"]["value"] == "loaded"  # type: ignore[index]
        assert models[LONG]["pid"] == pid  # nothing evicted it: nobody needed the place
        assert models["tiny-a"]["status"]["value"] == "unloaded"  # type: ignore[index]
        assert models["tiny-a"]["waiting"] == 0 and "queued" not in models["tiny-a"]["status"]  # type: ignore[operator]
        assert not any("model tiny-a loaded" in line for line in d.lines)
        assert not any("Traceback" in line for line in d.lines), d.log()  # a quiet departure


def test_idle_ttl_unloads_reloads_on_demand_and_spares_pinned(
        tmp_path: Path, models_dir: Path, isolated_env: dict[str, str]) -> None:
    pinned = f'[models.pinned]\nsource = "{models_dir / "tiny-a.gguf"}"\npinned = true\n'
    config = _config(tmp_path / "c.toml", models_dir, server="idle_ttl = 1", extra=pinned)
    with Daemon("--config", str(config), env=isolated_env) as d, d.client() as c:
        assert _chat(c, "pinned").status_code == 200  # idle the longest, and pinned
        assert _chat(c, "tiny-b").status_code == 200
        mark = d.mark()
        d.wait_for_log(r"unloading model tiny-b: idle for \d+ s \(ttl 1 s\)", timeout=30)
        d.wait_for_log(r"worker tiny-b \(pid \d+\) exited", start=mark)
        assert _status(d, "tiny-b") == "unloaded"
        assert _status(d, "pinned") == "loaded"
        assert _chat(c, "tiny-b").status_code == 200  # loads again on demand
        d.wait_for_log("model tiny-b loaded", start=mark)  # a second time
        assert not any("unloading model pinned" in line for line in d.lines)


def test_load_on_startup(tmp_path: Path, models_dir: Path, isolated_env: dict[str, str]) -> None:
    config = _config(tmp_path / "c.toml", models_dir, extra="load_on_startup = true\n")  # on `long`
    with Daemon("--config", str(config), env=isolated_env) as d:
        d.wait_for_log(r"model long loaded")
        assert _status(d, LONG) == "loaded" and _status(d, "tiny-a") == "unloaded"


def test_memory_admission_refuses_what_cannot_fit(tmp_path: Path, models_dir: Path,
                                                  isolated_env: dict[str, str]) -> None:
    config = _config(tmp_path / "c.toml", models_dir, server="memory_margin_mb = 100000000")
    with Daemon("--config", str(config), env=isolated_env) as d, d.client() as c:
        r = _chat(c, "tiny-a")
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"]
        message = r.json()["error"]["message"]
        assert "does not fit in memory: it needs about" in message
        weights = (models_dir / "tiny-a.gguf").stat().st_size
        # Every slot's KV cache: slots x layers x n_ctx x KV heads x (K + V head dims) x f16.
        kv = DEFAULT_PARALLEL * 2 * 1024 * 2 * (16 + 16) * 2
        cache = DEFAULT_CACHE_RAM_MB * MIB  # the host-RAM prompt cache's bound
        assert (f"weights {weights / MIB:.1f} MiB, KV cache {kv / MIB:.1f} MiB, prompt cache up to "
                f"{cache // MIB} MiB, process 64 MiB") in message
        assert "memory_margin_mb keeps 100000000 MiB free" in message
        estimate = d.models()["tiny-a"]["memory"]["estimate"]  # type: ignore[index]
        assert estimate == weights + kv + cache + 64 * MIB
        assert d.workers() == []  # refused before any process started


SCRIPTED = """
[server]
models_dirs = []
max_waiting = 1
stop_timeout = 0.5

[models.slowgen]
source = "{dir}/m.bin"
backend = "scripted"
max_queue = 1
options = {{ token_seconds = 0.05 }}

[models.slowload]
source = "{dir}/m.bin"
backend = "scripted"
options = {{ load_seconds = 60 }}
"""


def test_backpressure_429_per_model_and_503_when_too_many_wait(tmp_path: Path,
                                                               isolated_env: dict[str, str]) -> None:
    (tmp_path / "m.bin").write_bytes(b"scripted")
    (tmp_path / "c.toml").write_text(SCRIPTED.format(dir=tmp_path))
    with Daemon("--config", str(tmp_path / "c.toml"), env=isolated_env) as d, d.client() as c:
        mark = d.mark()
        body = {"model": "slowgen", "max_tokens": 1000, "stream": True,
                "messages": [{"role": "user", "content": "hi"}]}
        with c.stream("POST", "/v1/chat/completions", json=body) as running:
            assert running.status_code == 200
            d.wait_for_log(r"\[slowgen\] scripted backend: generating", start=mark)
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 429, r.text
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert "max_queue 1" in r.json()["error"]["message"]
        waiting: dict[str, httpx.Response] = {}

        def wait_for_load() -> None:
            with d.client() as c2:
                waiting["r"] = c2.post("/v1/completions", json={"model": "slowload", "prompt": "x"})

        t = threading.Thread(target=wait_for_load, daemon=True)
        t.start()
        d.wait_for_log(r"\[slowload\] scripted backend: loading", start=mark)
        r = c.post("/v1/completions", json={"model": "slowload", "prompt": "y"})
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "5"
        assert "max_waiting 1" in r.json()["error"]["message"]
        assert c.post("/models/unload", json={"model": "slowload"}).status_code == 200
        t.join(60)
        assert waiting["r"].status_code == 503  # unloaded while it loaded


def test_unloading_a_busy_model_lets_its_request_finish_within_the_grace(
        tmp_path: Path, models_dir: Path, isolated_env: dict[str, str]) -> None:
    config = _config(tmp_path / "c.toml", models_dir, server="stop_timeout = 300")
    with Daemon("--config", str(config), env=isolated_env) as d:
        pid, sock, received = freeze_mid_stream(d, LONG)
        mark = d.mark()
        unloaded: dict[str, httpx.Response] = {}

        def unload() -> None:
            with d.client() as c:
                unloaded["r"] = c.post("/models/unload", json={"model": LONG})

        t = threading.Thread(target=unload, daemon=True)
        try:
            t.start()
            # The Shutdown message waits in the frozen worker's socket until it runs again.
            d.wait_for_log(r"worker long: asked to stop; 300 s to finish its requests", start=mark)
            with d.client() as c:  # meanwhile the model takes no new work, others serve
                assert _status(d, LONG) == "unloading"
                r = _chat(c, "tiny-a")
                assert r.status_code == 200
        finally:
            os.kill(pid, signal.SIGCONT)
        d.wait_for_log(r"shutdown requested \(unload\): finishing 1 request\(s\) first", start=mark)
        body = read_to_end(sock, received)
        sock.close()
        assert b"data: [DONE]" in body and b'"error"' not in body
        t.join(60)
        assert unloaded["r"].json() == {"success": True}
        d.wait_for_log(r"worker long \(pid \d+\) exited: exit code 0", start=mark)
        assert not any("sending SIGTERM" in line for line in d.lines[mark:])


def test_waiters_are_served_in_order_and_share_one_eviction(
        tmp_path: Path, models_dir: Path, isolated_env: dict[str, str]) -> None:
    config = _config(tmp_path / "c.toml", models_dir)
    with Daemon("--config", str(config), "--max-models", "1", env=isolated_env) as d:
        pid, sock, received = freeze_mid_stream(d, LONG)
        mark = d.mark()
        results: dict[str, int] = {}

        def ask(key: str, model: str) -> threading.Thread:
            def run() -> None:
                with d.client() as c:
                    results[key] = _chat(c, model).status_code
            t = threading.Thread(target=run, daemon=True)
            t.start()
            return t

        try:
            threads = [ask("a1", "tiny-a")]
            d.wait_for_log(r"model tiny-a waits to load: max_models is reached", start=mark)
            threads.append(ask("b", "tiny-b"))
            d.wait_for_log(r"model tiny-b waits to load behind tiny-a", start=mark)
            threads.append(ask("a2", "tiny-a"))  # joins tiny-a's place in the queue, ahead of b
            d.wait_until(lambda: d.models()["tiny-a"]["waiting"] == 2, "a2 queued with a1")
        finally:
            os.kill(pid, signal.SIGCONT)
        assert b"data: [DONE]" in read_to_end(sock, received)
        sock.close()
        for t in threads:
            t.join(60)
        assert results == {"a1": 200, "a2": 200, "b": 200}
        d.wait_for_log(r"evicting model tiny-a .* room for tiny-b", start=mark)
        evictions = [line for line in d.lines[mark:] if "evicting model" in line]
        assert len(evictions) == 2, evictions
        assert "evicting model long" in evictions[0] and "room for tiny-a" in evictions[0]
        assert "evicting model tiny-a" in evictions[1] and "room for tiny-b" in evictions[1]
        assert sum("model tiny-a loaded" in line for line in d.lines[mark:]) == 1
