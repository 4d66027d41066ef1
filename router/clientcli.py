"""The client commands, against a running daemon: `ps`, `ls`, `load`, `unload`, `rm`, and
`pull` through the daemon (router.clientargs parses them and finds the daemon).

Tables go to stdout (plain columns, like `ollama ps`, easy to cut or awk; `--json` gives
the daemon's own JSON); progress bars and errors to stderr. A load or a pull follows
GET /models/sse for its bars, while the POST itself (`"wait": true`) says how it ended.
Exit codes (router.clientargs): 0 ok, 1 the operation failed, 2 usage or config error,
3 no daemon answers at the URL, 4 the key was refused (401) or may not do this (403).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import msgspec
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn
from rich.table import Table

from protocol.sources import is_remote, redact
from router.client import ClientError, Daemon, FeedLine
from router.clientargs import INTERRUPTED, OK, USAGE, Target, UsageError, target
from router.schema import DownloadEvent, FeedState, FileDone, ModelBody

T = TypeVar("T")

MIB = 1024 * 1024
HOLDING = ("loading", "downloading", "loaded", "unloading")  # what `ps` lists: a worker is there


def run(args: argparse.Namespace) -> int:
    """ps, ls, load, unload, rm."""
    try:
        where = target(args)
    except UsageError as exc:
        _error(str(exc))
        return USAGE
    commands = {"ps": _ps, "ls": _ls, "load": _load, "unload": _unload, "rm": _rm}
    code = _run(commands[args.command](where, args))
    assert code is not None  # only a pull falls back
    return code


def pull(args: argparse.Namespace) -> int:
    """Through the daemon when one answers; else (or with --local, or --cache-dir) here."""
    if args.local or args.cache_dir:
        return _local_pull(args)
    try:
        where = target(args)
    except UsageError as exc:
        _error(str(exc))
        return USAGE
    outcome: list[int | None] = []
    code = _run(_pull(where, args, outcome), fallback=not where.named)
    if code is not None:
        return code
    if outcome and outcome[0] is None:
        _error(f"no model of the daemon at {where.url} has the source {redact(args.what)}; "
               "downloading it here")
    else:
        _error(f"no daemon at {where.url}; downloading here")
    return _local_pull(args)


def _local_pull(args: argparse.Namespace) -> int:
    from router.pullcli import pull as local

    return local(args.what, args.config, args.cache_dir)


def _run(command: Coroutine[Any, Any, int | None], fallback: bool = False) -> int | None:
    """The command's exit code; None for `fallback` when no daemon answered."""
    try:
        return asyncio.run(command)
    except ClientError as exc:
        if fallback and exc.exit_code == 3:
            return None
        _error(exc.message)
        return exc.exit_code
    except KeyboardInterrupt:
        return INTERRUPTED


# ---- the commands ----------------------------------------------------------------------


async def _ps(where: Target, args: argparse.Namespace) -> int:
    async with Daemon(where.url, where.key) as d:
        models = [m for m in await d.models() if m.status.value in HOLDING]
    if args.json:
        return _json(models)
    table = _table("NAME", "STATE", "DEVICE", "MEMORY", "SLOTS", "RUNNING", "WAITING", "IDLE", "PID")
    for m in models:
        state = m.status.value
        if isinstance(m.status.progress, float) and state in ("loading", "downloading"):
            state += f" {m.status.progress:.0%}"
        slots = f"{m.slots.busy}/{m.slots.total}" if m.slots is not None else "-"
        memory = _size(m.memory.rss) if m.memory.rss else f"~{_size(m.memory.estimate)}"
        table.add_row(m.id, state, m.device or m.backend, memory, slots, str(m.in_flight - m.waiting),
                      str(m.waiting), _duration(m.idle_s), str(m.pid or "-"))
    _out().print(table)
    return OK


async def _ls(where: Target, args: argparse.Namespace) -> int:
    async with Daemon(where.url, where.key) as d:
        models = await d.models()
    if args.json:
        return _json(models)
    table = _table("NAME", "BACKEND", "SIZE", "CACHED", "STATE", "SOURCE")
    for m in models:
        if m.cache is None:
            cached = "local"
        else:
            cached = "yes" if m.cache.complete else "partial" if m.cache.bytes else "no"
        table.add_row(m.id, m.backend, _size(m.size) if m.size else "-", cached, m.status.value, m.source)
    _out().print(table)
    return OK


async def _load(where: Target, args: argparse.Namespace) -> int:
    async with Daemon(where.url, where.key) as d:
        model = _find(await d.models(), args.model, d.url)
        # Asked even when it is loaded: a user key gets its 403 whatever the model's state.
        async with d.feed() as events, _Bars(model.id) as bars:
            model = await bars.during(events, d.load(model.id))
    memory = f", {_size(model.memory.rss)} resident" if model.memory.rss else ""
    print(f"{model.id}: loaded on {model.device or model.backend} (pid {model.pid}{memory})")
    return OK


async def _unload(where: Target, args: argparse.Namespace) -> int:
    async with Daemon(where.url, where.key) as d:
        model = _find(await d.models(), args.model, d.url)
        await d.unload(model.id)
    print(f"{model.id}: unloaded")
    return OK


async def _rm(where: Target, args: argparse.Namespace) -> int:
    async with Daemon(where.url, where.key) as d:
        model = _find(await d.models(), args.model, d.url)
        removed = await d.remove(model.id)
    print(f"{model.id}: removed {len(removed.removed)} file(s), {_size(removed.bytes)} freed")
    return OK


async def _pull(where: Target, args: argparse.Namespace, outcome: list[int | None]) -> int | None:
    async with Daemon(where.url, where.key) as d:
        models = await d.models()
        model = _match(models, args.what)
        if model is None and is_remote(args.what):
            wanted = redact(args.what)
            model = next((m for m in models if m.source == wanted), None)
            if model is None:  # the daemon has no use for it: download it here, as before
                outcome.append(None)
                return None
        if model is None:
            raise ClientError(f"the daemon at {d.url} has no model {args.what!r}")
        async with d.feed() as events, _Bars(model.id) as bars:
            answer = await bars.during(events, d.pull(model.id))
    print(answer.cache.path if answer.cache is not None else model.path)
    return OK


# ---- progress bars ---------------------------------------------------------------------


class _Bars:
    """One bar per file downloaded and one for the load, fed by the model's events."""

    def __init__(self, model: str) -> None:
        self._model = model
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                  TextColumn("{task.fields[detail]}"), console=Console(stderr=True))
        self._tasks: dict[str, TaskID] = {}

    async def __aenter__(self) -> _Bars:
        self._progress.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._progress.stop()

    async def during(self, events: AsyncIterator[FeedLine], call: Coroutine[Any, Any, T]) -> T:
        """`call`'s answer; meanwhile the bars follow the feed."""
        follow = asyncio.create_task(self._follow(events))
        try:
            return await call
        finally:
            follow.cancel()
            with contextlib.suppress(asyncio.CancelledError, ClientError):
                await follow

    async def _follow(self, events: AsyncIterator[FeedLine]) -> None:
        async for ev in events:
            if ev.model == self._model:
                self._show(ev)

    def _show(self, ev: FeedLine) -> None:
        if ev.event == "download_progress":
            d = ev.decode(DownloadEvent)
            if d is not None:
                self._file(d.file, d.downloaded, d.total, d.bytes_per_s)
        elif ev.event == "status_change":
            s = ev.decode(FeedState)
            if s is None:
                return
            if isinstance(s.file, str) and isinstance(s.downloaded, int) and isinstance(s.total, int):
                rate = s.bytes_per_s if isinstance(s.bytes_per_s, int) else 0
                self._file(s.file, s.downloaded, s.total, rate)
            elif isinstance(s.value, float | int):
                stage = s.stage if isinstance(s.stage, str) and s.stage else "load"
                self._bar("\0load", f"{self._model}: {stage}", 1.0, float(s.value), "")
        elif ev.event == "download_finished":
            done = ev.decode(FileDone)
            if done is not None and isinstance(done.file, str) and done.file in self._tasks:
                task = self._progress.tasks[self._tasks[done.file]]
                self._progress.update(self._tasks[done.file], completed=task.total)

    def _file(self, name: str, done: int, total: int, rate: int) -> None:
        detail = f"{done / MIB:.1f}/{total / MIB:.1f} MiB" if total else f"{done / MIB:.1f} MiB"
        detail += f"  {rate / MIB:.1f} MiB/s"
        self._bar(name, name, float(total) if total else None, float(done), detail)

    def _bar(self, key: str, description: str, total: float | None, done: float, detail: str) -> None:
        task = self._tasks.get(key)
        if task is None:
            task = self._tasks[key] = self._progress.add_task(description, total=total, detail=detail)
        self._progress.update(task, description=description, total=total, completed=done, detail=detail)


# ---- helpers ---------------------------------------------------------------------------


def _match(models: list[ModelBody], name: str) -> ModelBody | None:
    return next((m for m in models if m.id == name), None) or next(
        (m for m in models if name in m.aliases), None)


def _find(models: list[ModelBody], name: str, url: str) -> ModelBody:
    model = _match(models, name)
    if model is None:
        raise ClientError(f"the daemon at {url} has no model {name!r}")
    return model


def _table(*columns: str) -> Table:
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column, no_wrap=True, overflow="ignore")
    return table


def _out() -> Console:
    # A pipe gets whole lines (no wrapping at 80 columns): scripts cut the columns.
    console = Console()
    return console if console.is_terminal else Console(width=1000)


def _json(models: list[ModelBody]) -> int:
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(models)).decode() + "\n")
    return OK


def _size(n: int | None) -> str:
    if not n:
        return "-"
    if n >= 1024 * MIB:  # no space: every cell is one word, for cut and awk
        return f"{n / 1024 / MIB:.1f}GiB"
    return f"{n / MIB:.0f}MiB" if n >= MIB else f"{n / 1024:.0f}KiB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _error(message: str) -> None:
    print(f"modelherd: {message}", file=sys.stderr, flush=True)
