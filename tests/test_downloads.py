"""Models from hf:// and https:// sources, end to end: a real daemon downloading from a
real HTTP server on loopback (HF_ENDPOINT points at it), with faults on cue, watched
through GET /models/sse."""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.daemon import Daemon
from tests.fileserver import FileServer, file_server
from tests.test_model_events import events, until

TOKEN = "hf_test_token_do_not_log"


@pytest.fixture(scope="module")
def hub() -> Iterator[FileServer]:
    with file_server() as server:
        yield server


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, hub: FileServer,
           isolated_env: dict[str, str]) -> Iterator[tuple[Daemon, Path]]:
    tmp = tmp_path_factory.mktemp("downloads")
    gguf = (models_dir / "tiny-a.gguf").read_bytes()
    hub.add("/org/tiny/resolve/main/tiny.gguf", gguf, cut_at=len(gguf) // 2)
    hub.add("/org/tiny/resolve/main/checked.gguf", gguf)
    hub.add("/org/tiny/resolve/main/wrongsum.gguf", gguf)
    hub.add("/org/tiny/resolve/main/slow.gguf", gguf, chunk_delay=0.2)
    hub.add("/org/tiny/resolve/main/shared.gguf", gguf, chunk_delay=0.05)
    hub.add("/plain/file.gguf", gguf)
    hub.add("/org/tiny/resolve/main/pulled.gguf", gguf)
    hub.add("/org/tiny/resolve/main/twice.gguf", gguf, chunk_delay=0.05)
    hub.add("/org/tiny/resolve/main/vision.gguf", gguf)
    hub.add("/org/tiny/resolve/main/mmproj-vision.gguf", b"projector" * 1000)
    mlx_files = {p.name: p.read_bytes() for p in (models_dir / "tiny-mlx").iterdir()}
    hub.add_tree("org/tiny-mlx", "main", mlx_files)
    cache = tmp / "cache"
    (tmp / "c.toml").write_text(f"""
[server]
models_dirs = []
cache_dir = "{cache}"

[models.remote]
source = "hf://org/tiny/tiny.gguf"

[models.checked]
source = "hf://org/tiny/checked.gguf"
sha256 = "{hashlib.sha256(gguf).hexdigest()}"

[models.wrongsum]
source = "hf://org/tiny/wrongsum.gguf"
sha256 = "{'0' * 64}"

[models.missing]
source = "hf://org/tiny/missing.gguf"

[models.slow]
source = "hf://org/tiny/slow.gguf"

[models.shared]
source = "hf://org/tiny/shared.gguf"

[models.plain]
source = "{hub.url}/plain/file.gguf?signature=secret-signature"

[models.mlx-remote]
source = "hf://org/tiny-mlx"

[models.pulled]
source = "hf://org/tiny/pulled.gguf"

[models.local]
source = "{models_dir / 'tiny-b.gguf'}"

[models.twice]
source = "hf://org/tiny/twice.gguf"

[models.vision]
source = "hf://org/tiny/vision.gguf"
mmproj = "hf://org/tiny/mmproj-vision.gguf"
""")
    env = {**isolated_env, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN}
    with Daemon("--config", str(tmp / "c.toml"), env=env) as d:
        yield d, cache
    assert not any(TOKEN in line or "secret-signature" in line for line in d.lines)


def status_changes(seen: list[dict[str, Any]]) -> list[str]:
    """The statuses a model went through (load progress rides on status_change too)."""
    return [e["data"]["status"] for e in seen
            if e["event"] == "status_change" and "progress" not in e["data"]]


def complete(d: Daemon, model: str) -> httpx.Response:
    with d.client() as c:
        return c.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 3})


def test_a_download_shows_on_the_feed_resumes_after_a_cut_and_then_serves(
        remote: tuple[Daemon, Path], hub: FileServer) -> None:
    d, cache = remote
    with httpx.Client(base_url=d.url, timeout=30) as c, c.stream("GET", "/models/sse") as r:
        feed = events(r)
        assert next(feed)["event"] == "snapshot"
        assert c.post("/models/load", json={"model": "remote"}).status_code == 200
        seen = until(feed, "remote", "loaded")
    kinds = [e["event"] for e in seen]
    statuses = status_changes(seen)
    assert statuses == ["loading", "downloading", "loading", "loaded"]
    progress = [e["data"] for e in seen if e["event"] == "download_progress"]
    assert [p["downloaded"] for p in progress] == sorted(p["downloaded"] for p in progress)
    assert progress[0]["downloaded"] == 0 and progress[-1]["downloaded"] == progress[-1]["total"] > 0
    assert progress[-1]["file"] == "tiny.gguf" and progress[-1]["bytes_per_s"] > 0
    load_progress = next(i for i, e in enumerate(seen)
                         if e["event"] == "status_change" and "progress" in e["data"])
    assert kinds.index("download_finished") < load_progress
    # The connection was cut half way: the second request asked for the rest.
    first, second = hub.seen("/org/tiny/resolve/main/tiny.gguf")
    assert "range" not in first.headers and second.headers["range"].startswith("bytes=")
    assert first.headers["authorization"] == f"Bearer {TOKEN}"
    path = cache / "hf" / "org" / "tiny" / "main" / "tiny.gguf"
    meta = json.loads(path.with_name("tiny.gguf.meta.json").read_text())
    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    entry = d.models()["remote"]
    assert entry["path"] == str(path) and entry["source"] == "hf://org/tiny/tiny.gguf"
    assert complete(d, "remote").status_code == 200


def test_a_configured_checksum_is_verified(remote: tuple[Daemon, Path]) -> None:
    d, cache = remote
    assert complete(d, "checked").status_code == 200
    with httpx.Client(base_url=d.url, timeout=30) as c, c.stream("GET", "/models/sse") as r:
        feed = events(r)
        next(feed)
        assert c.post("/models/load", json={"model": "wrongsum"}).status_code == 200
        seen = until(feed, "wrongsum", "failed")
    assert [e["event"] for e in seen][-2:] == ["download_failed", "status_change"]
    message = seen[-1]["data"]["message"]
    assert "checksum mismatch" in message and "0" * 64 in message  # both hashes
    folder = cache / "hf" / "org" / "tiny" / "main"
    assert not [p for p in folder.iterdir() if p.name.startswith("wrongsum") and not p.name.endswith(".lock")]


def test_a_404_fails_without_retrying(remote: tuple[Daemon, Path], hub: FileServer) -> None:
    d, _ = remote
    r = complete(d, "missing")
    assert r.status_code == 503 and "HTTP 404" in r.json()["error"]["message"]
    assert len(hub.seen("/org/tiny/resolve/main/missing.gguf")) == 1


def test_unloading_a_downloading_model_cancels_it_and_a_later_load_resumes(
        remote: tuple[Daemon, Path], hub: FileServer) -> None:
    d, cache = remote
    part = cache / "hf" / "org" / "tiny" / "main" / "slow.gguf.part"
    with httpx.Client(base_url=d.url, timeout=30) as c, c.stream("GET", "/models/sse") as r:
        feed = events(r)
        next(feed)
        assert c.post("/models/load", json={"model": "slow"}).status_code == 200
        for e in feed:
            if e.get("model") == "slow" and e["event"] == "download_progress" and e["data"]["downloaded"]:
                break
        assert c.post("/models/unload", json={"model": "slow"}).status_code == 200
        until(feed, "slow", "unloaded")
    held = part.stat().st_size
    assert 0 < held < len(hub.files["/org/tiny/resolve/main/slow.gguf"].body)
    hub.files["/org/tiny/resolve/main/slow.gguf"].chunk_delay = 0
    with httpx.Client(base_url=d.url, timeout=30) as c, c.stream("GET", "/models/sse") as r:
        feed = events(r)
        next(feed)
        assert c.post("/models/load", json={"model": "slow"}).status_code == 200
        seen = until(feed, "slow", "loaded")
    statuses = status_changes(seen)
    assert statuses == ["loading", "downloading", "loading", "loaded"]  # nothing left of the last try
    assert hub.seen("/org/tiny/resolve/main/slow.gguf")[-1].headers["range"] == f"bytes={held}-"


def test_two_requests_for_one_model_make_one_download(remote: tuple[Daemon, Path], hub: FileServer) -> None:
    d, _ = remote
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(complete(d, "shared").status_code))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200, 200]
    assert len(hub.seen("/org/tiny/resolve/main/shared.gguf")) == 1


def test_an_https_source_keeps_its_query_out_of_sight(remote: tuple[Daemon, Path], hub: FileServer) -> None:
    d, _ = remote
    assert complete(d, "plain").status_code == 200
    assert hub.seen("/plain/file.gguf")[0].path.endswith("?signature=secret-signature")
    assert "authorization" not in hub.seen("/plain/file.gguf")[0].headers  # HF_TOKEN is for the hub only
    entry: dict[str, Any] = d.models()["plain"]
    assert entry["source"] == f"{hub.url}/plain/file.gguf"
    assert "/https/127.0.0.1_" in entry["path"] and entry["path"].endswith("/file.gguf")


def test_an_mlx_repo_downloads_the_files_it_needs(remote: tuple[Daemon, Path], models_dir: Path,
                                                  hub: FileServer) -> None:
    d, cache = remote
    assert d.models()["mlx-remote"]["backend"] == "mlx"
    assert complete(d, "mlx-remote").status_code == 200
    folder = cache / "hf" / "org" / "tiny-mlx" / "main"
    expected = {p.name for p in (models_dir / "tiny-mlx").iterdir()}
    assert {p.name for p in folder.iterdir() if not p.name.endswith((".lock", ".meta.json"))} == expected
    # Fetched whole once, it loads again with the hub out of reach.
    hub.files["/api/models/org/tiny-mlx/tree/main"].statuses = [503] * 10
    with d.client() as c:
        assert c.post("/models/unload", json={"model": "mlx-remote"}).status_code == 200
    assert complete(d, "mlx-remote").status_code == 200


@pytest.mark.parametrize("source", ["hf://org/../etc/passwd", "hf://org/repo/%2e%2e/x.gguf",
                                    "hf://org/repo/a\\b.gguf", "http://example.com/m.gguf",
                                    "https://user:pw@example.com/m.gguf"])
def test_unsafe_sources_are_config_errors(tmp_path: Path, source: str, isolated_env: dict[str, str]) -> None:
    (tmp_path / "c.toml").write_text(f'[models.m]\nsource = "{source}"\n')
    done = subprocess.run([sys.executable, "-m", "router", "serve", "--config", str(tmp_path / "c.toml")],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent,
                          env={**isolated_env, "PATH": "/usr/bin"})
    assert done.returncode == 2 and "models.m.source" in done.stderr, done.stderr
    assert "pw@" not in done.stderr
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_without_a_config_the_builtin_models_are_offered_and_fetched_on_first_use(
        tmp_path: Path, hub: FileServer, models_dir: Path, isolated_env: dict[str, str]) -> None:
    hub.add("/Qwen/Qwen2.5-0.5B-Instruct-GGUF/resolve/main/qwen2.5-0.5b-instruct-q4_k_m.gguf",
            (models_dir / "tiny-a.gguf").read_bytes())  # a stand-in: nothing real is downloaded here
    env = {**isolated_env, "HF_ENDPOINT": hub.url}
    empty = tmp_path / "empty"
    empty.mkdir()
    local = tmp_path / "local"
    local.mkdir()
    shutil.copy(models_dir / "tiny-b.gguf", local / "qwen2.5-1.5b-instruct.gguf")
    with Daemon("--models-dir", str(local), "--cache-dir", str(tmp_path / "cache"), env=env) as d:
        with d.client() as c:
            ids = {m["id"] for m in c.get("/v1/models").json()["data"]}
        assert {"qwen2.5-0.5b-instruct", "qwen2.5-1.5b-instruct"} <= ids
        entry = d.models()["qwen2.5-0.5b-instruct"]
        assert entry["origin"] == "builtin" and entry["status"]["value"] == "unloaded"
        assert d.models()["qwen2.5-1.5b-instruct"]["origin"] == "models_dir"  # a local file wins
        assert complete(d, "qwen2.5-0.5b-instruct").status_code == 200
    assert (tmp_path / "cache" / "hf" / "Qwen" / "Qwen2.5-0.5B-Instruct-GGUF" / "main"
            / "qwen2.5-0.5b-instruct-q4_k_m.gguf").is_file()
    (tmp_path / "c.toml").write_text(f'[server]\nmodels_dirs = ["{empty}"]\n')
    for args in (["--models-dir", str(empty), "--no-builtin-models"], ["--config", str(tmp_path / "c.toml")]):
        with Daemon(*args, env=env) as d:
            assert d.models() == {}


def test_a_pull_downloads_without_loading_and_delete_removes_the_files(
        remote: tuple[Daemon, Path], hub: FileServer) -> None:
    d, cache = remote
    path = cache / "hf" / "org" / "tiny" / "main" / "pulled.gguf"
    with httpx.Client(base_url=d.url, timeout=30) as c, c.stream("GET", "/models/sse") as r:
        feed = events(r)
        next(feed)
        pulled = c.post("/models/pull", json={"model": "pulled", "wait": True})
        assert pulled.status_code == 200, pulled.text
        assert pulled.json()["cache"] == {"path": str(path), "bytes": path.stat().st_size + len(
            path.with_name("pulled.gguf.meta.json").read_bytes()), "complete": True}
        seen = []
        for e in feed:
            seen.append(e)
            if e.get("model") == "pulled" and e["event"] == "download_finished":
                break
        assert [e["event"] for e in seen if e.get("model") == "pulled"][-2:] == [
            "download_progress", "download_finished"]
        assert d.models()["pulled"]["status"]["value"] == "unloaded"  # pulled, not loaded
        assert c.post("/models/pull", json={"model": "pulled", "wait": True}).status_code == 200
        assert complete(d, "pulled").status_code == 200
        assert len(hub.seen("/org/tiny/resolve/main/pulled.gguf")) == 1  # the cache served the rest

        refused = c.delete("/models", params={"model": "pulled"})
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "conflict"
        assert c.post("/models/unload", json={"model": "pulled"}).status_code == 200
        deleted = c.delete("/models", params={"model": "pulled"})
        assert deleted.status_code == 200 and str(path) in deleted.json()["removed"]
        for e in feed:
            if e.get("model") == "pulled" and e["event"] == "model_remove":
                assert e["data"]["bytes"] == deleted.json()["bytes"] > 0
                break
    assert not path.exists() and d.models()["pulled"]["cache"]["bytes"] == 0
    with d.client() as c:
        assert c.delete("/models", params={"model": "local"}).status_code == 400  # not ours to delete
        assert c.delete("/models", params={"model": "nope"}).status_code == 404
        assert c.delete("/models").status_code == 400
        assert c.post("/models/pull", json={"model": "local"}).status_code == 400
        failed = c.post("/models/pull", json={"model": "missing", "wait": True})
        assert failed.status_code == 503 and "HTTP 404" in failed.json()["error"]["message"]


def test_prune_removes_only_what_no_model_uses(remote: tuple[Daemon, Path]) -> None:
    d, cache = remote
    assert complete(d, "checked").status_code == 200  # its files stay
    strays = [cache / "hf" / "old" / "repo" / "main" / "old.gguf",
              cache / "https" / "h" / "0" / "x.gguf.part"]
    for p in strays:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * 100)
    for p in strays:  # downloads leave a sidecar beside what they fetched
        p.with_name(p.name.removesuffix(".part") + ".meta.json").write_text("{}")
    notes = [cache / "my-notes.txt", cache / "hf" / "notes.txt"]  # not ours: never touched
    for p in notes:
        p.write_text("keep me")
    busy = cache / "hf" / "old" / "repo" / "main" / "busy.gguf.part"
    busy.write_bytes(b"y" * 10)
    with open(busy.with_name("busy.gguf.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process is downloading it
        with d.client() as c:
            r = c.post("/models/prune")
    assert r.status_code == 200
    meta = [p.with_name(p.name.removesuffix(".part") + ".meta.json") for p in strays]
    assert sorted(r.json()["removed"]) == sorted(str(p) for p in [*strays, *meta])
    assert r.json()["bytes"] == 200 + 2 * 2 and all(p.read_text() == "keep me" for p in notes)
    assert busy.exists() and not (cache / "https" / "h").exists()  # emptied folders go too
    assert (cache / "hf" / "org" / "tiny" / "main" / "checked.gguf").is_file()


def test_modelherd_pull_shows_progress_and_prints_the_path(
        tmp_path: Path, hub: FileServer, models_dir: Path, isolated_env: dict[str, str]) -> None:
    hub.add("/org/cli/resolve/main/cli.gguf", (models_dir / "tiny-a.gguf").read_bytes())
    env = {**isolated_env, "HF_ENDPOINT": hub.url, "PATH": "/usr/bin"}
    repo = Path(__file__).parent.parent

    def pull(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "router", "pull", *args, "--cache-dir", str(tmp_path)],
                              capture_output=True, text=True, timeout=120, env=env, cwd=repo)

    done = pull("hf://org/cli/cli.gguf")
    assert done.returncode == 0, done.stderr
    target = tmp_path / "hf" / "org" / "cli" / "main" / "cli.gguf"
    assert done.stdout.strip() == str(target) and target.is_file()
    assert "cli.gguf: 100.0%" in done.stderr
    missing = pull("hf://org/cli/missing.gguf")
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr
    assert pull("no-such-model").returncode == 2


def test_two_pulls_make_one_download_and_delete_waits_for_it(remote: tuple[Daemon, Path],
                                                             hub: FileServer) -> None:
    d, cache = remote
    lock = cache / "hf" / "org" / "tiny" / "main" / "twice.gguf.lock"
    results: list[int] = []

    def pull() -> None:
        with d.client() as c:
            results.append(c.post("/models/pull", json={"model": "twice", "wait": True}).status_code)

    threads = [threading.Thread(target=pull) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200, 200] and len(hub.seen("/org/tiny/resolve/main/twice.gguf")) == 1
    with open(lock, "a") as held, d.client() as c:
        fcntl.flock(held, fcntl.LOCK_EX)  # another modelherd is downloading it
        busy = c.delete("/models", params={"model": "twice"})
    assert busy.status_code == 409 and "being downloaded" in busy.json()["error"]["message"]
    with d.client() as c:
        assert c.delete("/models", params={"model": "twice"}).status_code == 200
    assert lock.exists()  # a lock file stays: someone may be waiting on it


def test_a_download_is_held_to_the_load_timeout_only_while_it_stalls(
        tmp_path: Path, hub: FileServer, models_dir: Path, isolated_env: dict[str, str]) -> None:
    # About 8 chunks 0.4 s apart: 3 s in all, against a 1.5 s load timeout.
    gguf = (models_dir / "tiny-a.gguf").read_bytes()
    hub.add("/org/tiny/resolve/main/crawl.gguf", gguf, chunk_delay=0.4)
    hub.add("/org/tiny/resolve/main/stuck.gguf", gguf, chunk_delay=600)
    (tmp_path / "c.toml").write_text(f"""
[server]
models_dirs = []
cache_dir = "{tmp_path / 'cache'}"
load_timeout = 1.5

[models.crawl]
source = "hf://org/tiny/crawl.gguf"

[models.stuck]
source = "hf://org/tiny/stuck.gguf"
""")
    with Daemon("--config", str(tmp_path / "c.toml"), env={**isolated_env, "HF_ENDPOINT": hub.url}) as d:
        assert complete(d, "crawl").status_code == 200
        stuck = complete(d, "stuck")  # one chunk, then nothing
        assert stuck.status_code == 503 and "stalled" in stuck.json()["error"]["message"]


def test_a_stalled_pull_does_not_hold_up_the_daemons_stop(
        tmp_path: Path, hub: FileServer, models_dir: Path, isolated_env: dict[str, str]) -> None:
    hub.add("/org/tiny/resolve/main/stall.gguf", (models_dir / "tiny-a.gguf").read_bytes(), chunk_delay=600)
    (tmp_path / "c.toml").write_text(f"""
[server]
models_dirs = []
cache_dir = "{tmp_path / 'cache'}"

[models.stall]
source = "hf://org/tiny/stall.gguf"
""")
    d = Daemon("--config", str(tmp_path / "c.toml"), env={**isolated_env, "HF_ENDPOINT": hub.url}).start()
    try:
        mark = d.mark()
        with d.client() as c:
            assert c.post("/models/pull", json={"model": "stall"}).status_code == 200
        part = tmp_path / "cache" / "hf" / "org" / "tiny" / "main" / "stall.gguf.part"
        d.wait_until(lambda: part.exists() and part.stat().st_size > 0, "the pull got its first bytes")
        assert d.stop(timeout=20) == 0  # not the socket's 30 s timeout
        assert any("pulling stall failed" in line for line in d.lines[mark:])
        assert part.stat().st_size > 0  # kept for a resume
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()


def test_a_projector_source_downloads_beside_its_model(remote: tuple[Daemon, Path], hub: FileServer) -> None:
    d, cache = remote
    folder = cache / "hf" / "org" / "tiny" / "main"
    assert d.models()["vision"]["mmproj"] == str(folder / "mmproj-vision.gguf")
    assert complete(d, "vision").status_code == 200
    assert (folder / "mmproj-vision.gguf").read_bytes() == b"projector" * 1000
    with d.client() as c:
        assert c.post("/models/unload", json={"model": "vision"}).status_code == 200
        removed = c.delete("/models", params={"model": "vision"}).json()["removed"]
    assert str(folder / "mmproj-vision.gguf") in removed and str(folder / "vision.gguf") in removed
