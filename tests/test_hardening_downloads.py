"""A failed download says why in words: a full disk, a read-only or forbidden cache dir
(with the path, the partial download kept to resume), a hub out of reach; and the event
feed shows `downloading` then `download_failed` even when no byte ever arrived.

Disks are real: a 1 MiB tmpfs filled while the download runs, a read-only bind mount, a
directory the process may not write (as root: with its effective uid dropped to nobody).
The first two need root and mount(8); without them they are skipped."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import subprocess
import threading
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.daemon import Daemon
from tests.fileserver import FileServer, file_server
from tests.test_model_events import events, until
from worker.fetch import DownloadError, fetch

BODY = os.urandom(600_000)  # several 64 KiB chunks on the wire; fits the 1 MiB file system
NEVER = threading.Event()
NOBODY = 65534


@pytest.fixture
def server() -> Iterator[FileServer]:
    with file_server() as s:
        yield s


def _mount(*args: str) -> bool:
    return os.geteuid() == 0 and subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def small_fs(short_dir: Path) -> Iterator[Path]:
    """A real 1 MiB file system (tmpfs)."""
    mnt = short_dir / "small"
    mnt.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)):
        pytest.skip("needs root and mount(8) for a small real file system")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.fixture
def read_only_dir(short_dir: Path) -> Iterator[Path]:
    """A directory on a read-only mount (a read-only bind mount of an empty one)."""
    (short_dir / "base").mkdir()
    mnt = short_dir / "ro"
    mnt.mkdir()
    if not _mount("--bind", "-o", "ro", str(short_dir / "base"), str(mnt)):
        pytest.skip("needs root and mount(8) for a read-only bind mount")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(fs: Path) -> None:
    """Write a filler file until the file system has no room left."""
    with open(fs / "filler", "wb", buffering=0) as f:
        for block in (65536, 4096, 512, 1):
            try:
                while True:
                    f.write(b"\0" * block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc


def test_a_full_disk_says_so_and_the_next_attempt_resumes_the_part(server: FileServer,
                                                                   small_fs: Path) -> None:
    server.add("/m.gguf", BODY, chunk_delay=0.01)  # 64 KiB per read: the disk fills between two
    dest = small_fs / "hf" / "org" / "m.gguf"

    def on_progress(done: int, total: int) -> None:
        if done > 0 and not (small_fs / "filler").exists():
            fill(small_fs)  # another program took the rest of the disk meanwhile

    with pytest.raises(DownloadError) as info:
        fetch(server.url + "/m.gguf", dest, progress=on_progress, cancel=NEVER)
    message = str(info.value)
    part = dest.with_name("m.gguf.part")
    assert "no space left" in message and str(dest.parent) in message, message
    assert "OSError" not in message
    held = part.stat().st_size
    assert 0 < held < len(BODY)  # kept: the cause is local, the bytes are good
    assert str(part) in message and "resume" in message

    (small_fs / "filler").unlink()
    server.files["/m.gguf"].chunk_delay = 0
    got = fetch(server.url + "/m.gguf", dest, progress=lambda d, t: None, cancel=NEVER)
    assert got.sha256 == hashlib.sha256(BODY).hexdigest()
    assert server.seen("/m.gguf")[-1].headers["range"] == f"bytes={held}-"


def test_a_read_only_cache_says_so_with_the_path(server: FileServer, read_only_dir: Path) -> None:
    server.add("/m.gguf", BODY)
    with pytest.raises(DownloadError) as info:
        fetch(server.url + "/m.gguf", read_only_dir / "hf" / "m.gguf", progress=lambda d, t: None,
              cancel=NEVER)
    message = str(info.value)
    assert "read-only file system" in message and str(read_only_dir / "hf") in message, message
    assert not server.seen("/m.gguf")  # nothing asked of the network for a cache it cannot write


def test_a_cache_dir_it_may_not_write_says_permission_denied(server: FileServer, short_dir: Path) -> None:
    server.add("/m.gguf", BODY)
    cache = short_dir / "cache"
    cache.mkdir()
    short_dir.chmod(0o755)
    cache.chmod(0o755 if os.geteuid() == 0 else 0o555)
    dest = cache / "hf" / "m.gguf"
    root = os.geteuid() == 0
    if root:
        os.seteuid(NOBODY)  # root may write anywhere: be another user for the attempt
    try:
        with pytest.raises(DownloadError) as info:
            fetch(server.url + "/m.gguf", dest, progress=lambda d, t: None, cancel=NEVER)
    finally:
        if root:
            os.seteuid(0)
        cache.chmod(0o755)
    message = str(info.value)
    assert "permission denied" in message and str(dest.parent) in message, message


def test_connection_errors_are_said_in_words() -> None:
    from worker.fetch import describe  # what a failed connection reads as

    assert describe(urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))) == (
        "name resolution failed")
    assert describe(urllib.error.URLError(ConnectionRefusedError(111, "x"))) == "connection refused"
    assert describe(urllib.error.URLError(TimeoutError())) == "timed out"
    assert describe(urllib.error.URLError(OSError(errno.ENETUNREACH, "x"))) == "network is unreachable"


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting is refused, and nothing else can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_an_unreachable_server_is_named_with_the_reason(closed_port: int, tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as info:
        fetch(f"http://127.0.0.1:{closed_port}/m.gguf", tmp_path / "m.gguf", progress=lambda d, t: None,
              cancel=NEVER, attempts=2, backoff_first=0.01)
    message = str(info.value)
    assert f"cannot reach 127.0.0.1:{closed_port} (connection refused" in message, message
    assert "URLError" not in message and "111" not in message


def test_first_run_without_a_route_to_the_hub_shows_downloading_then_why_it_failed(
        tmp_path: Path, closed_port: int, isolated_env: dict[str, str]) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f"""
[server]
models_dirs = []
cache_dir = "{tmp_path / 'cache'}"

[models.hub]
source = "hf://org/tiny/tiny.gguf"
""")
    env = {**isolated_env, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port}"}
    with Daemon("--config", str(config), env=env) as d, httpx.Client(base_url=d.url, timeout=60) as c, \
            c.stream("GET", "/models/sse") as r:
        feed = events(r)
        assert next(feed)["event"] == "snapshot"
        assert c.post("/models/load", json={"model": "hub"}).status_code == 200
        seen = until(feed, "hub", "failed")
    statuses = [e["data"]["status"] for e in seen if e["event"] == "status_change"]
    assert statuses[:2] == ["loading", "downloading"], seen
    assert [e["event"] for e in seen][-2:] == ["download_failed", "status_change"]
    message = seen[-1]["data"]["message"]
    assert f"cannot reach 127.0.0.1:{closed_port} (connection refused" in message, message
    assert "models dir" in message and "HF_ENDPOINT" in message and "URLError" not in message
