"""Download one file into the cache: resumable, verified, shared between processes.

The bytes go to `<file>.part`. A later attempt (this process's retry, or a new
worker after a crash or an unload) asks for the rest with `Range` and `If-Range`
(the ETag, else Last-Modified, recorded when the download began). If the file
changed on the server, the server answers 200 with the whole file and we start
over. Timeouts, resets and 5xx answers are retried with exponential backoff up to
`attempts` times; a 4xx is final. When the whole file is there its sha256 is
checked (the configured one, else the hub's linked ETag when it is a sha256),
then it is renamed into place with a small metadata file beside it.

Two downloaders of the same file (two workers, two daemons) share it: the first
holds `<file>.lock` (flock) and the second waits for it, then finds the file there.

Failures say what failed in words: a server out of reach names its host and why (name
resolution, refused, timed out...), and a cache that cannot be written names the path and
the cause (no space left, read-only file system, permission denied). Those local causes
are final, and keep the `.part`: once the disk has room, the next attempt resumes it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from protocol.sources import LOCK, META, PART, PART_STATE, redact, sidecar

CHUNK = 1024 * 1024
TIMEOUT_S = 30.0
ATTEMPTS = 5
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 8.0
LOCK_POLL_S = 0.2
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# (downloaded bytes, total bytes or 0 when unknown)
Progress = Callable[[int, int], None]
# Called once a file is known to need downloading, with the bytes a .part already holds.
Started = Callable[[int], None]


class DownloadError(Exception):
    """A download failed for good; the message is fit for clients (URLs redacted)."""


class Unreachable(DownloadError):
    """No attempt reached the server: no connection, or no answer to the request."""

    def __init__(self, message: str, host: str) -> None:
        super().__init__(message)
        self.host = host


class Cancelled(Exception):
    """The download was cancelled (the model was unloaded); the .part stays."""


@dataclass(frozen=True)
class Fetched:
    path: Path
    size: int
    sha256: str
    downloaded: bool  # False: it was in the cache already


def fetch(url: str, dest: Path, *, sha256: str | None = None, token: str | None = None,
          progress: Progress, cancel: threading.Event, attempts: int = ATTEMPTS,
          timeout: float = TIMEOUT_S, backoff_first: float = BACKOFF_FIRST_S,
          started: Started | None = None) -> Fetched:
    with _on_disk(dest.parent):
        dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest, cancel):
        done = _cached(dest, sha256)
        if done is not None:
            return done  # no progress to report: nothing is downloaded
        if started is not None:
            part = sidecar(dest, PART)
            started(part.stat().st_size if part.exists() else 0)
        delay = backoff_first
        failed = 0
        while True:
            try:
                return _attempt(url, dest, sha256, token, progress, cancel, timeout)
            except _Retry as exc:
                # Attempts count in a row: one that got bytes through starts the count over.
                failed = 1 if exc.progressed else failed + 1
                if failed >= attempts:
                    if exc.unreached:
                        host = urlsplit(url).netloc.rpartition("@")[2]
                        raise Unreachable(f"cannot reach {host} ({exc}; {attempts} attempts in a row) "
                                          f"for {redact(url)}", host) from None
                    raise DownloadError(f"downloading {redact(url)} failed after {attempts} attempts "
                                        f"in a row: {exc}") from None
                if exc.progressed:
                    delay = backoff_first
                if cancel.wait(delay):  # the backoff, cut short by a cancel
                    raise Cancelled from None
                delay = min(delay * 2, BACKOFF_MAX_S)


class _Retry(Exception):
    """A failure worth another attempt: a timeout, a reset, a 5xx. `unreached`: the request
    got no answer at all (no connection, or the server said nothing)."""

    def __init__(self, message: str, progressed: bool = False, unreached: bool = False) -> None:
        super().__init__(message)
        self.progressed = progressed
        self.unreached = unreached


def _attempt(url: str, dest: Path, sha256: str | None, token: str | None, progress: Progress,
             cancel: threading.Event, timeout: float) -> Fetched:
    part = sidecar(dest, PART)
    state = _read_json(sidecar(dest, PART_STATE))
    offset = part.stat().st_size if part.exists() else 0
    validator = str(state.get("etag") or state.get("last_modified") or "")
    resume = {"Range": f"bytes={offset}-", "If-Range": validator} if offset and validator else {}
    redirects = _Redirects()
    try:
        response = open_url(url, token, timeout, resume, redirects)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416:  # the range is past the end: what we hold is not this file
            _discard(dest)
            raise _Retry("the server refused the resume (416); starting over") from None
        if exc.code >= 500:
            raise _Retry(f"HTTP {exc.code}") from None
        raise DownloadError(f"downloading {redact(url)} failed: HTTP {exc.code} {exc.reason}"
                            f"{token_hint(exc.code)}") from None
    except http.client.InvalidURL:
        raise DownloadError(f"{redact(url)} is not a valid URL") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
        raise _Retry(describe(exc), unreached=True) from None
    with response:
        if response.status == 206:
            if _range_start(response) != offset:
                _discard(dest)
                raise _Retry("the server sent another range than asked; starting over")
            mode = "ab"
            digest = _hash_of(part)  # the bytes held; the rest is hashed as it arrives
        else:  # 200: a fresh download (no range asked, or the file changed: If-Range failed)
            offset, mode, digest = 0, "wb", hashlib.sha256()
        length = int(response.headers.get("Content-Length") or 0)
        if not length and not sha256:
            # A body that just ends cannot be told from a cut one: without a size or a
            # checksum, a truncated file would be cached as whole.
            raise DownloadError(f"{redact(url)}: the server gives no Content-Length; set the model's "
                                "sha256 so the download can be checked")
        total = offset + length if length else 0
        if total:
            _check_space(dest.parent, total - offset, url)
        validators = {"etag": response.headers.get("ETag"),
                      "last_modified": response.headers.get("Last-Modified")}
        with _on_disk(dest.parent):
            _write_json(sidecar(dest, PART_STATE), validators)
            # Unbuffered: a failed write is this chunk's, not a later flush's.
            out = open(part, mode, buffering=0)
        # The hub sends the sha256 of a large file as X-Linked-Etag on its redirect to the CDN.
        linked = (response.headers.get("X-Linked-Etag") or redirects.linked_etag or "").strip('"')
        done = offset
        progress(done, total)
        with out:
            while True:
                try:
                    chunk = response.read1(CHUNK)
                except (OSError, http.client.HTTPException) as exc:  # a reset, a timeout, TLS
                    raise _Retry(f"{describe(exc)} after {done} bytes", progressed=done > offset) from None
                if not chunk:
                    break
                with _on_disk(part):
                    _write_all(out, chunk)
                digest.update(chunk)
                done += len(chunk)
                progress(done, total)
                if cancel.is_set():
                    raise Cancelled
    if total and done != total:
        raise _Retry(f"the connection ended after {done} of {total} bytes", progressed=done > offset)
    expected = sha256 or (linked if _SHA256.match(linked) else None)
    got = digest.hexdigest()
    if expected and got != expected.lower():
        _discard(dest)
        raise DownloadError(f"{redact(url)}: checksum mismatch, expected sha256 {expected.lower()}, "
                            f"got {got}; the download was deleted")
    with _on_disk(dest):
        os.replace(part, dest)
        _write_json(sidecar(dest, META), {
            "source": redact(url), "size": done, "sha256": got, **validators, "completed": time.time()})
        sidecar(dest, PART_STATE).unlink(missing_ok=True)
    return Fetched(dest, done, got, True)


def _write_all(out: Any, chunk: bytes) -> None:
    """All of `chunk`: an unbuffered write may take part of it (a disk nearly full)."""
    view = memoryview(chunk)
    while view:
        view = view[out.write(view):]


def open_url(url: str, token: str | None, timeout: float, headers: dict[str, str] | None = None,
             redirects: urllib.request.HTTPRedirectHandler | None = None) -> Any:
    """A GET as modelherd makes it: its User-Agent, and the token as a bearer token that is
    not sent on to a redirect's host (the hub redirects downloads to a CDN)."""
    request = urllib.request.Request(url, headers={"User-Agent": "modelherd", **(headers or {})})
    if token:
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    return urllib.request.build_opener(redirects or urllib.request.HTTPRedirectHandler()).open(
        request, timeout=timeout)


def token_hint(code: int) -> str:
    if code in (401, 403):
        return " (for a gated or private Hugging Face model, set HF_TOKEN to a token with access)"
    return ""


def _cached(dest: Path, sha256: str | None) -> Fetched | None:
    meta = _read_json(sidecar(dest, META))
    if not dest.is_file() or not meta:
        return None
    size = dest.stat().st_size
    if meta.get("size") != size or (sha256 and meta.get("sha256") != sha256.lower()):
        return None  # changed since, or another checksum asked for: download it again
    return Fetched(dest, size, str(meta.get("sha256")), False)


@contextmanager
def _locked(dest: Path, cancel: threading.Event) -> Iterator[None]:
    with _on_disk(dest.parent):
        lock = open(sidecar(dest, LOCK), "a")
    with lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # Another process downloads it: wait, ready to give up on a cancel.
                if cancel.wait(LOCK_POLL_S):
                    raise Cancelled from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _range_start(response: http.client.HTTPResponse) -> int:
    m = re.match(r"bytes (\d+)-", response.headers.get("Content-Range") or "")
    return int(m.group(1)) if m else -1


def _check_space(folder: Path, need: int, url: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise DownloadError(f"not enough disk space for {redact(url)}: it needs {need} more bytes, "
                            f"{free} are free in {folder}")


def _hash_of(path: Path) -> Any:
    digest = hashlib.sha256()
    with _on_disk(path), open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest


def _discard(dest: Path) -> None:
    with _on_disk(dest.parent):
        sidecar(dest, PART).unlink(missing_ok=True)
        sidecar(dest, PART_STATE).unlink(missing_ok=True)


def _read_json(path: Path) -> dict[str, object]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_json(path: Path, value: dict[str, object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


# What a failed connection reads as, by errno. The exceptions' own text is not used: it
# may quote the URL (and its query string, which can hold a signature).
_NETWORK_ERRNO = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset by the server",
    errno.ECONNABORTED: "connection aborted",
    errno.ETIMEDOUT: "timed out",
    errno.ENETUNREACH: "network is unreachable",
    errno.EHOSTUNREACH: "no route to host",
    errno.ENETDOWN: "network is down",
    errno.EADDRNOTAVAIL: "no address to connect from",
    errno.EPIPE: "the server closed the connection",
}


def describe(exc: BaseException) -> str:
    """What went wrong with a connection or an answer, in words."""
    reason = getattr(exc, "reason", None)
    if isinstance(exc, urllib.error.URLError) and isinstance(reason, BaseException):
        return describe(reason)
    if isinstance(exc, socket.gaierror):  # no such name, or no DNS server answered (offline)
        return "name resolution failed"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "TLS certificate verification failed"
    if isinstance(exc, ssl.SSLError):
        return "TLS error"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(exc, http.client.IncompleteRead):
        return "the body ended early"
    if isinstance(exc, http.client.HTTPException):
        return f"an invalid HTTP answer ({type(exc).__name__})"
    if isinstance(exc, OSError) and exc.errno:
        return _NETWORK_ERRNO.get(exc.errno) or os.strerror(exc.errno).lower()
    return type(exc).__name__


# A cache that cannot be written, by errno: local causes, fixed on this machine.
_DISK_ERRNO = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


@contextmanager
def _on_disk(path: Path) -> Iterator[None]:
    """Turn a file system error about `path` into a DownloadError that says what and where."""
    try:
        yield
    except OSError as exc:
        raise local_error(exc, path) from None


def local_error(exc: OSError, path: Path) -> DownloadError:
    where = exc.filename if isinstance(exc.filename, str) else str(path)
    cause = _DISK_ERRNO.get(exc.errno or 0) or (os.strerror(exc.errno).lower() if exc.errno else
                                                type(exc).__name__)
    message = f"cannot write {where}: {cause}"
    if path.name.endswith(PART) and path.exists() and path.stat().st_size:
        message += (f"; the {path.stat().st_size} bytes downloaded so far stay in {path.name}, and the "
                    "next attempt resumes from there")
    return DownloadError(message)


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects as urllib does, keeping the hub's X-Linked-Etag from the way."""

    linked_etag: str | None = None

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        self.linked_etag = headers.get("X-Linked-Etag") or self.linked_etag
        return super().redirect_request(req, fp, code, msg, headers, newurl)
