"""Many streaming clients on two models at once: throughput, TTFT, router memory and CPU.

Measures, through a running modelherd daemon (`serve --models-dir DIR`, real llama.cpp
workers, one per model), 16 concurrent streaming clients spread over two generated models
(8 per model) for a fixed time:

  - aggregate streamed tokens/s and requests completed (overall and per model);
  - time to first content token (TTFT) p50/p95. A worker runs one generation at a time, so
    with 8 clients per model the TTFT is mostly queueing behind the other 7 clients;
  - errors: non-200 answers, SSE error events, streams that end without usage/[DONE],
    socket errors. They are printed, and any error makes the script exit 1;
  - the router process's RSS (start, peak, end; sampled every 0.5 s in a thread) and CPU
    (CPU seconds / wall seconds, and CPU microseconds per streamed token). The workers'
    and this client process's CPU are shown too: on a 2-core machine they all compete.

Both models are loaded (POST /models/load, wait) before the timer starts. Each client
keeps one keep-alive connection and loops: streaming chat completion with
`max_tokens` (128) and a logit_bias that bans the tiny vocabulary's end tokens, so every
request generates exactly max_tokens. Clients are threads with raw sockets so the client
side costs little CPU. Clients stop starting requests at the deadline and finish the one
in flight; throughput is tokens over the time until the last client finished.

Models are generated like bench/overhead.py: shape `tiny` (default; ~0.5 MB, thousands of
tokens/s per core) or `small` (~110 MB), two files with different random seeds.

Usage: .venv/bin/python -m bench.concurrency [--seconds 60] [--clients 16] [--max-tokens 128]
                                             [--shape tiny|small]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.rawhttp import Conn, HttpError, post_json
from bench.runner import run_bench
from bench.stats import pct
from tests.daemon import Daemon
from tests.tinymodels import SHAPES, write_tiny_gguf

# Same shapes as bench/overhead.py.
NO_EOS = {"0": -100.0, "2": -100.0}  # tiny vocab's EOG tokens: every request makes max_tokens
MESSAGES = [{"role": "user", "content": "Tell me a story about a small computer."}]
MAX_CONSECUTIVE_ERRORS = 5  # a client gives up after this many in a row (e.g. the daemon died)


@dataclass
class ClientResult:
    model: str
    ttft: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class Clock:
    t0: float = 0.0
    deadline: float = 0.0
    cpu0: dict[str, float] = field(default_factory=dict)


def request_bytes(model: str, max_tokens: int) -> bytes:
    body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "stream": True,
            "logit_bias": NO_EOS, "stream_options": {"include_usage": True}}
    return post_json("/v1/chat/completions", body)


def client(port: int, request: bytes, result: ClientResult, barrier: threading.Barrier, clock: Clock,
           stop: threading.Event, timeout: float) -> None:
    conn: Conn | None = None
    in_a_row = 0
    try:
        conn = Conn(port, timeout)
        barrier.wait()
        while time.perf_counter() < clock.deadline and not stop.is_set():
            try:
                if conn is None:
                    conn = Conn(port, timeout)
                reply = conn.stream(request)
            except (HttpError, OSError, ValueError) as exc:
                result.errors.append(f"{type(exc).__name__}: {exc}")
                if conn is not None:  # the connection's state is unknown after an error
                    conn.close()
                    conn = None
                in_a_row += 1
                if in_a_row >= MAX_CONSECUTIVE_ERRORS:
                    result.errors.append(f"client gave up after {in_a_row} errors in a row")
                    return
                continue
            in_a_row = 0
            result.ttft.append(reply.ttft)
            result.tokens.append(reply.tokens)
    except threading.BrokenBarrierError:
        pass
    except Exception as exc:
        result.errors.append(f"{type(exc).__name__}: {exc}")
        barrier.abort()
    finally:
        if conn is not None:
            conn.close()


class Monitor(threading.Thread):
    """Samples the router's RSS and its workers' total RSS every `interval` seconds."""

    def __init__(self, pid: int, workers: list[psutil.Process], interval: float) -> None:
        super().__init__(name="rss-monitor", daemon=True)
        self.proc = psutil.Process(pid)
        self.worker_procs = workers
        self.interval = interval
        self.done = threading.Event()
        self.router: list[int] = []
        self.workers: list[int] = []

    def sample(self) -> None:
        try:
            self.router.append(self.proc.memory_info().rss)
            total = 0
            for worker in self.worker_procs:
                try:
                    total += worker.memory_info().rss
                except psutil.Error:
                    pass
            self.workers.append(total)
        except psutil.Error:
            pass

    def run(self) -> None:
        self.sample()
        while not self.done.wait(self.interval):  # the sampling interval, not synchronisation
            self.sample()

    def finish(self) -> None:
        self.done.set()
        self.join()
        self.sample()


def cpu_times(pid: int, worker_procs: list[psutil.Process]) -> dict[str, float]:
    router = psutil.Process(pid)
    workers = 0.0
    for worker in worker_procs:
        try:
            t = worker.cpu_times()
            workers += t.user + t.system
        except psutil.Error:
            pass
    r, me = router.cpu_times(), psutil.Process().cpu_times()
    machine = psutil.cpu_times()  # all CPUs: busy and stolen (by the hypervisor) seconds
    busy = sum(getattr(machine, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq"))
    return {"router": r.user + r.system, "workers": workers, "client": me.user + me.system,
            "busy": busy, "steal": getattr(machine, "steal", 0.0)}


def run(args: argparse.Namespace, work: Path) -> int:
    models_dir = work / "models"
    names = [f"{args.shape}-a", f"{args.shape}-b"]
    paths = [write_tiny_gguf(models_dir / f"{name}.gguf", seed=seed, shape=SHAPES[args.shape])
             for seed, name in enumerate(names, start=1)]
    with Daemon("--models-dir", str(models_dir), env={"XDG_RUNTIME_DIR": str(work)}) as d:
        assert d.proc is not None
        for name in names:
            d.load(name)
        pid = d.proc.pid
        workers = d.workers()  # the model workers (not multiprocessing's resource tracker)
        assert len(workers) == 2, workers
        monitor = Monitor(pid, workers, args.sample_interval)
        monitor.start()
        clock = Clock()

        def start_clock() -> None:  # runs once, in the last thread to reach the barrier
            clock.cpu0 = cpu_times(pid, workers)
            clock.t0 = time.perf_counter()
            clock.deadline = clock.t0 + args.seconds

        barrier = threading.Barrier(args.clients, action=start_clock)
        stop = threading.Event()
        results = [ClientResult(names[i % 2]) for i in range(args.clients)]
        requests = {name: request_bytes(name, args.max_tokens) for name in names}
        threads = [threading.Thread(target=client, name=f"client-{i}", daemon=True,
                                    args=(d.port, requests[r.model], r, barrier, clock, stop, args.timeout))
                   for i, r in enumerate(results)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            stop.set()  # on Ctrl-C: clients finish their current request, then the daemon stops
        wall = time.perf_counter() - clock.t0
        cpu1 = cpu_times(pid, workers)
        monitor.finish()
        rss_start = monitor.router[0]
        cpu = {k: cpu1[k] - clock.cpu0.get(k, cpu1[k]) for k in cpu1}
        log_tail = d.log()

    errors = [(i, e) for i, r in enumerate(results) for e in r.errors]
    total_tokens = sum(sum(r.tokens) for r in results)
    ttft_all = [t for r in results for t in r.ttft]
    short = sum(1 for r in results for n in r.tokens if n != args.max_tokens)
    size_mb = paths[0].stat().st_size / 1e6
    print(f"\n{args.clients} streaming clients over 2 models (`{args.shape}`, {size_mb:.1f} MB GGUF each, "
          f"random weights), {args.seconds:.0f} s, max_tokens {args.max_tokens}, CPU, "
          f"{psutil.cpu_count()} cores\n")
    print("| model     | clients | requests | tokens    | tok/s   | TTFT p50 ms | TTFT p95 ms | errors |")
    print("|-----------|---------|----------|-----------|---------|-------------|-------------|--------|")
    for label, group in [*((n, [r for r in results if r.model == n]) for n in names), ("all", results)]:
        ttft = [t for r in group for t in r.ttft]
        tokens = sum(sum(r.tokens) for r in group)
        print(f"| {label:<9} | {len(group):7d} | {sum(len(r.tokens) for r in group):8d} | {tokens:9d} "
              f"| {tokens / wall:7.0f} | {pct(ttft, 50) * 1e3:11.1f} | {pct(ttft, 95) * 1e3:11.1f} "
              f"| {sum(len(r.errors) for r in group):6d} |")
    per_client = [len(r.tokens) for r in results]
    mb = 1024 * 1024
    rows = [
        ("wall s (timer start to last client done)", f"{wall:.1f}"),
        ("aggregate tokens/s", f"{total_tokens / wall:.0f}"),
        ("requests completed", f"{len(ttft_all)}"),
        ("requests per client min / max", f"{min(per_client)} / {max(per_client)}"),
        ("requests with completion_tokens != max_tokens", f"{short}"),
        ("TTFT p50 / p95 ms (all)", f"{pct(ttft_all, 50) * 1e3:.1f} / {pct(ttft_all, 95) * 1e3:.1f}"),
        ("errors", f"{len(errors)}"),
        ("router RSS MB start / peak / end",
         f"{rss_start / mb:.1f} / {max(monitor.router) / mb:.1f} / {monitor.router[-1] / mb:.1f}"),
        ("workers RSS MB peak (sum of 2)", f"{max(monitor.workers) / mb:.1f}"),
        ("router CPU s / wall s", f"{cpu['router']:.1f} / {wall:.1f} = {cpu['router'] / wall:.2f}"),
        ("router CPU us per streamed token", f"{cpu['router'] / max(1, total_tokens) * 1e6:.1f}"),
        ("workers CPU s / wall s (sum of 2)", f"{cpu['workers'] / wall:.2f}"),
        ("bench client CPU s / wall s", f"{cpu['client'] / wall:.2f}"),
        ("other processes CPU s / wall s (noise)",
         f"{(cpu['busy'] - cpu['router'] - cpu['workers'] - cpu['client']) / wall:.2f}"),
        ("CPU stolen by the hypervisor s / wall s", f"{cpu['steal'] / wall:.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\n| {'metric':<{width}} | value{' ' * 20} |")
    print(f"|{'-' * (width + 2)}|{'-' * 27}|")
    for k, v in rows:
        print(f"| {k:<{width}} | {v:<25} |")
    if errors:
        print(f"\n{len(errors)} error(s):")
        for i, e in errors[:50]:
            print(f"  client {i} ({results[i].model}): {e}")
        if len(errors) > 50:
            print(f"  ... and {len(errors) - 50} more")
        print("\ndaemon log tail:\n" + log_tail)
        return 1
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seconds", type=float, default=60.0, help="measured duration (default 60)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients, half per model (default 16)")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per request (default 128)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="generated model shape")
    ap.add_argument("--sample-interval", type=float, default=0.5, help="RSS sampling interval in s")
    ap.add_argument("--timeout", type=float, default=300.0, help="socket timeout per read in s")
    args = ap.parse_args()
    if args.clients < 2:
        ap.error("--clients must be at least 2")
    return run_bench(run, args)


if __name__ == "__main__":
    sys.exit(main())
