"""Alternating between two models: modelherd (both stay loaded) vs llama_cpp.server (swaps).

Measures the same sequence of requests against two servers running side by side:

  (a) modelherd (`serve --models-dir DIR`, default settings): each model gets its own
      worker process and both stay loaded, so switching models costs nothing;
  (b) llama-cpp-python's own server, `python -m llama_cpp.server --config_file CFG`, with a
      `models` list naming the same two GGUF files. It keeps one model loaded and closes
      it and loads the other whenever a request names the other model.

Each server gets one warm-up request per model first (reported as the cold first-request
times: for modelherd they include loading the model on first use; llama_cpp.server loads
the first model at startup and swaps to the second). Then 20 rounds, one round being one
request to model A and then one to model B, interleaved between the servers (a round on
one, then a round on the other, the order flipping every round) so that drift in machine
speed or a noisy neighbour hits both alike; requests are sequential, so only one server
works at a time. Reported per server: startup time to ready,
the cold first requests, total wall time of the rounds, p50/p95 per-request latency, the
peak RSS of the server's process tree during the rounds, and the ratios llama_cpp.server /
modelherd. Then, as a baseline, the same number of requests to model A only (no switch):
the alternating latency minus this is what a switch costs.

Requests are non-streaming chat completions (`--stream` to stream instead) with
`max_tokens` 16 and a logit_bias banning the tiny vocabulary's end tokens, so every
answer stops at the length limit (finish_reason checked); the mean completion tokens per
request is reported, since llama-cpp-python overshoots max_tokens when the text ends in a
partial UTF-8 character (unknown when streaming: it ignores include_usage). Both servers
use the same context size (modelherd's default: the model's trained context, 512 here)
and llama.cpp's default thread count. Models are generated like bench/overhead.py:
`small` (default, ~110 MB F32, where loading a model costs something) or `tiny` (~0.5 MB).

Needs llama_cpp.server's extra packages: `.venv/bin/pip install -e '.[bench]'`.

Usage: .venv/bin/python -m bench.alternation [--rounds 20] [--max-tokens 16] [--shape small|tiny]
                                             [--stream]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from bench.runner import run_bench
from bench.stats import pct
from tests.daemon import Daemon
from tests.tinymodels import SHAPES, write_tiny_gguf

# Same shapes as bench/overhead.py.
NO_EOS = {"0": -100.0, "2": -100.0}  # tiny vocab's EOG tokens: every request makes max_tokens
MESSAGES = [{"role": "user", "content": "Tell me a story about a small computer."}]


@dataclass
class Result:
    server: str
    startup: float = 0.0
    cold: dict[str, float] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0
    peak_rss: int = 0
    same_model: list[float] = field(default_factory=list)
    n_ctx: int = 0
    tokens: list[int] = field(default_factory=list)


class TreeRss(threading.Thread):
    """Peak RSS of a process and its descendants, sampled every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(name="rss-monitor", daemon=True)
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.done = threading.Event()
        self.peak = 0

    def sample(self) -> None:
        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        self.peak = max(self.peak, total)

    def run(self) -> None:
        self.sample()
        while not self.done.wait(self.interval):  # the sampling interval, not synchronisation
            self.sample()

    def __enter__(self) -> TreeRss:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()
        self.sample()


class Requester:
    """Sends the benchmark's chat request to one server and checks the answer."""

    def __init__(self, base_url: str, max_tokens: int, stream: bool, timeout: float) -> None:
        self.client = httpx.Client(base_url=base_url, timeout=timeout)
        self.max_tokens = max_tokens
        self.stream = stream
        self.tokens: list[int] = []

    def close(self) -> None:
        self.client.close()

    def __call__(self, model: str) -> float:
        """One request; returns its latency. Its completion tokens go to `self.tokens`."""
        body: dict[str, object] = {"model": model, "messages": MESSAGES, "max_tokens": self.max_tokens,
                                   "seed": 1, "logit_bias": NO_EOS}
        if self.stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        if self.stream:
            with self.client.stream("POST", "/v1/chat/completions", json=body) as r:
                text = r.read().decode()
            elapsed = time.perf_counter() - t0
            if r.status_code != 200:
                raise RuntimeError(f"{model}: HTTP {r.status_code}: {text[:500]}")
            events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
            if not events or events[-1] != "[DONE]":
                raise RuntimeError(f"{model}: stream did not end with [DONE]: {text[-500:]}")
            chunks = [json.loads(e) for e in events[:-1]]
            if any("error" in c for c in chunks):
                raise RuntimeError(f"{model}: error event: {text[-500:]}")
            finish = [ch["finish_reason"] for c in chunks for ch in c.get("choices", [])
                      if ch["finish_reason"]]
            usage = chunks[-1].get("usage")  # llama_cpp.server ignores stream_options.include_usage
        else:
            r = self.client.post("/v1/chat/completions", json=body)
            elapsed = time.perf_counter() - t0
            if r.status_code != 200:
                raise RuntimeError(f"{model}: HTTP {r.status_code}: {r.text[:500]}")
            answer = r.json()
            finish = [ch["finish_reason"] for ch in answer["choices"]]
            usage = answer.get("usage")
        if finish != ["length"]:
            raise RuntimeError(f"{model}: expected finish_reason ['length'], got {finish}")
        if usage:
            # llama-cpp-python can overshoot max_tokens: it skips the max_tokens check while the
            # text ends in an incomplete UTF-8 sequence, which random weights produce often.
            self.tokens.append(int(usage["completion_tokens"]))
        return elapsed


def others_cpu(pids: list[int]) -> float:
    """Busy CPU seconds of the whole machine minus the servers' process trees and this process."""
    machine = psutil.cpu_times()
    busy = sum(getattr(machine, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq"))
    procs = [psutil.Process()]
    for pid in pids:
        server = psutil.Process(pid)
        procs += [server, *server.children(recursive=True)]
    for p in procs:
        try:
            t = p.cpu_times()
            busy -= t.user + t.system
        except psutil.Error:
            pass
    return busy


@dataclass
class Server:
    result: Result
    pid: int
    request: Requester


def measure(servers: list[Server], names: list[str], rounds: int) -> float:
    """Warm-up, the rounds, then the same-model baseline; returns other processes' CPU s / wall s.

    With two servers the rounds are interleaved (a round on one, a round on the other, the
    order flipping every round) so a drift in machine speed or a noisy neighbour hits both.
    """
    def interleaved(step: Callable[[Server], None]) -> None:
        for i in range(rounds):
            for server in servers if i % 2 == 0 else servers[::-1]:
                step(server)

    def one_round(server: Server) -> None:
        t0 = time.perf_counter()
        for name in names:
            server.result.latencies.append(server.request(name))
        server.result.wall += time.perf_counter() - t0

    for server in servers:
        for name in names:  # warm-up, one per model: the cold first requests
            server.result.cold[name] = server.request(name)
    pids = [server.pid for server in servers]
    with ExitStack() as stack:
        monitors = [stack.enter_context(TreeRss(pid)) for pid in pids]
        cpu0, t0 = others_cpu(pids), time.perf_counter()
        interleaved(one_round)
        other = (others_cpu(pids) - cpu0) / (time.perf_counter() - t0)
    for server, monitor in zip(servers, monitors, strict=True):
        server.result.peak_rss = monitor.peak
    # Baseline: no switching, so the alternating latency minus this is what a switch costs.
    interleaved(lambda server: server.result.same_model.append(server.request(names[0])))
    for server in servers:
        server.result.tokens = server.request.tokens
    return other


@contextmanager
def modelherd(args: argparse.Namespace, work: Path) -> Iterator[Server]:
    result = Result("modelherd")
    t0 = time.perf_counter()
    with Daemon("--models-dir", str(work / "models"), env={"XDG_RUNTIME_DIR": str(work)}) as d:
        result.startup = time.perf_counter() - t0
        assert d.proc is not None
        request = Requester(d.url, args.max_tokens, args.stream, args.timeout)
        try:
            yield Server(result, d.proc.pid, request)
        finally:
            request.close()
        loaded = [m["meta"] for m in d.models().values() if isinstance(m.get("meta"), dict)]
        result.n_ctx = int(loaded[0]["n_ctx"]) if loaded else 0  # type: ignore[index]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def llama_cpp_server(config: Path, log: Path,
                     timeout: float) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start `python -m llama_cpp.server`, wait until /v1/models answers, stop it afterwards."""
    port = json.loads(config.read_text())["port"]
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--config_file", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # its own process group: stopped as a whole
    try:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=url, timeout=5) as c:
            while True:
                try:
                    if c.get("/v1/models").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"llama_cpp.server not ready within {timeout} s:\n{tail(log)}")
                try:  # the poll interval; returns at once if the server exits
                    code = proc.wait(min(0.05, left))
                except subprocess.TimeoutExpired:
                    continue
                raise RuntimeError(f"llama_cpp.server exited with {code} before it was ready:\n{tail(log)}")
        yield proc, url
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            proc.wait()


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def llama_cpp(args: argparse.Namespace, work: Path, names: list[str], n_ctx: int) -> Iterator[Server]:
    result = Result("llama_cpp.server", n_ctx=n_ctx)
    config = work / "llama_cpp_server.json"
    config.write_text(json.dumps({
        "host": "127.0.0.1",
        "port": free_port(),
        "models": [{"model": str(work / "models" / f"{name}.gguf"), "model_alias": name, "n_ctx": n_ctx,
                    "verbose": False} for name in names],
    }, indent=2))
    t0 = time.perf_counter()
    with llama_cpp_server(config, work / "llama_cpp_server.log", args.start_timeout) as (proc, url):
        result.startup = time.perf_counter() - t0
        request = Requester(url, args.max_tokens, args.stream, args.timeout)
        try:
            yield Server(result, proc.pid, request)
        finally:
            request.close()


def report(args: argparse.Namespace, results: list[Result], names: list[str], size_mb: float,
           other_cpu: float) -> None:
    mode = "streaming" if args.stream else "non-streaming"
    print(f"\n{args.rounds} rounds of {names[0]} then {names[1]} ({args.shape}: {size_mb:.1f} MB GGUF each, "
          f"random weights), {mode} chat, max_tokens {args.max_tokens}, CPU, {psutil.cpu_count()} cores, "
          f"n_ctx {', '.join(f'{r.server} {r.n_ctx}' for r in results)}\n")
    print("| server           | startup s | cold A ms | cold B ms | rounds wall s | p50 ms  | p95 ms  "
          "| mean ms | same-model p50 ms | tokens/req | peak RSS MB |")
    print("|------------------|-----------|-----------|-----------|---------------|---------|---------"
          "|---------|-------------------|------------|-------------|")
    for r in results:
        print(f"| {r.server:<16} | {r.startup:9.2f} | {r.cold[names[0]] * 1e3:9.1f} "
              f"| {r.cold[names[1]] * 1e3:9.1f} | {r.wall:13.2f} | {pct(r.latencies, 50) * 1e3:7.1f} "
              f"| {pct(r.latencies, 95) * 1e3:7.1f} | {statistics.mean(r.latencies) * 1e3:7.1f} "
              f"| {pct(r.same_model, 50) * 1e3:17.1f} "
              f"| {f'{statistics.mean(r.tokens):.1f}' if r.tokens else 'n/a':>10} "
              f"| {r.peak_rss / 2**20:11.1f} |")
    by = {r.server: r for r in results}
    if len(by) == 2:
        mh, lc = by["modelherd"], by["llama_cpp.server"]
        print(f"\nllama_cpp.server / modelherd: rounds wall {lc.wall / mh.wall:.2f}x, "
              f"p50 {pct(lc.latencies, 50) / pct(mh.latencies, 50):.2f}x, "
              f"p95 {pct(lc.latencies, 95) / pct(mh.latencies, 95):.2f}x, "
              f"peak RSS {lc.peak_rss / mh.peak_rss:.2f}x")
        for r in (mh, lc):
            cost = (statistics.mean(r.latencies) - statistics.median(r.same_model)) * 1e3
            print(f"{r.server}: mean alternating latency - same-model p50 = {cost:.1f} ms per request")
    print(f"other processes' CPU during the rounds (noise): {other_cpu:.2f} CPU s / wall s")


def run(args: argparse.Namespace, work: Path) -> int:
    servers = args.servers.split(",")
    shape = SHAPES[args.shape]
    names = [f"{args.shape}-a", f"{args.shape}-b"]
    paths = [write_tiny_gguf(work / "models" / f"{name}.gguf", seed=seed, shape=shape)
             for seed, name in enumerate(names, start=1)]
    n_ctx = min(4096, shape.n_ctx_train)  # what modelherd's n_ctx = 0 picks
    with ExitStack() as stack:  # started one after the other, stopped in reverse order
        running = [stack.enter_context(modelherd(args, work) if server == "modelherd"
                                       else llama_cpp(args, work, names, n_ctx)) for server in servers]
        other_cpu = measure(running, names, args.rounds)
    report(args, [server.result for server in running], names, paths[0].stat().st_size / 1e6, other_cpu)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=20, help="rounds of A then B (default 20)")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per request (default 16)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small", help="generated model shape")
    ap.add_argument("--stream", action="store_true", help="streaming requests (default: non-streaming)")
    ap.add_argument("--servers", default="modelherd,llama_cpp.server",
                    help="which servers, in this order (default modelherd,llama_cpp.server)")
    ap.add_argument("--timeout", type=float, default=300.0, help="per-request timeout in s")
    ap.add_argument("--start-timeout", type=float, default=120.0, help="llama_cpp.server readiness deadline")
    args = ap.parse_args()
    servers = args.servers.split(",")
    if not servers or set(servers) - {"modelherd", "llama_cpp.server"}:
        ap.error("--servers: a comma-separated list of modelherd, llama_cpp.server")
    return run_bench(run, args)


if __name__ == "__main__":
    sys.exit(main())
