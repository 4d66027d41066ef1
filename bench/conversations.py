"""Resumable streams at scale: tracker/buffer memory, the cost of keeping a stream, lookup fan-out.

Measures, through a running modelherd daemon (`serve --config CFG`, real llama.cpp workers,
one per model, two generated models with different seeds) configured with
`[server] max_conversations = BOUND` (1000):

  1. memory under many conversations: N (10,000) short resumable streaming requests
     (`X-Conversation-Id: conv-<i>`, distinct ids, max_tokens 4, a logit_bias that bans the
     tiny vocabulary's end tokens so every request generates exactly max_tokens), sent by 4
     client threads on keep-alive raw-socket connections to model A. The router's RSS and
     model A's worker RSS are sampled after 1,000, 2,000, 5,000 and 10,000 conversations
     (all clients stopped at each mark). Once BOUND conversations exist, the router's tracker
     (LRU) and the worker's finished streams are both at their bound, so memory should stay
     flat from there on. Then a few ids are checked with GET /v1/stream: the oldest (evicted)
     must answer 404, the newest BOUND must answer 200 and replay exactly the bytes their
     original client received (length and CRC-32). Ids within a few places of the boundary
     are not sampled: concurrent clients begin them slightly out of order.
  2. the cost of keeping a stream: on the same loaded model, one client alternating plain
     streaming requests and resumable ones (with X-Conversation-Id), in rounds of 4, 200 of
     each, max_tokens 128: tokens/s and time to last byte (TTLB) p50, the ratio
     resumable/plain, and the router's and worker's CPU per request (psutil process times
     read around each request: clock-tick resolution, so only the sum over many requests
     means anything).
  3. lookup fan-out with a dead-slow worker: 10 finished resumable streams on each model,
     then POST /v1/streams/lookup naming all of their ids, 20 times each: with both workers
     live; with model B's worker SIGSTOPped (the router asks each owner with a
     `stream_fanout_timeout` of 250 ms, so a lookup should take about that and answer only
     model A's ids); lookups naming only model A's ids while B is stopped (B is not asked:
     fast); and after SIGCONT (all ids again). The worker is resumed in a `finally`, always.

Any failed request, wrong 404/200 answer or wrong lookup answer is printed and makes the
script exit 1. Models are generated like bench/overhead.py: shape `tiny` (default; ~0.5 MB)
or `small` (~110 MB). Every daemon and worker started is stopped on exit, Ctrl-C and
SIGTERM included (bench/runner.py).

Usage: .venv/bin/python -m bench.conversations [--conversations 10000] [--bound 1000]
                                               [--clients 4] [--requests 200] [--max-tokens 128]
                                               [--lookups 20] [--fanout-ids 10] [--shape tiny|small]
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import statistics
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from bench.rawhttp import Conn, HttpError, Reply, post_json
from bench.runner import run_bench
from bench.stats import pct
from tests.daemon import Daemon
from tests.tinymodels import SHAPES, write_tiny_gguf

# Same shapes as bench/overhead.py.
NO_EOS = {"0": -100.0, "2": -100.0}  # tiny vocab's EOG tokens: every request makes max_tokens
MESSAGES = [{"role": "user", "content": "Tell me a story about a small computer."}]
N_CTX = 2048
MARKS = (1000, 2000, 5000, 10000)  # conversations after which RSS is sampled (plus N itself)
SHORT_TOKENS = 4  # max_tokens of the many-conversations and fan-out requests
MB = 1024 * 1024


def conv_id(i: int) -> str:
    return f"conv-{i}"


def request_bytes(model: str, max_tokens: int, conv: str | None) -> bytes:
    body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "stream": True,
            "logit_bias": NO_EOS, "stream_options": {"include_usage": True}}
    return post_json("/v1/chat/completions", body, {"X-Conversation-Id": conv} if conv is not None else None)


def send_checked(conn: Conn, request: bytes, max_tokens: int, errors: list[str], what: str) -> Reply | None:
    """One request; an error (or a short answer) is recorded and the connection renewed."""
    try:
        reply = conn.stream(request)
    except (HttpError, OSError, ValueError) as exc:
        errors.append(f"{what}: {type(exc).__name__}: {exc}")
        try:
            conn.reconnect()
        except OSError as again:
            errors.append(f"{what}: reconnect: {again}")
        return None
    if reply.tokens != max_tokens:
        errors.append(f"{what}: completion_tokens {reply.tokens} != max_tokens {max_tokens}")
    return reply


def rss(pid: int) -> int:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


# ---- 1. many conversations ---------------------------------------------------------------


@dataclass
class MemoryRow:
    conversations: int
    seconds: float  # since the first conversation
    router: int
    worker: int


@dataclass
class Check:
    what: str
    conv: str
    want: int  # HTTP status
    got: int
    ok: bool
    note: str


@dataclass
class ManyResult:
    rows: list[MemoryRow] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sent: list[tuple[int, int] | None] = field(default_factory=list)  # per id: (body bytes, crc32)
    checks: list[Check] = field(default_factory=list)
    wall: float = 0.0


def many_conversations(d: Daemon, model: str, router_pid: int, worker_pid: int, conns: list[Conn],
                       args: argparse.Namespace, stop: threading.Event) -> ManyResult:
    out = ManyResult(sent=[None] * args.conversations)
    marks = sorted({m for m in MARKS if m < args.conversations} | {args.conversations})
    out.rows.append(MemoryRow(0, 0.0, rss(router_pid), rss(worker_pid)))
    ids = itertools.count()
    lock = threading.Lock()
    t0 = time.perf_counter()

    def client(conn: Conn, limit: int) -> None:
        while not stop.is_set():
            with lock:
                i = next(ids)
                if i >= limit:
                    return
            reply = send_checked(conn, request_bytes(model, SHORT_TOKENS, conv_id(i)), SHORT_TOKENS,
                                 out.errors, conv_id(i))
            if reply is not None:
                out.sent[i] = (len(reply.body), zlib.crc32(reply.body))
            if len(out.errors) > 50:  # the daemon is probably gone: stop, and report
                stop.set()

    issued = 0
    for mark in marks:
        threads = [threading.Thread(target=client, args=(conn, mark), name=f"client-{k}", daemon=True)
                   for k, conn in enumerate(conns)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if stop.is_set():
            break
        with lock:  # the client that saw `mark` took one id too many: hand it back
            ids = itertools.count(mark)
        issued = mark
        out.rows.append(MemoryRow(mark, time.perf_counter() - t0, rss(router_pid), rss(worker_pid)))
    out.wall = time.perf_counter() - t0
    if issued == args.conversations:
        check_bound(d, issued, args.bound, len(conns), out)
    return out


def check_bound(d: Daemon, n: int, bound: int, clients: int, out: ManyResult) -> None:
    """GET /v1/stream on a few ids: evicted ones must answer 404; the newest `bound` must answer
    200 and replay exactly the bytes the original client received. Ids near the boundary are
    skipped: concurrent clients begin them a few places out of order."""
    margin = 2 * clients
    samples: list[tuple[str, int, int]] = []  # (what, index, expected status)
    if n > bound + margin:
        evicted = n - bound
        for what, i in (("oldest", 0), ("oldest", 1), ("oldest", 2), ("middle of evicted", evicted // 2),
                        ("just evicted", evicted - 1 - margin)):
            samples.append((what, i, 404))
    first_kept = max(0, n - bound)
    for what, i in (("oldest kept", first_kept + margin if first_kept else 0),
                    ("middle of kept", (first_kept + n) // 2),
                    ("newest", n - 2), ("newest", n - 1)):
        samples.append((what, min(max(i, 0), n - 1), 200))
    seen: set[int] = set()
    with d.client() as c:
        for what, i, want in samples:
            if i in seen:
                continue
            seen.add(i)
            r = c.get("/v1/stream", params={"conv_id": conv_id(i)})
            ok = r.status_code == want
            if r.status_code == 200:
                body = r.content
                same = out.sent[i] == (len(body), zlib.crc32(body))
                ok = ok and same
                note = f"{len(body)} B replayed, {'identical' if same else 'DIFFERS from the original'}"
            else:
                message = r.json().get("error", {}).get("message", "") if r.content.startswith(b"{") else ""
                note = message or r.text
            out.checks.append(Check(what, conv_id(i), want, r.status_code, ok, note))


# ---- 2. the cost of keeping a stream ---------------------------------------------------------


@dataclass
class CostSample:
    ttft: list[float] = field(default_factory=list)
    ttlb: list[float] = field(default_factory=list)
    tps: list[float] = field(default_factory=list)
    router_cpu: float = 0.0
    worker_cpu: float = 0.0


def stream_cost(conn: Conn, model: str, router_pid: int, worker_pid: int, args: argparse.Namespace,
                errors: list[str], per_round: int = 4, warmup: int = 4) -> dict[str, CostSample]:
    """Alternate plain and resumable requests in short rounds, so drift in machine speed hits
    both alike; one client, so no request queues behind another."""
    serial = itertools.count()

    def make(kind: str) -> bytes:
        conv = f"cost-{next(serial)}" if kind == "resumable" else None
        return request_bytes(model, args.max_tokens, conv)

    for kind in ("plain", "resumable"):
        for _ in range(warmup):
            send_checked(conn, make(kind), args.max_tokens, errors, f"{kind} warm-up")
    samples = {"plain": CostSample(), "resumable": CostSample()}
    for _ in range(max(1, args.requests // per_round)):
        for kind, s in samples.items():
            for _ in range(per_round):
                request = make(kind)
                r0, w0 = cpu_seconds(router_pid), cpu_seconds(worker_pid)
                reply = send_checked(conn, request, args.max_tokens, errors, kind)
                s.router_cpu += cpu_seconds(router_pid) - r0
                s.worker_cpu += cpu_seconds(worker_pid) - w0
                if reply is not None:
                    s.ttft.append(reply.ttft)
                    s.ttlb.append(reply.ttlb)
                    s.tps.append(reply.tokens / reply.ttlb)
    return samples


# ---- 3. lookup fan-out with a stopped worker ---------------------------------------------------


@dataclass
class LookupPhase:
    label: str
    times: list[float] = field(default_factory=list)
    found: dict[str, int] = field(default_factory=dict)  # model -> ids answered (last lookup)
    named: int = 0
    wrong: list[str] = field(default_factory=list)


def timed_lookups(c: httpx.Client, label: str, ids: dict[str, list[str]], expect: set[str],
                  n: int) -> LookupPhase:
    """`n` lookups naming every id in `ids` (model -> ids); each answer must hold exactly the
    ids of the models in `expect`."""
    phase = LookupPhase(label, named=sum(len(v) for v in ids.values()))
    body = {"conversation_ids": [i for v in ids.values() for i in v]}
    model_of = {i: m for m, v in ids.items() for i in v}
    want = {i for m in expect for i in ids.get(m, [])}
    for k in range(n):
        t0 = time.perf_counter()
        r = c.post("/v1/streams/lookup", json=body)
        phase.times.append(time.perf_counter() - t0)
        if r.status_code != 200:
            phase.wrong.append(f"lookup {k}: HTTP {r.status_code}: {r.text[:200]}")
            continue
        got = {e["conversation_id"] for e in r.json()}
        phase.found = {m: sum(1 for i in got if model_of.get(i) == m) for m in ids}
        if got != want:
            phase.wrong.append(f"lookup {k}: missing {sorted(want - got)[:5]}, "
                               f"unexpected {sorted(got - want)[:5]}")
    return phase


def fanout(d: Daemon, conn: Conn, models: list[str], stopped_pid: int, args: argparse.Namespace,
           errors: list[str]) -> list[LookupPhase]:
    live, slow = models
    ids = {m: [f"fan-{m}-{k}" for k in range(args.fanout_ids)] for m in models}
    for m in models:
        for i in ids[m]:
            send_checked(conn, request_bytes(m, SHORT_TOKENS, i), SHORT_TOKENS, errors, i)
    only_live = {live: ids[live]}
    phases = []
    with d.client() as c:
        phases.append(timed_lookups(c, "both workers live", ids, {live, slow}, args.lookups))
        os.kill(stopped_pid, signal.SIGSTOP)
        try:
            phases.append(timed_lookups(c, f"{slow} worker SIGSTOPped", ids, {live}, args.lookups))
            phases.append(timed_lookups(c, f"{slow} stopped, naming {live}'s ids only", only_live, {live},
                                        args.lookups))
        finally:
            os.kill(stopped_pid, signal.SIGCONT)
        phases.append(timed_lookups(c, f"after SIGCONT to {slow}", ids, {live, slow}, args.lookups))
    return phases


# ---- the run ---------------------------------------------------------------------------------


def run(args: argparse.Namespace, work: Path) -> int:
    models_dir = work / "models"
    names = [f"{args.shape}-a", f"{args.shape}-b"]
    paths = [write_tiny_gguf(models_dir / f"{name}.gguf", seed=seed, shape=SHAPES[args.shape])
             for seed, name in enumerate(names, start=1)]
    cfg = work / "cfg.toml"
    cfg.write_text(f'[server]\nmodels_dirs = ["{models_dir}"]\nmax_conversations = {args.bound}\n'
                   f'[defaults]\nn_ctx = {N_CTX}\n')
    stop = threading.Event()
    conns: list[Conn] = []
    with Daemon("--config", str(cfg), env={"XDG_RUNTIME_DIR": str(work)}) as d:
        assert d.proc is not None
        router_pid = d.proc.pid
        pids = {}
        for name in names:
            pid = d.load(name)["pid"]
            assert isinstance(pid, int), pid
            pids[name] = pid
        try:
            conns.extend(Conn(d.port, args.timeout) for _ in range(args.clients))
            t0 = time.perf_counter()
            many = many_conversations(d, names[0], router_pid, pids[names[0]], conns, args, stop)
            t1 = time.perf_counter()
            cost_errors: list[str] = []
            cost = stream_cost(conns[0], names[0], router_pid, pids[names[0]], args, cost_errors)
            t2 = time.perf_counter()
            fan_errors: list[str] = []
            phases = fanout(d, conns[0], names, pids[names[1]], args, fan_errors)
            t3 = time.perf_counter()
        finally:
            stop.set()  # on Ctrl-C: clients stop starting requests, then the daemon stops
            for conn in conns:
                conn.close()
        log_tail = d.log()

    failed = False
    size_mb = paths[0].stat().st_size / 1e6
    print(f"\nresumable streams: 2 models (`{args.shape}`, {size_mb:.1f} MB GGUF each, random weights), "
          f"[server] max_conversations = {args.bound}, n_ctx {N_CTX}, CPU, {psutil.cpu_count()} cores")

    # 1
    print(f"\n1. {args.conversations} resumable streams (distinct ids, max_tokens {SHORT_TOKENS}) on "
          f"{names[0]}, {args.clients} clients on keep-alive connections: "
          f"{t1 - t0:.1f} s, {args.conversations / max(many.wall, 1e-9):.0f} conversations/s\n")
    print("| conversations | elapsed s | conv/s since last | router RSS MB | worker RSS MB | router delta MB "
          "| worker delta MB |")
    print("|---------------|-----------|-------------------|---------------|---------------|-----------------"
          "|-----------------|")
    base = prev = many.rows[0]
    for row in many.rows:
        rate = (f"{(row.conversations - prev.conversations) / (row.seconds - prev.seconds):.0f}"
                if row.seconds > prev.seconds else "-")
        prev = row
        print(f"| {row.conversations:13d} | {row.seconds:9.1f} | {rate:>17} | {row.router / MB:13.1f} "
              f"| {row.worker / MB:13.1f} | {(row.router - base.router) / MB:+15.1f} "
              f"| {(row.worker - base.worker) / MB:+15.1f} |")
    at_bound = [r for r in many.rows if r.conversations >= 2 * args.bound]
    if len(at_bound) >= 2:
        first, last = at_bound[0], at_bound[-1]
        per_k = 1000 / (last.conversations - first.conversations)
        print(f"\ngrowth from {first.conversations} to {last.conversations} conversations (bound reached), "
              f"per 1000 conversations: router {(last.router - first.router) / 1024 * per_k:+.0f} KB, "
              f"worker {(last.worker - first.worker) / 1024 * per_k:+.0f} KB")
    if many.checks:
        gone = (f"ids < {args.conversations - args.bound} should be gone" if args.conversations > args.bound
                else "all should be kept")
        print(f"\nGET /v1/stream after {args.conversations} conversations (bound {args.bound}: {gone})\n")
        print("| which             | conv id      | want | got | ok  | answer                              |")
        print("|-------------------|--------------|------|-----|-----|-------------------------------------|")
        for ch in many.checks:
            failed |= not ch.ok
            ok = "yes" if ch.ok else "NO"
            print(f"| {ch.what:<17} | {ch.conv:<12} | {ch.want:4d} | {ch.got:3d} | {ok:<3} "
                  f"| {ch.note[:35]:<35} |")

    # 2
    print(f"\n2. the cost of keeping a stream: {names[0]}, one client, plain and resumable streaming "
          f"requests alternating in rounds of 4, max_tokens {args.max_tokens}: {t2 - t1:.1f} s\n")
    print("| request   |   n | tok/s p50 | TTLB p50 ms | TTLB p95 ms | TTFT p50 ms | router CPU ms/req "
          "| worker CPU ms/req |")
    print("|-----------|-----|-----------|-------------|-------------|-------------|-------------------"
          "|-------------------|")
    for kind, s in cost.items():
        n = max(1, len(s.ttlb))
        tps = statistics.median(s.tps) if s.tps else float("nan")
        print(f"| {kind:<9} | {len(s.ttlb):3d} | {tps:9.0f} | {pct(s.ttlb, 50) * 1e3:11.2f} "
              f"| {pct(s.ttlb, 95) * 1e3:11.2f} | {pct(s.ttft, 50) * 1e3:11.2f} "
              f"| {s.router_cpu / n * 1e3:17.2f} | {s.worker_cpu / n * 1e3:17.2f} |")
    plain, res = cost["plain"], cost["resumable"]
    if plain.tps and res.tps:
        tps_ratio = statistics.median(res.tps) / statistics.median(plain.tps)
        ttlb_ratio = pct(res.ttlb, 50) / pct(plain.ttlb, 50)
        print(f"\nresumable / plain: tok/s p50 {tps_ratio:.3f}, TTLB p50 {ttlb_ratio:.3f}")

    # 3
    print(f"\n3. POST /v1/streams/lookup naming {args.fanout_ids} finished streams on each model, "
          f"{args.lookups} lookups per row, [server] stream_fanout_timeout = 0.25 s: {t3 - t2:.1f} s\n")
    print(f"| {'phase':<40} | named | p50 ms | max ms | answered {names[0]:<6} | answered {names[1]:<6} "
          f"| wrong |")
    print(f"|{'-' * 42}|-------|--------|--------|-----------------|-----------------|-------|")
    for p in phases:
        failed |= bool(p.wrong)
        print(f"| {p.label:<40} | {p.named:5d} | {pct(p.times, 50) * 1e3:6.1f} | {max(p.times) * 1e3:6.1f} "
              f"| {p.found.get(names[0], 0):15d} | {p.found.get(names[1], 0):15d} | {len(p.wrong):5d} |")
    for p in phases:
        for w in p.wrong[:5]:
            print(f"  {p.label}: {w}")

    errors = many.errors + cost_errors + fan_errors
    if errors:
        print(f"\n{len(errors)} request error(s):")
        for e in errors[:50]:
            print(f"  {e}")
        if len(errors) > 50:
            print(f"  ... and {len(errors) - 50} more")
    if errors or failed:
        print("\ndaemon log tail:\n" + log_tail)
        return 1
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--conversations", type=int, default=10000,
                    help="resumable streams to create for the memory table (default 10000)")
    ap.add_argument("--bound", type=int, default=1000, help="[server] max_conversations (default 1000)")
    ap.add_argument("--clients", type=int, default=4, help="client threads for the memory table (default 4)")
    ap.add_argument("--requests", type=int, default=200,
                    help="plain and resumable requests each for the cost table (default 200)")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per request of the cost table")
    ap.add_argument("--lookups", type=int, default=20, help="lookups per row of the fan-out table")
    ap.add_argument("--fanout-ids", type=int, default=10, help="finished streams per model for the lookups")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="generated model shape")
    ap.add_argument("--timeout", type=float, default=120.0, help="socket timeout per read in s")
    args = ap.parse_args()
    if args.conversations < 1 or args.bound < 1 or args.clients < 1 or args.requests < 1 or args.lookups < 1:
        ap.error("counts must be at least 1")
    return run_bench(run, args)


if __name__ == "__main__":
    sys.exit(main())
