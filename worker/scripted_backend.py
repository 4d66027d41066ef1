"""A scripted backend for fault injection: slow loads, failing loads, slow or crashing
generation. It never stands in for llama.cpp in the end-to-end tests; it exists to make
timing-dependent failures (unload during a load, a crash mid-stream) happen on cue.

Knobs (model `options`): load_seconds, fail_load (message), token_seconds,
crash_after_tokens (exit code 70 after that many tokens), n_ctx.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from protocol.messages import ModelInfo, WorkerConfig
from worker.backend import Embeddings, Finish, Generation, GenParams, ProgressFn

CRASH_EXIT_CODE = 70


class ScriptedBackend:
    def __init__(self) -> None:
        self._opts: dict[str, object] = {}
        self._n_ctx = 0

    def load(self, config: WorkerConfig, progress: ProgressFn) -> ModelInfo:
        self._opts = dict(config.options)
        self._n_ctx = int(config.n_ctx or 512)
        print("scripted backend: loading", file=sys.stderr, flush=True)
        steps = 20
        for i in range(steps + 1):
            if not progress("load", i / steps):
                raise RuntimeError("load aborted")
            if i < steps:
                time.sleep(float(self._opts.get("load_seconds", 0.0)) / steps)  # type: ignore[arg-type]
        if "fail_load" in self._opts:
            raise RuntimeError(str(self._opts["fail_load"]))
        return ModelInfo(backend="scripted", device="cpu", n_ctx=self._n_ctx, n_ctx_train=self._n_ctx,
                         n_vocab=1000, n_params=0, file_size=0, chat_template=True)

    def chat(self, messages: list[dict[str, str]], params: GenParams,
             cancel: threading.Event) -> Generation:
        return self._generate(sum(len(m["content"].split()) for m in messages), params, cancel)

    def complete(self, prompt: str, params: GenParams, cancel: threading.Event) -> Generation:
        return self._generate(len(prompt.split()), params, cancel)

    def _generate(self, prompt_tokens: int, params: GenParams, cancel: threading.Event) -> Generation:
        limit = params.max_tokens or 16
        delay = float(self._opts.get("token_seconds", 0.0))  # type: ignore[arg-type]
        crash = int(self._opts.get("crash_after_tokens", -1))  # type: ignore[call-overload]
        count = 0
        print("scripted backend: generating", file=sys.stderr, flush=True)
        while count < limit and not cancel.is_set():
            if count == crash:
                os._exit(CRASH_EXIT_CODE)
            time.sleep(delay)
            count += 1
            yield f"tok{count} "
        yield Finish("length" if count >= limit else "stop", prompt_tokens, count)

    def embed(self, inputs: list[str]) -> Embeddings:
        return Embeddings([[float(len(t)), 1.0] for t in inputs], sum(len(t.split()) for t in inputs))

    def tokenize(self, text: str) -> list[int]:
        return list(range(len(text.split())))

    def close(self) -> None:
        pass
