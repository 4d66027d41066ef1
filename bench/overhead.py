"""What does going through modelherd cost? Same tiny model, same request, one run.

Measures time to first token (TTFT) and streamed tokens per second for:
  1. the library's own streaming call, in-process: llama-cpp-python's
     `create_chat_completion(stream=True)`, or mlx-lm's `stream_generate`;
  2. modelherd's backend called in-process (the worker's generation loop, no
     sockets): the baseline that isolates what the router + ZeroMQ add;
  3. the same request through a running modelherd daemon (HTTP -> router -> ZeroMQ
     -> worker -> back), read with a minimal raw-socket client so the client's own
     overhead stays out of the number.

`--backend llama_cpp` (a GGUF) or `--backend mlx` (the same shape as an MLX folder).
Both modelherd paths reuse the prompt cache (every request sends the same prompt);
mlx-lm's `stream_generate` is called without one, as its own examples do.

Two generated models: `tiny` (the test suite's, ~10k tok/s on one CPU core, so
per-token overhead is magnified ~100x against a real model) and `small` (still
random weights, ~30M parameters, slower per token). The router's CPU time per
streamed token is reported too, since on a 2-core machine it competes with the
worker for cores.

Usage: python -m bench.overhead [--requests 40] [--max-tokens 256] [--models tiny,small]
                                [--backend llama_cpp|mlx]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.rawhttp import completion_tokens
from bench.stats import pct
from tests.daemon import Daemon
from tests.tinymodels import SHAPES, write_tiny_gguf, write_tiny_mlx

NO_EOS = {"0": -100.0, "2": -100.0}  # tiny vocab's EOG tokens: every run makes max_tokens
MESSAGES = [{"role": "user", "content": "Tell me a story about a small computer."}]
N_CTX = 2048


class Sample:
    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.tps: list[float] = []

    def add(self, ttft: float, tokens: int, total: float) -> None:
        self.ttft.append(ttft)
        self.tps.append(tokens / total)




def interleaved(runs: dict[str, Callable[[], tuple[float, int, float]]], n: int,
                per_round: int = 4, warmup: int = 3) -> dict[str, Sample]:
    """Alternate the paths in short rounds so drift in machine speed hits all of them alike."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    samples = {name: Sample() for name in runs}
    for _ in range(max(1, n // per_round)):
        for name, run in runs.items():
            for _ in range(per_round):
                samples[name].add(*run())
    return samples


def llama_cpp_python(model: Path, max_tokens: int) -> Callable[[], tuple[float, int, float]]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), n_ctx=N_CTX, verbose=False)
    bias = {int(k): v for k, v in NO_EOS.items()}

    def run() -> tuple[float, int, float]:
        t0 = time.perf_counter()
        first = 0.0
        tokens = 0
        for chunk in llm.create_chat_completion(messages=MESSAGES, max_tokens=max_tokens, stream=True,
                                                seed=1, logit_bias=bias):  # type: ignore[arg-type]
            if chunk["choices"][0]["delta"].get("content"):  # type: ignore[index, union-attr]
                tokens += 1
                first = first or time.perf_counter() - t0
        return first, tokens, time.perf_counter() - t0

    return run


def mlx_lm_stream_generate(model: Path, max_tokens: int) -> Callable[[], tuple[float, int, float]]:
    import mlx_lm
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    mlx_model, tokenizer = mlx_lm.load(str(model))
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    processors = make_logits_processors({int(k): v for k, v in NO_EOS.items()})

    def run() -> tuple[float, int, float]:
        t0 = time.perf_counter()
        first = 0.0
        tokens = 0
        for r in mlx_lm.stream_generate(mlx_model, tokenizer, prompt, max_tokens=max_tokens,
                                        sampler=make_sampler(0.8, top_p=0.95, min_p=0.05, top_k=40),
                                        logits_processors=processors):
            tokens = r.generation_tokens
            first = first or time.perf_counter() - t0
        return first, tokens, time.perf_counter() - t0

    return run


def backend_in_process(model: Path, backend_name: str,
                       max_tokens: int) -> Callable[[], tuple[float, int, float]]:
    """The worker's generation without sockets: the chat template, the slots' decode loop
    and the token decoder, as the worker's engine drives them for one request."""
    from protocol.messages import WorkerConfig
    from worker.backend import SeqSpec
    from worker.backends import make_backend
    from worker.task import Message, Sampling, Task

    backend = make_backend(backend_name)
    backend.load(WorkerConfig(name="bench", path=str(model), backend=backend_name, n_ctx=N_CTX),
                 lambda s, v: True)
    backend.warm_up()  # as the worker's engine thread does, on the thread that decodes
    task = Task(messages=tuple(Message(m["role"], m["content"]) for m in MESSAGES))
    prompt = backend.chat_prompt(task)
    spec = SeqSpec(prompt.tokens, Sampling(seed=1, logit_bias=tuple((int(k), v) for k, v in NO_EOS.items())),
                   max_tokens=max_tokens)
    slots = backend.batcher

    def run() -> tuple[float, int, float]:
        t0 = time.perf_counter()
        first = 0.0
        tokens = 0
        decoder = backend.decoder()
        handle = slots.admit(spec)[0]
        while tokens < max_tokens:
            for s in slots.step():
                if backend.is_end(s.token):
                    tokens = max_tokens
                    break
                tokens += 1
                if decoder.add(s.token):
                    first = first or time.perf_counter() - t0
        slots.release(handle)
        return first, tokens, time.perf_counter() - t0

    return run


@dataclass(frozen=True)
class Route:
    """One streaming API the daemon serves: how to ask, and how its stream says things."""

    path: str
    body: dict[str, object]
    first_text: bytes  # in the event that carries the first generated text
    last_event: tuple[bytes, ...]  # in the event that ends the stream
    tokens: Callable[[bytes], int | None]


def _last_usage(key: str) -> Callable[[bytes], int | None]:
    def tokens(body: bytes) -> int | None:
        at = body.rfind(b'"usage":{')
        if at < 0:
            return None
        start = body.rfind(b"data: ", 0, at) + len(b"data: ")
        event = json.loads(body[start: body.index(b"\n", at)])
        usage = event.get("usage") or event.get("response", {}).get("usage")
        return int(usage[key])
    return tokens


ROUTES = {
    "/v1/chat/completions": Route("/v1/chat/completions", {
        "messages": MESSAGES, "stream_options": {"include_usage": True}},
        b'"delta":{"content":"', (b"data: [DONE]",), completion_tokens),
    "/v1/responses": Route("/v1/responses", {"input": MESSAGES},
                           b"response.output_text.delta",
                           (b"event: response.completed", b"event: response.incomplete"),
                           _last_usage("output_tokens")),
    "/v1/messages": Route("/v1/messages", {"messages": MESSAGES},
                          b'"text_delta"', (b"event: message_stop",), _last_usage("output_tokens")),
}


def through_daemon(port: int, model: str, max_tokens: int,
                   route: Route = ROUTES["/v1/chat/completions"]) -> Callable[[], tuple[float, int, float]]:
    limit = "max_output_tokens" if route.path == "/v1/responses" else "max_tokens"
    body = json.dumps({"model": model, limit: max_tokens, "stream": True, "seed": 1, "logit_bias": NO_EOS,
                       **route.body}).encode()
    request = (f"POST {route.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    conn: list[socket.socket] = []

    def connect() -> socket.socket:
        # Keep-alive like a real client; reconnect when the server closed an idle connection.
        if conn:
            conn.pop().close()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.append(sock)
        return sock

    def once(sock: socket.socket) -> tuple[float, int, float]:
        t0 = time.perf_counter()
        sock.sendall(request)
        parts: list[bytes] = []
        first = 0.0
        tail = b""
        while not any(end in tail for end in route.last_event):
            data = sock.recv(262144)
            if not data:
                raise ConnectionError("connection closed")
            if not first and route.first_text in data:
                first = time.perf_counter() - t0
            parts.append(data)
            tail = tail[-64:] + data
        total = time.perf_counter() - t0
        while not tail.endswith(b"0\r\n\r\n"):  # the chunked terminator, so keep-alive stays in sync
            data = sock.recv(65536)
            parts.append(data)
            tail = tail[-64:] + data
        tokens = route.tokens(b"".join(parts))
        if tokens is None:
            raise RuntimeError("stream ended without a usage event")
        return first or total, tokens, total

    def run() -> tuple[float, int, float]:
        try:
            return once(conn[0] if conn else connect())
        except ConnectionError:
            return once(connect())

    return run


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def bench_shape(shape: str, backend: str, work: Path, requests: int, max_tokens: int) -> None:
    models = work / shape / "models"
    if backend == "mlx":
        model = write_tiny_mlx(models / shape, seed=1, shape=SHAPES[shape])
        size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        reference_name = "mlx-lm in-process (stream_generate)"
        run_ref = mlx_lm_stream_generate(model, max_tokens)
    else:
        model = write_tiny_gguf(models / f"{shape}.gguf", seed=1, shape=SHAPES[shape])
        size = model.stat().st_size
        reference_name = "llama-cpp-python in-process (create_chat_completion stream)"
        run_ref = llama_cpp_python(model, max_tokens)
    cfg = work / shape / "cfg.toml"
    cfg.write_text(f'[server]\nmodels_dirs = ["{models}"]\n[defaults]\nn_ctx = {N_CTX}\n')
    reference = Sample()
    for _ in range(max(3, requests // 8)):  # llama-cpp-python's is slow (quadratic detokenize)
        reference.add(*run_ref())
    names = ("modelherd backend in-process (worker's generation loop)",
             "through modelherd (HTTP -> router -> ZeroMQ -> worker)")
    others = {f"  same, {path}": route for path, route in ROUTES.items() if path != "/v1/chat/completions"}
    with Daemon("--config", str(cfg), env={"XDG_RUNTIME_DIR": str(work)}) as d:
        d.load(shape)
        assert d.proc is not None
        router_cpu = cpu_seconds(d.proc.pid)
        runs = {names[0]: backend_in_process(model, backend, max_tokens),
                names[1]: through_daemon(d.port, shape, max_tokens)}
        for name, route in others.items():
            runs[name] = through_daemon(d.port, shape, max_tokens, route)
        samples = interleaved(runs, requests)
        router_cpu = cpu_seconds(d.proc.pid) - router_cpu
    base, via = samples[names[0]], samples[names[1]]
    rows = [(reference_name, reference), (names[0], base), (names[1], via),
            *[(name, samples[name]) for name in others]]
    n_via = sum(len(samples[n].tps) + 3 for n in (names[1], *others))
    kind = "MLX safetensors" if backend == "mlx" else "GGUF"
    print(f"\nmodel `{shape}` ({size / 1e6:.1f} MB {kind}, random weights, {backend}), "
          f"{requests} requests per path, {max_tokens} streamed tokens each, n_ctx {N_CTX}, CPU\n")
    print(f"| {'path':<62} | TTFT p50 ms | TTFT p95 ms | tok/s p50 |")
    print(f"|{'-' * 64}|-------------|-------------|-----------|")
    for name, s in rows:
        print(f"| {name:<62} | {pct(s.ttft, 50) * 1e3:11.2f} | {pct(s.ttft, 95) * 1e3:11.2f} "
              f"| {statistics.median(s.tps):9.0f} |")
    added = (pct(via.ttft, 50) - pct(base.ttft, 50)) * 1e3
    ratio = statistics.median(via.tps) / statistics.median(base.tps)
    print(f"\nadded TTFT p50 (modelherd - backend in-process): {added:.2f} ms  (target <= 2 ms)")
    print(f"tok/s ratio (modelherd / backend in-process):     {ratio:.3f}  (target >= 0.95)")
    ref_ratio = statistics.median(via.tps) / statistics.median(reference.tps)
    ref_added = (pct(via.ttft, 50) - pct(reference.ttft, 50)) * 1e3
    print(f"vs {reference_name}: added TTFT p50 {ref_added:.2f} ms, tok/s ratio {ref_ratio:.2f}")
    print(f"router CPU per streamed token:                    "
          f"{router_cpu / (n_via * max_tokens) * 1e6:.0f} us")
    for name in others:
        other = samples[name]
        print(f"{name.strip()} vs chat through modelherd: TTFT p50 "
              f"{(pct(other.ttft, 50) - pct(via.ttft, 50)) * 1e3:+.2f} ms, tok/s ratio "
              f"{statistics.median(other.tps) / statistics.median(via.tps):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--backend", choices=("llama_cpp", "mlx"), default="llama_cpp")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="modelherd-bench-"))
    for shape in args.models.split(","):
        bench_shape(shape, args.backend, work, args.requests, args.max_tokens)


if __name__ == "__main__":
    main()
