"""Downloads without a load (POST /models/pull, `modelherd pull`): each in a process of
its own running worker.download.pull, as a worker would before its load, so a
download never blocks or crashes the router. Progress comes back over a pipe as
msgpack-encoded protocol messages (never pickles)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import msgspec
import multiprocess
from multiprocess.process import BaseProcess

from protocol.messages import Download, DownloadProgress, LoadFailed
from router.launch import run_pull
from router.progress import ModelEvents, download_event
from router.schema import Failed, FileDone

log = logging.getLogger("modelherd.pulls")

CANCEL_GRACE_S = 5.0
_decode = msgspec.msgpack.Decoder(DownloadProgress | LoadFailed).decode


class PullProcess:
    def __init__(self, download: Download) -> None:
        ctx = multiprocess.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc: BaseProcess = ctx.Process(target=run_pull, args=(download, child), daemon=True,
                                              name="modelherd-pull")
        self._proc.start()
        child.close()

    def recv(self) -> DownloadProgress | LoadFailed | None:
        """The next message; None once the process is done (or gone)."""
        try:
            msg: DownloadProgress | LoadFailed = _decode(self._conn.recv_bytes())
        except (EOFError, OSError):
            return None
        return msg

    def cancel(self) -> None:
        try:
            self._conn.send_bytes(b"cancel")  # the download stops between reads; the .part stays
        except OSError:
            pass

    def terminate(self) -> None:
        """For a pull stuck in a read: its end of the pipe closes, and recv returns None."""
        self._proc.terminate()

    def finish(self, grace: float = CANCEL_GRACE_S) -> int | None:
        self._proc.join(grace)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(grace)
        self._conn.close()
        code: int | None = self._proc.exitcode
        return code


def outcome(proc: PullProcess, on_progress: Callable[[DownloadProgress], None]) -> str | None:
    """Read a pull to its end (blocking): None when every file is in the cache, else why not.
    (Files already cached report no progress at all.)"""
    failure: str | None = None
    while (msg := proc.recv()) is not None:
        if isinstance(msg, LoadFailed):
            failure = msg.message
        else:
            on_progress(msg)
    code = proc.finish()
    if failure is None and code != 0:
        failure = f"the download process ended with exit code {code}"
    return failure


class Pulls:
    """The daemon's pulls, at most one per model; their progress goes to the event feed."""

    def __init__(self, events: ModelEvents) -> None:
        self._events = events
        self._running: dict[str, tuple[PullProcess, asyncio.Task[str | None]]] = {}

    def running(self, name: str) -> bool:
        return name in self._running

    def start(self, name: str, download: Download) -> asyncio.Task[str | None]:
        if name in self._running:
            return self._running[name][1]  # a second pull of the same model joins the first
        proc = PullProcess(download)
        loop = asyncio.get_running_loop()

        def progress(msg: DownloadProgress) -> None:
            loop.call_soon_threadsafe(self._progress, name, msg)

        task = asyncio.create_task(asyncio.to_thread(outcome, proc, progress), name=f"pull:{name}")
        self._running[name] = (proc, task)
        task.add_done_callback(lambda t: self._done(name, t))
        return task

    def _progress(self, name: str, msg: DownloadProgress) -> None:
        self._events.progress(name, "download_progress", download_event(msg), final=msg.finished)

    def _done(self, name: str, task: asyncio.Task[str | None]) -> None:
        self._running.pop(name, None)
        failure = "cancelled" if task.cancelled() else (task.exception() or task.result())
        if failure is None:
            self._events.publish(name, "download_finished", FileDone())
        else:
            log.warning("pulling %s failed: %s", name, failure)
            self._events.publish(name, "download_failed", Failed(str(failure)))

    async def close(self, grace: float = CANCEL_GRACE_S) -> None:
        """Cancel every pull; one that does not stop within `grace` (a read can wait for
        the socket's timeout) is terminated. Partial files stay for a resume."""
        running = list(self._running.values())
        for proc, _ in running:
            proc.cancel()
        tasks = [t for _, t in running]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace)
            for proc, task in running:
                if task in late:
                    proc.terminate()
            await asyncio.gather(*tasks, return_exceptions=True)
