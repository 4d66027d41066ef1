"""What does a slow reader cost the router? One client reads a fast, long stream at ~4 KB/s;
the router's RSS is sampled every 5 s for 60 s, then again after the client left.

The daemon is started from `--repo` (default: this checkout), so the same script measures
an older checkout too (e.g. a `git worktree` of the commit before flow control). The model
is the test suite's tiny GGUF (~10k tokens/s on one core): its answer outruns any reader.

Usage: python -m bench.slowreader [--repo DIR] [--seconds 60] [--rate 4096] [--tokens 500000]
                                 [--logprobs K]
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from bench.runner import run_bench
from tests.tinymodels import write_tiny_gguf

NO_EOS = {"0": -100, "2": -100}
HERE = Path(__file__).resolve().parent.parent


def start(repo: Path, config: Path, work: Path) -> tuple[subprocess.Popen[str], int]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "XDG_CACHE_HOME": str(work / "cache"),
           "XDG_DATA_HOME": str(work / "data"), "XDG_RUNTIME_DIR": str(work)}
    proc = subprocess.Popen([sys.executable, "-m", "router", "serve", "--host", "127.0.0.1", "--port", "0",
                             "--config", str(config)], cwd=repo, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    for line in proc.stdout:  # the daemon prints where it listens once it is up
        m = re.search(r"(?:listening|running) on http://127\.0\.0\.1:(\d+)", line)  # now | before
        if m:
            return proc, int(m.group(1))
    raise RuntimeError(f"the daemon in {repo} exited before listening")


def run(args: argparse.Namespace, work: Path) -> int:
    model = work / "tiny.gguf"
    write_tiny_gguf(model, seed=2)
    config = work / "c.toml"
    config.write_text(f'[server]\nmodels_dirs = []\n\n[models.m]\nsource = "{model}"\n'
                      f'n_ctx = {args.tokens + 64}\n')
    proc, port = start(Path(args.repo), config, work)
    try:
        router = psutil.Process(proc.pid)
        logprobs = {"logprobs": True, "top_logprobs": args.logprobs} if args.logprobs else {}
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "go"}], "stream": True,
                           "max_tokens": args.tokens, "logit_bias": NO_EOS, **logprobs}).encode()
        # Load first, so the RSS samples are the stream's and not the load's.
        warm = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}/v1/chat/completions",
                        "-H", "content-type: application/json", "-d", warm], check=True)
        base = router.memory_info().rss
        print(f"repo {args.repo}; router RSS before the stream: {base / 2**20:.1f} MB")
        print(f"{'t s':>5} {'read KB':>9} {'router RSS MB':>14} {'worker CPU s':>13}")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        start_t = time.monotonic()
        got, next_sample, peak = 0, 0.0, base
        while (elapsed := time.monotonic() - start_t) < args.seconds:
            # The reader's pace is the measurement's input: a rate needs the clock.
            got += len(sock.recv(args.rate // 10))
            time.sleep(0.1)
            peak = max(peak, router.memory_info().rss)
            if elapsed >= next_sample:
                rss = router.memory_info().rss / 2**20
                # The worker's CPU time says whether generation goes on or is held back.
                cpu = sum(sum(c.cpu_times()[:2]) for c in router.children(recursive=True))
                print(f"{elapsed:>5.0f} {got / 1024:>9.1f} {rss:>14.1f} {cpu:>13.1f}", flush=True)
                next_sample += 5
        sock.close()
        deadline = time.monotonic() + 10  # let the router notice the client left and free its bytes
        while time.monotonic() < deadline:
            time.sleep(0.5)
        after = router.memory_info().rss
        print(f"peak {peak / 2**20:.1f} MB; 10 s after the client left: {after / 2**20:.1f} MB "
              f"(+{(after - base) / 2**20:.1f} MB)")
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(HERE), help="the checkout whose daemon is measured")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--rate", type=int, default=4096, help="bytes the client reads per second")
    parser.add_argument("--logprobs", type=int, default=0,
                        help="top_logprobs per token (~1.5 KB a token at 20: an answer that outruns the "
                             "kernel's socket buffers; not served before issue 13)")
    parser.add_argument("--tokens", type=int, default=500_000,
                        help="max_tokens of the stream (its answer: ~75 bytes a token)")
    return run_bench(run, parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
