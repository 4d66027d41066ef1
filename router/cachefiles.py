"""The download cache on disk: what a model's files are, how big, removing them, and
pruning what no configured model uses. Blocking (stat, unlink): call off the loop.

A downloaded file `NAME` has sidecars: `NAME.part` and `NAME.part.json` while it is
incomplete, `NAME.meta.json` once it is whole, `NAME.lock` while someone downloads
it. An MLX model is a folder of such files.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from protocol.sources import shard_names
from router.catalog import ModelEntry

SIDECARS = (".part", ".part.json", ".meta.json", ".lock")


@dataclass(frozen=True)
class CacheInfo:
    path: str
    bytes: int
    complete: bool

    def json(self) -> dict[str, object]:
        return {"path": self.path, "bytes": self.bytes, "complete": self.complete}


def main_files(entry: ModelEntry) -> list[Path]:
    """The files a downloaded model's load needs (every shard of a split GGUF)."""
    if entry.worker.download is None:
        return []
    if entry.backend == "mlx":
        return [entry.path]
    return [entry.path.with_name(name) for name in shard_names(entry.path.name)]


def info(entry: ModelEntry) -> CacheInfo | None:
    if entry.worker.download is None:
        return None
    size = sum(_size(p) for p in _all_files(entry))
    complete = all(_complete(p) for p in main_files(entry))
    return CacheInfo(str(entry.path), size, complete)


class Busy(Exception):
    """Someone downloads these files right now."""


def remove(entry: ModelEntry) -> tuple[list[str], int]:
    """Delete a downloaded model's files and sidecars; (what was removed, bytes freed)."""
    bases = main_files(entry) if entry.backend != "mlx" else [_base(p) for p in _all_files(entry)]
    if any(_locked(base) for base in bases):
        raise Busy(f"model {entry.name!r}: its files are being downloaded (by a pull, a load, or "
                   "another modelherd); try again when that is done")
    removed, freed = [], 0
    for path in _all_files(entry):
        if path.is_symlink() or path.is_file():
            freed += _size(path)
            path.unlink(missing_ok=True)
            removed.append(str(path))
    if entry.backend == "mlx" and entry.path.is_dir():
        shutil.rmtree(entry.path, ignore_errors=True)
    return removed, freed


def prune(cache_dir: Path, entries: list[ModelEntry]) -> tuple[list[str], int]:
    """Delete cached files that none of `entries` uses; files being downloaded stay."""
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
    for root, dirs, files in os.walk(cache_dir, topdown=False):  # symlinked dirs are not entered
        here = Path(root)
        for name in files:
            path = here / name
            base = _base(path)
            if base in keep or any(d == base or d in base.parents for d in keep_dirs):
                continue
            if _locked(base):
                continue  # a download is under way: not ours to take
            freed += _size(path)
            path.unlink(missing_ok=True)
            removed.append(str(path))
        for name in dirs:
            with contextlib.suppress(OSError):
                (here / name).rmdir()  # only when empty
    return sorted(removed), freed


def _all_files(entry: ModelEntry) -> list[Path]:
    if entry.backend == "mlx":
        return sorted(p for p in entry.path.rglob("*") if p.is_file()) if entry.path.is_dir() else []
    return [p.with_name(p.name + s) for p in main_files(entry) for s in ("", *SIDECARS)]


def _complete(path: Path) -> bool:
    if path.is_dir():  # an MLX folder: whole when no file in it is still partial
        files = list(path.rglob("*"))
        return any(p.name.endswith(".meta.json") for p in files) and not any(
            p.name.endswith(".part") for p in files)
    return path.is_file() and path.with_name(path.name + ".meta.json").is_file()


def _base(path: Path) -> Path:
    for suffix in SIDECARS:
        if path.name.endswith(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path


def _locked(base: Path) -> bool:
    lock = base.with_name(base.name + ".lock")
    if not lock.is_file():
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except OSError:
        return 0
