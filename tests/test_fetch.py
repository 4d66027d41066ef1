"""Downloads against a real HTTP server on loopback: resume, validators, checksums,
retries, cancels, the lock two downloaders share, redaction."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol.messages import Download
from protocol.sources import SourceError
from tests.fileserver import FileServer, file_server
from worker import fetch as fetch_module
from worker.download import plan
from worker.fetch import Cancelled, DownloadError, fetch

BODY = os.urandom(700_000) + b"end"  # several 64 KiB chunks on the wire, one 1 MiB read
NEVER = threading.Event()


@pytest.fixture
def server() -> Iterator[FileServer]:
    with file_server() as s:
        yield s


def get(server: FileServer, dest: Path, path: str = "/m.gguf",
        **kw: Any) -> tuple[Any, list[tuple[int, int]]]:
    seen: list[tuple[int, int]] = []
    kw.setdefault("backoff_first", 0.01)
    kw.setdefault("cancel", NEVER)
    got = fetch(server.url + path, dest, progress=lambda d, t: seen.append((d, t)), **kw)
    return got, seen


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_download_lands_whole_with_its_metadata_and_is_then_cached(server: FileServer,
                                                                      tmp_path: Path) -> None:
    server.add("/m.gguf", BODY)
    dest = tmp_path / "c" / "m.gguf"
    got, seen = get(server, dest)
    assert dest.read_bytes() == BODY and got.downloaded and got.sha256 == sha(BODY)
    assert seen[0] == (0, len(BODY)) and seen[-1] == (len(BODY), len(BODY))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    meta = json.loads((tmp_path / "c" / "m.gguf.meta.json").read_text())
    assert meta["size"] == len(BODY) and meta["sha256"] == sha(BODY) and meta["etag"] == '"v1"'
    assert meta["source"] == server.url + "/m.gguf" and meta["completed"] > 0
    assert sorted(p.name for p in dest.parent.iterdir()) == ["m.gguf", "m.gguf.lock", "m.gguf.meta.json"]
    again, _ = get(server, dest)
    assert not again.downloaded and len(server.seen("/m.gguf")) == 1


def test_a_cut_connection_resumes_from_the_part_with_range_and_if_range(server: FileServer,
                                                                         tmp_path: Path) -> None:
    server.add("/m.gguf", BODY, cut_at=len(BODY) // 2)
    got, _ = get(server, tmp_path / "m.gguf")
    assert got.sha256 == sha(BODY)
    first, second = server.seen("/m.gguf")
    assert "range" not in first.headers
    start = int(second.headers["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= len(BODY) // 2 and second.headers["if-range"] == '"v1"'


def test_a_changed_file_restarts_instead_of_resuming(server: FileServer, tmp_path: Path) -> None:
    served = server.add("/m.gguf", BODY, cut_at=300_000)
    with pytest.raises(DownloadError, match="after 1 attempts"):
        get(server, tmp_path / "m.gguf", attempts=1)
    assert (tmp_path / "m.gguf.part").stat().st_size > 0
    served.body, served.etag = b"new" + BODY, '"v2"'  # replaced upstream meanwhile
    got, _ = get(server, tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == b"new" + BODY and got.sha256 == sha(b"new" + BODY)
    assert server.seen("/m.gguf")[-1].headers["if-range"] == '"v1"'  # asked to resume; got it all


@pytest.mark.parametrize("linked", [False, True])
def test_a_bad_checksum_fails_and_leaves_no_file(server: FileServer, tmp_path: Path, linked: bool) -> None:
    wrong = sha(b"something else")
    server.add("/m.gguf", BODY, linked_etag=f'"{wrong}"' if linked else None)
    with pytest.raises(DownloadError) as info:
        get(server, tmp_path / "m.gguf", sha256=None if linked else wrong)
    assert wrong in str(info.value) and sha(BODY) in str(info.value)  # both hashes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf.lock"]


def test_the_hubs_linked_etag_is_checked_when_it_is_a_sha256(server: FileServer, tmp_path: Path) -> None:
    server.add("/m.gguf", BODY, linked_etag=f'"{sha(BODY)}"')
    assert get(server, tmp_path / "m.gguf")[0].sha256 == sha(BODY)


def test_a_404_fails_at_once_and_a_500_is_retried(server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        get(server, tmp_path / "missing.gguf", path="/missing.gguf")
    assert len(server.seen("/missing.gguf")) == 1
    server.add("/m.gguf", BODY, statuses=[500, 503])
    assert get(server, tmp_path / "m.gguf")[0].sha256 == sha(BODY)
    assert len(server.seen("/m.gguf")) == 3
    server.add("/down.gguf", BODY, statuses=[500] * 3)
    with pytest.raises(DownloadError, match="failed after 3 attempts in a row: HTTP 500"):
        get(server, tmp_path / "down.gguf", path="/down.gguf", attempts=3)


def test_a_refused_token_says_to_set_hf_token_and_nothing_leaks(server: FileServer, tmp_path: Path) -> None:
    server.add("/m.gguf", BODY, statuses=[401])
    with pytest.raises(DownloadError) as info:
        get(server, tmp_path / "m.gguf", path="/m.gguf?sig=secret-sig", token="hf_secret_token")
    message = str(info.value)
    assert "HTTP 401" in message and "HF_TOKEN" in message
    assert "secret" not in message and server.url + "/m.gguf" in message
    assert server.seen("/m.gguf")[0].headers["authorization"] == "Bearer hf_secret_token"


def test_a_cancel_keeps_the_part_and_the_next_download_resumes(server: FileServer,
                                                                tmp_path: Path) -> None:
    server.add("/m.gguf", BODY, chunk_delay=0.05)
    cancel = threading.Event()

    def on_progress(done: int, total: int) -> None:
        if done > 0:
            cancel.set()  # the model was unloaded while it downloaded

    with pytest.raises(Cancelled):
        fetch(server.url + "/m.gguf", tmp_path / "m.gguf", progress=on_progress, cancel=cancel)
    held = (tmp_path / "m.gguf.part").stat().st_size
    assert 0 < held < len(BODY) and not (tmp_path / "m.gguf").exists()
    server.files["/m.gguf"].chunk_delay = 0
    assert get(server, tmp_path / "m.gguf")[0].sha256 == sha(BODY)
    assert server.seen("/m.gguf")[-1].headers["range"] == f"bytes={held}-"


def test_two_downloaders_of_one_file_share_one_download(server: FileServer, tmp_path: Path) -> None:
    server.add("/m.gguf", BODY, chunk_delay=0.02)
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(get(server, tmp_path / "m.gguf")[0]))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(r.downloaded for r in results) == [False, True]
    assert len(server.seen("/m.gguf")) == 1 and (tmp_path / "m.gguf").read_bytes() == BODY


class FakeUsage:
    def __init__(self, free: int) -> None:
        self.free = free


def test_too_little_disk_space_fails_before_writing(server: FileServer, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    server.add("/m.gguf", BODY)
    monkeypatch.setattr(fetch_module.shutil, "disk_usage", lambda _: FakeUsage(free=1000))
    with pytest.raises(DownloadError, match="not enough disk space"):
        get(server, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf.part").exists() or (tmp_path / "m.gguf.part").stat().st_size == 0


def test_a_split_gguf_plans_every_shard_beside_the_first(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    planned = plan(Download("hf://org/r/sub/m-00001-of-00003.gguf@v2", str(tmp_path), sha256="a" * 64), None)
    assert [p.url for p in planned] == [f"http://127.0.0.1:9/org/r/resolve/v2/sub/m-0000{i}-of-00003.gguf"
                                        for i in (1, 2, 3)]
    assert {p.dest.parent for p in planned} == {tmp_path / "hf" / "org" / "r" / "v2" / "sub"}
    assert {p.sha256 for p in planned} == {None}  # one checksum cannot name three files
    single = plan(Download("hf://org/r/m.gguf", str(tmp_path), sha256="b" * 64), None)
    assert [(p.dest.name, p.sha256) for p in single] == [("m.gguf", "b" * 64)]


def test_names_from_a_hub_listing_are_checked_before_they_become_paths(
        server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server.add_tree("org/evil", "main", {"../../escape.json": b"{}", "model.safetensors": b"x"})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    with pytest.raises(SourceError, match="not allowed"):
        plan(Download("hf://org/evil", str(tmp_path)), None)


def test_a_cancel_cuts_the_backoff_short(server: FileServer, tmp_path: Path) -> None:
    server.add("/m.gguf", BODY, statuses=[500])
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):  # not after a minute's backoff
        fetch(server.url + "/m.gguf", tmp_path / "m.gguf", progress=lambda d, t: None, cancel=cancel,
              backoff_first=60)


def test_a_cached_file_is_fetched_again_for_another_checksum(server: FileServer, tmp_path: Path) -> None:
    server.add("/m.gguf", BODY)
    get(server, tmp_path / "m.gguf", sha256=sha(BODY))
    with pytest.raises(DownloadError, match="checksum mismatch"):
        get(server, tmp_path / "m.gguf", sha256=sha(b"another"))
    assert len(server.seen("/m.gguf")) == 2


def test_a_body_of_unknown_length_needs_a_checksum(server: FileServer, tmp_path: Path) -> None:
    server.add("/m.gguf", BODY, no_length=True)
    with pytest.raises(DownloadError, match="no Content-Length; set the model's sha256"):
        get(server, tmp_path / "m.gguf")
    assert get(server, tmp_path / "m.gguf", sha256=sha(BODY))[0].size == len(BODY)
