"""Model sources and where their files live in the cache. Pure: no I/O.

A source is a local path, an `https://` URL (plain `http://` only for loopback hosts
or when allowed), or `hf://org/repo/path/file.gguf[@revision]` (a file) or
`hf://org/repo[@revision]` (an MLX folder: the files it needs). The router and the
worker both derive the cache layout from the source alone, so /models can say where
a model's files are before anything is downloaded.

No part of the layout is taken unchecked from the source: every path component
must be a plain name (letters, digits, `._-+`; not `.` or `..`; no percent escapes),
and URLs are keyed by a digest, not by their path.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from pathlib import PurePath, PurePosixPath
from typing import TypeVar
from urllib.parse import quote, unquote, urlsplit

# The files a download keeps beside NAME: worker.fetch writes them, router.cachefiles
# reads them. NAME.part (and its validators) while incomplete, NAME.meta.json once whole
# (a whole MLX folder gets one too), NAME.lock while someone downloads it.
PART, PART_STATE, META, LOCK = ".part", ".part.json", ".meta.json", ".lock"
SIDECARS = (PART, PART_STATE, META, LOCK)
_P = TypeVar("_P", bound=PurePath)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
DEFAULT_REVISION = "main"


class SourceError(ValueError):
    """The source cannot be used; the message says why (never with a token or a query)."""


@dataclass(frozen=True)
class Remote:
    """A source to download: one file, or an MLX folder (`file` is None) from the hub."""

    kind: str  # "https" | "hf"
    text: str  # as written, redacted
    url: str = ""  # https: the full URL (query kept: it may be what authorises the download)
    repo: str = ""  # hf: "org/repo"
    file: str | None = None  # hf: the path in the repo; None for a folder
    revision: str = DEFAULT_REVISION

    @property
    def is_folder(self) -> bool:
        return self.kind == "hf" and self.file is None


def is_remote(text: str) -> bool:
    return text.startswith(("hf://", "https://", "http://"))


def parse(text: str, allow_insecure_http: bool = False) -> Remote:
    """A remote source, checked; raises SourceError."""
    if text.startswith("hf://"):
        return _parse_hf(text)
    if text.startswith(("https://", "http://")):
        return _parse_url(text, allow_insecure_http)
    raise SourceError(f"{redact(text)!r} is not a remote source (hf:// or https://)")


def _parse_hf(text: str) -> Remote:
    rest = text[len("hf://"):]
    rest, _, revision = rest.partition("@")
    revision = revision or DEFAULT_REVISION
    parts = rest.split("/")
    if len(parts) < 2 or not all(parts):
        raise SourceError(f"{text!r}: expected hf://org/repo[/path/file][@revision]")
    for part in [*parts, *revision.split("/")]:
        _check_name(part, text)
    file = "/".join(parts[2:]) or None
    return Remote("hf", text, repo="/".join(parts[:2]), file=file, revision=revision)


def _parse_url(text: str, allow_insecure_http: bool) -> Remote:
    try:
        url = urlsplit(text)
        host = url.hostname or ""
        url.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise SourceError(f"{redact(text)!r} is not a valid URL: {exc}") from None
    if not host:
        raise SourceError(f"{redact(text)!r} has no host")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in text):
        raise SourceError(f"{redact(text)!r}: spaces and control characters must be percent-encoded")
    if url.username or url.password:
        raise SourceError(f"{redact(text)!r}: credentials in the URL are not accepted; "
                          "use HF_TOKEN or a signed query")
    if url.scheme == "http" and not allow_insecure_http and not _loopback(host):
        raise SourceError(f"{redact(text)!r}: plain http:// is only for loopback hosts "
                          "(set allow_insecure_http = true to allow it)")
    return Remote("https", redact(text), url=text)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_name(part: str, text: str) -> None:
    if part in (".", "..") or unquote(part) != part or not _NAME.match(part):
        raise SourceError(f"{redact(text)!r}: {part!r} is not allowed in a source "
                          "(plain names only: letters, digits, ._+-)")


def sidecar(path: _P, suffix: str) -> _P:
    return path.with_name(path.name + suffix)


def check_relative(path: str, where: str) -> str:
    """A relative path made only of plain names (a file a hub listing named)."""
    for part in path.split("/"):
        _check_name(part, where)
    return path


def hf_url(endpoint: str, remote: Remote, file: str) -> str:
    return f"{endpoint.rstrip('/')}/{remote.repo}/resolve/{quote(remote.revision, safe='')}/{file}"


def cache_path(cache_dir: str, remote: Remote) -> PurePosixPath:
    """The file (or, for an MLX folder, the folder) a remote source is cached as."""
    root = PurePosixPath(cache_dir)
    if remote.kind == "hf":
        base = root / "hf" / remote.repo / remote.revision.replace("/", "--")
        return base / remote.file if remote.file else base
    url = urlsplit(remote.url)
    name = PurePosixPath(unquote(url.path)).name
    if not _NAME.match(name) or name in (".", ".."):
        name = "download"
    digest = hashlib.sha256(remote.url.encode()).hexdigest()[:16]
    return root / "https" / _host_dir(url.hostname or "host", url.port) / digest / name


def _host_dir(host: str, port: int | None) -> str:
    safe = re.sub(r"[^A-Za-z0-9.-]", "_", host)
    return f"{safe}_{port}" if port else safe


def shard_names(file: str) -> list[str]:
    """Every shard of a split GGUF named by its first (or any) shard; else just `file`."""
    m = _SHARD.search(file)
    if not m:
        return [file]
    stem, total = file[: m.start()], int(m.group(2))
    return [f"{stem}-{i:05d}-of-{total:05d}.gguf" for i in range(1, total + 1)]


def redact(text: str) -> str:
    """A URL fit for logs, events and errors: no user info, query or fragment."""
    if "://" not in text:
        return text
    scheme, _, rest = text.partition("://")
    rest = rest.split("?", 1)[0].split("#", 1)[0]
    host, slash, path = rest.partition("/")
    return f"{scheme}://{host.rsplit('@', 1)[-1]}{slash}{path}"  # the host as written
