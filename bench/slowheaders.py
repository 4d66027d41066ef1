"""The router under request-head abuse: memory against one huge unfinished header, and
GET /health latency while many slow-header (slowloris) connections are open.

Starts the daemon with no models (`[server]` keys from `--set KEY=VALUE`, else the
defaults) and measures, with raw sockets:

  - one connection sending `--header-mb` MiB of a single header that never ends: the
    router's RSS and peak RSS (VmHWM) before and after, and whether the router answered
    (431) and closed the connection;
  - `--slow` connections that each send the start of a request head and then nothing:
    GET /health latency (a new connection per request) p50/p99/max over
    `--health-requests` requests while they are open, how many of them the router still
    holds open, and its RSS.

Usage: .venv/bin/python -m bench.slowheaders [--slow 1000] [--header-mb 86] [--health-requests 50]
                                             [--set max_connections=1024 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import socket
import sys
import time
from pathlib import Path

import psutil

from bench.runner import run_bench
from bench.stats import pct
from tests.daemon import Daemon

HEAD_START = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
HEALTH = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
MIB = 1 << 20


def memory(pid: int) -> tuple[int, int]:
    """(RSS, peak RSS) of a process, in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def huge_header(port: int, size: int) -> tuple[int, bytes]:
    """Send one header of `size` bytes that never ends; (bytes sent, what came back)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(HEAD_START)
        piece = b"a" * MIB
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < size:
                sock.sendall(piece[:size - sent])
                sent += min(MIB, size - sent)
        sock.settimeout(3)  # an answer comes at once, or never
        answer = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
    return sent, answer


def health(port: int) -> float:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(HEALTH)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    if not answer.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"/health answered {answer[:200]!r}")
    return time.monotonic() - started


def held_open(pid: int, port: int) -> int:
    return sum(1 for c in psutil.Process(pid).net_connections("tcp")
               if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def run(args: argparse.Namespace, work: Path) -> int:
    config = work / "c.toml"
    config.write_text("[server]\nmodels_dirs = []\n" + "".join(f"{kv}\n" for kv in args.set))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.slow + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.slow + 64), hard))
    env = {"XDG_DATA_HOME": str(work / "data"), "XDG_CACHE_HOME": str(work / "cache")}
    with Daemon("--config", str(config), env=env) as d:
        assert d.proc is not None
        pid = d.proc.pid
        health(d.port)
        rss0, peak0 = memory(pid)
        started = time.monotonic()
        sent, answer = huge_header(d.port, args.header_mb * MIB)
        took = time.monotonic() - started
        rss1, peak1 = memory(pid)
        status = answer.split(b"\r\n", 1)[0].decode("latin-1") or "(nothing)"
        print(f"\none connection sending a {args.header_mb} MiB header that never ends\n")
        print("| router RSS before | RSS after | peak RSS before | peak RSS after | bytes the client got "
              "through | answer | seconds |")
        print("|---|---|---|---|---|---|---|")
        print(f"| {rss0 / MIB:.1f} MiB | {rss1 / MIB:.1f} MiB | {peak0 / MIB:.1f} MiB "
              f"| {peak1 / MIB:.1f} MiB | {sent / MIB:.1f} MiB | {status} | {took:.2f} |")

        baseline = [health(d.port) for _ in range(args.health_requests)]
        slow: list[socket.socket] = []
        try:
            for _ in range(args.slow):
                sock = socket.create_connection(("127.0.0.1", d.port), timeout=30)
                sock.sendall(HEAD_START + b"x")
                slow.append(sock)
            latencies = [health(d.port) for _ in range(args.health_requests)]
            held = held_open(pid, d.port)
            rss2, _ = memory(pid)
        finally:
            for sock in slow:
                sock.close()
        print(f"\nGET /health on a new connection, {args.health_requests} requests\n")
        print("| open slow-header connections | held open by the router | p50 ms | p99 ms | max ms "
              "| router RSS |")
        print("|---|---|---|---|---|---|")
        print(f"| 0 | - | {pct(baseline, 50) * 1e3:.2f} | {pct(baseline, 99) * 1e3:.2f} "
              f"| {max(baseline) * 1e3:.2f} | {rss1 / MIB:.1f} MiB |")
        print(f"| {args.slow} | {held} | {pct(latencies, 50) * 1e3:.2f} | {pct(latencies, 99) * 1e3:.2f} "
              f"| {max(latencies) * 1e3:.2f} | {rss2 / MIB:.1f} MiB |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--slow", type=int, default=1000, help="slow-header connections (default 1000)")
    ap.add_argument("--header-mb", type=int, default=86, help="size of the huge header in MiB (default 86)")
    ap.add_argument("--health-requests", type=int, default=50, help="GET /health requests timed (default 50)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a [server] key for the daemon's config, as TOML (repeatable)")
    return run_bench(run, ap.parse_args())


if __name__ == "__main__":
    sys.exit(main())
