"""How long does a hung worker go unnoticed? A worker is frozen mid-stream (SIGSTOP, as a
stuck driver or a swap storm would leave it) and the clock runs until: the stream's client
gets the error event, the worker process is gone (the shutdown ladder ends in SIGKILL for a
stopped process), and a new request on the same model is answered by a fresh worker.

Expect detection between heartbeat_timeout and heartbeat_timeout + heartbeat_interval.

Usage: python -m bench.hung [--settings 0.5:3,5:30]   (interval:timeout pairs, seconds)
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

import httpx
import psutil

from bench.runner import run_bench
from tests.daemon import Daemon, open_stream, read_to_end
from tests.tinymodels import write_tiny_gguf


def measure(work: Path, interval: float, timeout: float) -> tuple[float, float, float]:
    model = work / "tiny.gguf"
    if not model.exists():
        write_tiny_gguf(model, seed=2)
    config = work / f"hung-{interval}-{timeout}.toml"
    config.write_text(f"[server]\nmodels_dirs = []\nheartbeat_interval = {interval}\n"
                      f"heartbeat_timeout = {timeout}\n\n[models.m]\nsource = \"{model}\"\nn_ctx = 8192\n")
    env = {"XDG_CACHE_HOME": str(work / "cache"), "XDG_DATA_HOME": str(work / "data")}
    with Daemon("--config", str(config), env=env) as d:
        pid = d.load("m")["pid"]
        assert isinstance(pid, int)
        sock, received = open_stream(d.port, "m")
        stopped = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            raw = read_to_end(sock, received)
            errored = time.monotonic() - stopped
            sock.close()
            assert b"not responding" in raw, raw[-300:]
            psutil.Process(pid).wait(timeout=timeout + 60)
            gone = time.monotonic() - stopped
        finally:
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGCONT)
        with httpx.Client(base_url=d.url, timeout=120) as c:
            r = c.post("/v1/chat/completions", json={"model": "m", "max_tokens": 2,
                                                     "messages": [{"role": "user", "content": "hi"}]})
            r.raise_for_status()
        answered = time.monotonic() - stopped
    return errored, gone, answered


def run(args: argparse.Namespace, work: Path) -> int:
    print(f"{'interval s':>10} {'timeout s':>9} {'error event s':>13} {'worker gone s':>13} "
          f"{'next answer s':>13}")
    for pair in args.settings.split(","):
        interval, timeout = (float(x) for x in pair.split(":"))
        errored, gone, answered = measure(work, interval, timeout)
        print(f"{interval:>10g} {timeout:>9g} {errored:>13.2f} {gone:>13.2f} {answered:>13.2f}", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="0.5:3,5:30", help="interval:timeout pairs, comma-separated")
    return run_bench(run, parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
