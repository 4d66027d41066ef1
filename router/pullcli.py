"""`modelherd pull NAME|SOURCE`: download into the cache with a progress bar, as the
daemon would before a load (same process, same cache, same lock)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

from protocol.messages import Download, DownloadProgress
from protocol.sources import SourceError, cache_path, is_remote, parse, redact
from router.catalog import build_catalog
from router.config import ConfigError, build_settings
from router.pulls import PullProcess, outcome

MIB = 1024 * 1024


def pull(what: str, config: Path | None, cache_dir: str | None) -> int:
    try:
        settings = build_settings(config, {"cache_dir": cache_dir, "models_dirs": []})
        if is_remote(what):
            remote = parse(what, settings.server.allow_insecure_http)
            download = Download(what, str(settings.cache_dir), None, settings.server.allow_insecure_http)
            target = Path(cache_path(download.cache_dir, remote))
        else:
            entry = build_catalog(settings).resolve(what)
            if entry is None:
                raise ConfigError(f"no model named {what!r} (give a source, or a model of the config "
                                  "or a built-in one)")
            if entry.worker.download is None:
                raise ConfigError(f"model {what!r} is a local path ({entry.path}): nothing to download")
            download, target = entry.worker.download, entry.path
    except (ConfigError, SourceError) as exc:
        print(f"modelherd: {exc}", file=sys.stderr)
        return 2
    print(f"modelherd: pulling {redact(download.source)} into {target}", file=sys.stderr, flush=True)
    bar = Bar(sys.stderr)
    proc = PullProcess(download)
    try:
        failure = outcome(proc, bar.update)
    except KeyboardInterrupt:
        proc.cancel()
        proc.finish()
        bar.end()
        print("modelherd: cancelled; the partial download stays for the next pull", file=sys.stderr)
        return 130
    bar.end()
    if failure is not None:
        print(f"modelherd: {failure}", file=sys.stderr)
        return 1
    print(target)
    return 0


class Bar:
    """One line redrawn in a terminal; elsewhere (a log, a pipe) a line every second."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._tty = out.isatty()
        self._printed = 0.0
        self._open = False

    def update(self, msg: DownloadProgress) -> None:
        now = time.monotonic()
        if not self._tty and not msg.finished and now - self._printed < 1.0:
            return
        self._printed = now
        done = f"{msg.downloaded / MIB:.1f}"
        if msg.total:
            line = f"{msg.file}: {100 * msg.downloaded / msg.total:5.1f}% {done}/{msg.total / MIB:.1f} MiB"
        else:
            line = f"{msg.file}: {done} MiB"
        line += f"  {msg.bytes_per_s / MIB:.1f} MiB/s"
        if msg.eta_s is not None and not msg.finished:
            line += f"  {msg.eta_s:.0f} s left"
        if self._tty:
            self._out.write("\r" + line.ljust(79))
            self._open = True
        else:
            self._out.write(line + "\n")
        self._out.flush()

    def end(self) -> None:
        if self._open:
            self._out.write("\n")
            self._out.flush()
            self._open = False
