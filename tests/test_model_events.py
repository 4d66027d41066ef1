"""GET /models/sse end to end: a real daemon, real workers, an httpx subscriber."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import BACKENDS
from tests.daemon import Daemon


@pytest.fixture(scope="module")
def feed_daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path,
                isolated_env: dict[str, str]) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("events")
    (tmp / "bad.bin").write_bytes(b"scripted")
    (tmp / "c.toml").write_text(f"""
[server]
models_dirs = ["{models_dir}"]
sse_keepalive = 0.3

[models.bad]
source = "{tmp / 'bad.bin'}"
backend = "scripted"
options = {{ fail_load = "weights are corrupt" }}
""")
    with Daemon("--config", str(tmp / "c.toml"), env=isolated_env) as d:
        yield d


def events(r: httpx.Response) -> Iterator[dict[str, Any]]:
    """The feed's events; a keep-alive comment comes through as {"comment": ...}."""
    for line in r.iter_lines():
        if line.startswith("data: "):
            yield json.loads(line[len("data: "):])
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}


def until(feed: Iterator[dict[str, Any]], model: str, status: str) -> list[dict[str, Any]]:
    """`model`'s events up to and including its status_change to `status`."""
    seen = []
    for e in feed:
        if e.get("model") == model:
            seen.append(e)
            if e["event"] == "status_change" and e["data"]["status"] == status:
                return seen
    raise AssertionError(f"the feed ended before {model} became {status}: {seen}")


@BACKENDS
def test_a_subscriber_gets_a_snapshot_then_each_load_as_it_happens(feed_daemon: Daemon, model: str) -> None:
    with httpx.Client(base_url=feed_daemon.url, timeout=30) as c, c.stream("GET", "/models/sse") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-accel-buffering"] == "no" and r.headers["cache-control"] == "no-cache"
        feed = events(r)
        first = next(feed)
        assert first["event"] == "snapshot" and first["model"] is None
        states = {m["id"]: m["status"] for m in first["data"]["models"]}
        assert {"tiny-a", "tiny-mlx", "bad"} <= set(states) and states[model] == "unloaded"

        assert c.post("/models/load", json={"model": model}).status_code == 200
        seen = until(feed, model, "loaded")
        assert seen[0] == {"model": model, "event": "status_change", "data": {"status": "loading"}}
        # llama-server's shape: load progress inside status_change, as its web UI reads it.
        progress = [e["data"] for e in seen if e["event"] == "status_change" and "progress" in e["data"]]
        assert all(p["progress"]["stages"] == ["text_model"] for p in progress)
        values = [p["progress"]["value"] for p in progress]
        assert values[0] == 0.0 and values[-1] == 1.0 and values == sorted(values)
        assert len(values) == len(set(values))  # no repeats
        # Stages in order (a tiny load is quicker than the throttle: some go unseen).
        stages = list(dict.fromkeys(p["stage"] for p in progress))
        order = ["load"] if model == "tiny-a" else ["config", "weights", "tokenizer"]
        assert stages[0] == order[0] and stages[-1] == order[-1]
        assert stages == [s for s in order if s in stages]

        assert c.post("/models/unload", json={"model": model}).status_code == 200
        statuses = [e["data"]["status"] for e in until(feed, model, "unloaded")]
        assert statuses == ["unloading", "unloaded"]


def test_a_failed_load_says_why_and_idle_feeds_are_kept_alive(feed_daemon: Daemon) -> None:
    with httpx.Client(base_url=feed_daemon.url, timeout=30) as c, c.stream("GET", "/models/sse") as r:
        feed = events(r)
        assert next(feed)["event"] == "snapshot"
        assert c.post("/models/load", json={"model": "bad"}).status_code == 200
        failed = until(feed, "bad", "failed")[-1]["data"]
        assert failed["exit_code"] == 3 and "weights are corrupt" in failed["message"], feed_daemon.log()
        # Nothing happens now: comment lines keep the connection open (0.3 s apart here).
        assert next(feed) == {"comment": "keepalive"}
        # A subscriber that comes later sees the failure in its snapshot.
        with c.stream("GET", "/models/sse") as late:
            snapshot = next(events(late))["data"]["models"]
        assert next(m for m in snapshot if m["id"] == "bad")["status"] == "failed"


def test_open_feeds_do_not_keep_the_daemon_from_stopping(models_dir: Path,
                                                         isolated_env: dict[str, str]) -> None:
    d = Daemon("--models-dir", str(models_dir), env=isolated_env).start()
    try:
        with httpx.Client(base_url=d.url, timeout=30) as c, c.stream("GET", "/models/sse") as r:
            feed = events(r)
            assert next(feed)["event"] == "snapshot"
            assert d.stop(timeout=20) == 0  # SIGTERM: drained at once, the feed is ended
            assert list(feed) == []  # and the stream ends cleanly
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
