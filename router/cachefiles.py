"""The download cache on disk: what a model's files are, how big, removing them, and
pruning what no configured model uses. Blocking (stat, unlink): call off the loop.

A downloaded file has sidecars (protocol.sources.SIDECARS): a partial download and its
validators, a metadata file once it is whole, a lock file. An MLX model is a folder of
such files, with a metadata file of its own once whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import msgspec

from protocol.sources import LOCK, META, SIDECARS, shard_names, sidecar
from router.catalog import ModelEntry


class CacheInfo(msgspec.Struct, frozen=True):
    """A download's files in the cache, as /models shows them."""

    path: str
    bytes: int
    complete: bool


def main_files(entry: ModelEntry) -> list[Path]:
    """The files a downloaded model's load needs (every shard of a split GGUF)."""
    if entry.worker.download is None:
        return []
    if entry.backend == "mlx":
        return [entry.path]
    files = [entry.path.with_name(name) for name in shard_names(entry.path.name)]
    if entry.worker.download.mmproj and entry.worker.mmproj:
        files.append(Path(entry.worker.mmproj))  # downloaded with the model
    return files


def info(entry: ModelEntry) -> CacheInfo | None:
    if entry.worker.download is None:
        return None
    size = sum(_size(p) for p in _all_files(entry))
    return CacheInfo(str(entry.path), size, all(_complete(p) for p in main_files(entry)))


class Busy(Exception):
    """Someone downloads these files right now."""


def remove(entry: ModelEntry) -> tuple[list[str], int]:
    """Delete a downloaded model's files and sidecars; (what was removed, bytes freed).

    The download locks of its files are held meanwhile, so a load that starts now waits
    and then fetches them again. The lock files themselves stay: deleting one under a
    process waiting on it would let two downloaders in."""
    bases = main_files(entry) if entry.backend != "mlx" else sorted(
        {_base(p) for p in _all_files(entry)} | {entry.path})
    with _holding(bases, entry.name):
        removed, freed = [], 0
        for path in _all_files(entry):
            if path.name.endswith(LOCK):
                continue
            if path.is_symlink() or path.is_file():
                freed += _size(path)
                path.unlink(missing_ok=True)
                removed.append(str(path))
    if entry.backend == "mlx":
        _prune_dirs(entry.path)
    return removed, freed


def prune(cache_dir: Path, entries: list[ModelEntry]) -> tuple[list[str], int]:
    """Delete downloaded files that none of `entries` uses. Only modelherd's own files are
    touched: under `hf/` and `https/`, with a download's sidecar; files being downloaded,
    and lock files, stay."""
    keep: set[Path] = set()
    keep_dirs: list[Path] = []
    for entry in entries:
        if entry.worker.download is None:
            continue
        if entry.backend == "mlx":
            keep_dirs.append(entry.path)
        else:
            keep |= set(main_files(entry))
    removed, freed = [], 0
    for top in (cache_dir / "hf", cache_dir / "https"):
        if top.is_symlink() or not top.is_dir():
            continue
        for root, _dirs, files in os.walk(top):  # symlinked dirs are not entered
            here = Path(root)
            for name in files:
                path = here / name
                base = _base(path)
                if path.name.endswith(LOCK) or base in keep or any(
                        d == base or d in base.parents for d in keep_dirs):
                    continue
                if not _ours(base) or _locked(base):
                    continue  # not a download's, or a download is under way
                freed += _size(path)
                path.unlink(missing_ok=True)
                removed.append(str(path))
        _prune_dirs(top, keep_top=True)
    return sorted(removed), freed


def _all_files(entry: ModelEntry) -> list[Path]:
    if entry.backend == "mlx":
        inside = sorted(p for p in entry.path.rglob("*") if p.is_file()) if entry.path.is_dir() else []
        return [*inside, sidecar(entry.path, META)]
    return [p for f in main_files(entry) for p in (f, *(sidecar(f, s) for s in SIDECARS))]


def _complete(path: Path) -> bool:
    """A file, or an MLX folder (whole once its own metadata file is written)."""
    return path.exists() and sidecar(path, META).is_file()


def _ours(base: Path) -> bool:
    """A download's file: some sidecar of it exists (a stray file is never ours to delete)."""
    return any(sidecar(base, s).exists() for s in SIDECARS)


def _base(path: Path) -> Path:
    for suffix in SIDECARS:
        if path.name.endswith(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path


@contextlib.contextmanager
def _holding(bases: list[Path], name: str) -> Iterator[None]:
    held = []
    try:
        for base in bases:
            lock = sidecar(base, LOCK)
            if not lock.is_file():
                continue
            f = open(lock, "a")  # closed below, after the deletes
            held.append(f)
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Busy(f"model {name!r}: its files are being downloaded (by a pull, a load, "
                           "or another modelherd); try again when that is done") from None
        yield
    finally:
        for f in held:
            f.close()  # closing releases the lock


def _locked(base: Path) -> bool:
    lock = sidecar(base, LOCK)
    if not lock.is_file():
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def _prune_dirs(top: Path, keep_top: bool = False) -> None:
    """Remove the empty folders under `top` (and `top` itself unless kept)."""
    if not top.is_dir() or top.is_symlink():
        return
    for root, dirs, _files in os.walk(top, topdown=False):
        for name in dirs:
            with contextlib.suppress(OSError):
                (Path(root) / name).rmdir()  # only when empty
    if not keep_top:
        with contextlib.suppress(OSError):
            top.rmdir()


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except OSError:
        return 0
