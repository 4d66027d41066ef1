"""Fetching a model into the cache: the source resolved into files, each downloaded by
worker.fetch, progress measured as it goes.

`run` is the body of a download thread. It reports through a queue: DownloadProgress
messages, then one Outcome. The first report goes out as soon as a file is known to need
downloading, before any byte arrives, so a download that cannot even start (no route to
the hub) still shows as `downloading`, then failed. `relay` runs it and passes the progress
on (throttled) as protocol messages while its caller listens for a cancel: a worker before
its load (a Shutdown cancels), or `pull`, a process of its own for POST /models/pull and
`modelherd pull`.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from multiprocessing.connection import Connection
from pathlib import Path
from urllib.parse import quote, urlsplit

import msgspec

from protocol import sources
from protocol.errors import ErrorKind
from protocol.messages import Download, DownloadProgress, LoadFailed
from worker.fetch import (
    Cancelled,
    DownloadError,
    Unreachable,
    describe,
    fetch,
    local_error,
    open_url,
    token_hint,
)

HF_ENDPOINT = "https://huggingface.co"
# What an MLX folder needs from its repo (mlx-lm's own list, without *.py: no remote code).
MLX_FILES = ("*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja")
LISTING_TIMEOUT_S = 30.0
PROGRESS_INTERVAL_S = 0.05


@dataclass(frozen=True)
class Planned:
    url: str
    dest: Path
    sha256: str | None
    hub: bool  # HF_TOKEN goes to the hub only, never to an https:// source's host


@dataclass(frozen=True)
class Outcome:
    error: str | None  # None: every file is in the cache
    cancelled: bool = False


Reports = queue.SimpleQueue["DownloadProgress | Outcome"]


def run(download: Download, out: Reports, cancel: threading.Event) -> None:
    token = os.environ.get("HF_TOKEN") or None

    def started(name: str) -> None:
        out.put(DownloadProgress(name, 0, 0, 0.0, None))

    try:
        planned = plan(download, token, started)
        for item in planned:
            try:
                _fetch_one(item, token if item.hub else None, out, cancel)
            except Unreachable as exc:
                raise DownloadError(f"{exc}; {hub_hint()}" if item.hub else str(exc)) from None
        _mark_folder(download, planned)
    except Cancelled:
        out.put(Outcome(None, cancelled=True))
    except (DownloadError, sources.SourceError) as exc:
        out.put(Outcome(str(exc)))
    except Exception as exc:  # a bug here must still end the load with a reason
        reason = describe(exc) if isinstance(exc, OSError) else type(exc).__name__  # its text may quote a URL
        out.put(Outcome(f"download failed: {reason}"))
    else:
        out.put(Outcome(None))


def hub_hint() -> str:
    """What to do when the hub is out of reach (a first run without network, a firewall)."""
    return (f"put the model's file in a models dir instead (by default {_default_models_dir()}; the "
            "daemon's log names the dirs it scans), or set HF_ENDPOINT to a mirror this machine can reach")


def _default_models_dir() -> Path:
    # router.config.default_models_dir's rule (the worker cannot import the router): systemd's
    # StateDirectory, else $XDG_DATA_HOME/modelherd/models.
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0]) / "models"
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "modelherd" / "models"


def plan(download: Download, token: str | None,
         started: Callable[[str], None] | None = None) -> list[Planned]:
    """The files to fetch. `started(name)` is called before the hub is asked for a repo's
    file list (the download has begun, though no file is known yet)."""
    planned = _plan_source(download, token, started)
    if download.mmproj is not None:
        projector = Download(download.mmproj, download.cache_dir, None, download.allow_insecure_http)
        planned += _plan_source(projector, token, started)
    return planned


def _plan_source(download: Download, token: str | None,
                 started: Callable[[str], None] | None = None) -> list[Planned]:
    remote = sources.parse(download.source, download.allow_insecure_http)
    target = Path(sources.cache_path(download.cache_dir, remote))
    if remote.kind == "https":
        return [Planned(remote.url, target, download.sha256, hub=False)]
    endpoint = os.environ.get("HF_ENDPOINT") or HF_ENDPOINT
    if remote.file is not None:
        names = sources.shard_names(remote.file)
        base = target.parent
        sha = download.sha256 if len(names) == 1 else None  # one checksum names one file
        return [Planned(sources.hf_url(endpoint, remote, n), base / Path(n).name, sha, hub=True)
                for n in names]
    if sources.sidecar(target, sources.META).is_file():
        return []  # fetched whole before: no need to ask the hub (which may be out of reach)
    if started is not None:
        started(remote.repo.rpartition("/")[2])
    names = [n for n in _hub_files(endpoint, remote, token) if any(fnmatch(n, p) for p in MLX_FILES)]
    if not any(n.endswith(".safetensors") for n in names):
        raise DownloadError(f"{remote.text}: the repo has no *.safetensors files to serve as an MLX model")
    return [Planned(sources.hf_url(endpoint, remote, n), target / n, None, hub=True) for n in names]


def _mark_folder(download: Download, planned: list[Planned]) -> None:
    """Record that a repo folder is whole, with the files it got."""
    remote = sources.parse(download.source, download.allow_insecure_http)
    if not remote.is_folder or not planned:
        return
    folder = Path(sources.cache_path(download.cache_dir, remote))
    meta = {"source": remote.text, "files": sorted(str(p.dest.relative_to(folder)) for p in planned),
            "completed": time.time()}
    done = sources.sidecar(folder, sources.META)
    tmp = sources.sidecar(done, ".tmp")
    try:
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, done)
    except OSError as exc:
        raise local_error(exc, folder) from None


def _hub_files(endpoint: str, remote: sources.Remote, token: str | None) -> list[str]:
    revision = quote(remote.revision, safe="")
    url = f"{endpoint.rstrip('/')}/api/models/{remote.repo}/tree/{revision}?recursive=true"
    try:
        with open_url(url, token, LISTING_TIMEOUT_S) as response:
            listing = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"listing {sources.redact(url)} failed: HTTP {exc.code}"
                            f"{token_hint(exc.code)}") from None
    except urllib.error.URLError as exc:  # no connection: nothing was answered
        host = urlsplit(url).netloc.rpartition("@")[2]
        raise DownloadError(f"cannot reach {host} ({describe(exc)}) for {sources.redact(url)}; "
                            f"{hub_hint()}") from None
    except ValueError:
        raise DownloadError(f"listing {sources.redact(url)} failed: the answer is not JSON") from None
    except (OSError, http.client.HTTPException) as exc:  # a timeout or a reset while it answered
        raise DownloadError(f"listing {sources.redact(url)} failed: {describe(exc)}") from None
    files = [e["path"] for e in listing if isinstance(e, dict) and e.get("type") == "file"]
    # Names from the network become paths on disk: plain names only.
    return [sources.check_relative(str(name), remote.text) for name in files]


def _fetch_one(item: Planned, token: str | None, out: Reports,
               cancel: threading.Event) -> None:
    started = time.monotonic()
    first: list[int] = []

    def progress(done: int, total: int) -> None:
        if not first:
            first.append(done)  # a resume starts part way: the rate counts what came now
        elapsed = time.monotonic() - started
        rate = (done - first[0]) / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if total and rate > 0 else None
        out.put(DownloadProgress(item.dest.name, done, total, rate, eta))

    def begun(held: int) -> None:  # not through `progress`: the rate starts at the first byte
        out.put(DownloadProgress(item.dest.name, held, 0, 0.0, None))

    fetch(item.url, item.dest, sha256=item.sha256, token=token, progress=progress, cancel=cancel,
          started=begun)


def relay(download: Download, send: Callable[[DownloadProgress], None],
          cancelled: Callable[[float], bool]) -> str | None:
    """Download on a thread and `send` its progress: each file's first report at once,
    then at most one per interval, and the last with `finished` once every file is there.
    `cancelled(wait_s)` waits up to `wait_s` and says whether to stop. Returns None when
    done, else why not (also when cancelled)."""
    cancel = threading.Event()
    events: Reports = queue.SimpleQueue()
    thread = threading.Thread(target=run, args=(download, events, cancel), name="download", daemon=True)
    thread.start()
    last: DownloadProgress | None = None
    unsent: DownloadProgress | None = None  # the newest report not sent yet: a stall sends nothing
    sent_at = 0.0
    while True:
        if cancel.is_set():
            thread.join(PROGRESS_INTERVAL_S)  # stopping: wait for the thread, not the caller
        elif cancelled(PROGRESS_INTERVAL_S):
            cancel.set()
        outcome = None
        while not events.empty():
            item = events.get()
            if isinstance(item, Outcome):
                outcome = item
                continue
            if last is None or last.file != item.file:  # each file's first report, as it is
                send(item)
                sent_at, unsent = time.monotonic(), None
            else:
                unsent = item
            last = item
        now = time.monotonic()
        done = outcome is not None and outcome.error is None and not outcome.cancelled
        report = unsent or (last if done else None)  # the last report of all carries `finished`
        if report is not None and (outcome is not None or now - sent_at >= PROGRESS_INTERVAL_S):
            send(msgspec.structs.replace(report, finished=done) if done else report)
            sent_at, unsent = now, None
        if outcome is not None:
            thread.join()
            return "cancelled" if outcome.cancelled else outcome.error


def pull(download: Download, conn: Connection) -> None:
    """A pull's own process: progress to `conn` as msgpack-encoded DownloadProgress, then a
    LoadFailed if it failed; anything arriving on `conn` (or its closing) cancels."""
    encode = msgspec.msgpack.Encoder().encode

    def cancelled(wait_s: float) -> bool:
        return bool(conn.poll(wait_s))

    failure = relay(download, lambda msg: conn.send_bytes(encode(msg)), cancelled)
    if failure is not None:
        conn.send_bytes(encode(LoadFailed(ErrorKind.LOAD_FAILED, failure)))
    conn.close()
