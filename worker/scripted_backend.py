"""A scripted backend for fault injection: slow loads, failing loads, slow or crashing
generation. It never stands in for llama.cpp in the end-to-end tests; it exists to make
timing-dependent failures (unload during a load, a crash mid-stream) happen on cue.

A toy vocabulary: token k reads "tok{k} ", token 0 is the end (never generated); a
prompt's tokens are its words. Every sequence generates 1, 2, 3... one token per step,
`parallel` sequences at a time, and each step takes `token_seconds`: a slow model.

Knobs (model `options`): load_seconds, fail_load (message), token_seconds,
crash_after_tokens (exit code 70 when a sequence that generated that many tokens would
generate another), parallel (default 4); n_ctx from the model's config (default 512).
"""

from __future__ import annotations

import itertools
import os
import sys
import time
import zlib
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from protocol.messages import ModelInfo, WorkerConfig
from worker.backend import CacheInfo, Embeddings, ProgressFn, Prompt, Sampled, SeqSpec, SeqStats, SlotInfo
from worker.task import Task

CRASH_EXIT_CODE = 70
N_VOCAB = 1000
END = 0


@dataclass(eq=False)
class _Seq:
    handle: int
    slot: int
    prompt: int
    conversation: str | None
    stats: SeqStats
    count: int = 0


class ScriptedSlots:
    def __init__(self, parallel: int, n_ctx: int, token_seconds: float, crash_after: int) -> None:
        self.n_ctx = n_ctx
        self._slots: list[_Seq | None] = [None] * parallel
        self._by_handle: dict[int, _Seq] = {}
        self._handles = itertools.count(1)
        self._delay = token_seconds
        self._crash_after = crash_after

    @property
    def parallel(self) -> int:
        return len(self._slots)

    @property
    def free(self) -> int:
        return sum(1 for s in self._slots if s is None)

    @property
    def busy(self) -> bool:
        return bool(self._by_handle)

    def admit(self, spec: SeqSpec) -> list[int]:
        idle = [i for i, s in enumerate(self._slots) if s is None]
        if len(idle) < spec.n:
            raise RuntimeError(f"{spec.n} slot(s) asked for, {len(idle)} idle")
        print("scripted backend: generating", file=sys.stderr, flush=True)  # tests wait for it
        now = time.perf_counter()
        handles = []
        for slot in idle[: spec.n]:
            seq = _Seq(next(self._handles), slot, len(spec.prompt), spec.conversation,
                       SeqStats(0, len(spec.prompt), False, now, now))
            self._slots[slot] = seq
            self._by_handle[seq.handle] = seq
            handles.append(seq.handle)
        return handles

    def step(self, paused: AbstractSet[int] = frozenset()) -> list[Sampled]:
        running = [s for s in self._slots if s is not None and s.handle not in paused]
        if not running:
            return []
        if any(s.count == self._crash_after for s in running):
            os._exit(CRASH_EXIT_CODE)
        time.sleep(self._delay)  # the point of this backend: a model this slow
        out = []
        for seq in running:
            seq.count += 1
            out.append(Sampled(seq.handle, seq.count % N_VOCAB or 1))
        return out

    def release(self, handle: int) -> None:
        seq = self._by_handle.pop(handle, None)
        if seq is not None:
            self._slots[seq.slot] = None

    def stats(self, handle: int) -> SeqStats:
        return self._by_handle[handle].stats

    def info(self) -> list[SlotInfo]:
        return [SlotInfo(i, self.n_ctx, s is not None, s.prompt + s.count if s else 0,
                         s.conversation if s else None, s.handle if s else None)
                for i, s in enumerate(self._slots)]

    def cache_info(self) -> CacheInfo:
        return CacheInfo(0, 0, 0, 0, 0)


class ScriptedBackend:
    supports_grammar = False

    def __init__(self) -> None:
        self._opts: dict[str, object] = {}
        self._n_ctx = 0
        self._slots: ScriptedSlots | None = None

    def load(self, config: WorkerConfig, progress: ProgressFn) -> ModelInfo:
        self._opts = dict(config.options)
        self._n_ctx = int(config.n_ctx or 512)
        print("scripted backend: loading", file=sys.stderr, flush=True)
        steps = 20
        for i in range(steps + 1):
            if not progress("load", i / steps):
                raise RuntimeError("load aborted")
            if i < steps:
                time.sleep(self._number("load_seconds", 0.0) / steps)
        if "fail_load" in self._opts:
            raise RuntimeError(str(self._opts["fail_load"]))
        self._slots = ScriptedSlots(int(self._number("parallel", 4)), self._n_ctx,
                                    self._number("token_seconds", 0.0),
                                    int(self._number("crash_after_tokens", -1)))
        return ModelInfo(backend="scripted", device="cpu", n_ctx=self._n_ctx, n_ctx_train=self._n_ctx,
                         n_vocab=N_VOCAB, n_params=0, file_size=0, chat_template=True)

    def _number(self, name: str, default: float) -> float:
        value = self._opts.get(name, default)
        return float(value) if isinstance(value, int | float) else default

    @property
    def batcher(self) -> ScriptedSlots:
        assert self._slots is not None, "model is not loaded"
        return self._slots

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def chat_prompt(self, task: Task) -> Prompt:
        text = "".join(f"{m.role}: {m.content}\n" for m in task.messages or ()) + "assistant:"
        return Prompt(tuple(self.tokenize(text)), text)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return [_word_token(w) for w in text.split()]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return "".join(self.token_text(t) for t in tokens)

    def piece(self, token: int) -> bytes:
        return self.token_text(token).encode()

    def token_text(self, token: int) -> str:
        return "" if token == END else f"tok{token} "

    def decoder(self) -> _Decoder:
        return _Decoder(self)

    def special_tokens(self) -> dict[str, int]:
        return {"eos": END}

    def is_end(self, token: int) -> bool:
        return token == END

    def embed(self, inputs: Sequence[Sequence[int]], normalize: int) -> Embeddings:
        return Embeddings([[float(len(t)), 1.0] for t in inputs], sum(len(t) for t in inputs))

    def warm_up(self) -> None:
        pass

    def close(self) -> None:
        self._slots = None


class _Decoder:
    def __init__(self, backend: ScriptedBackend) -> None:
        self._backend = backend

    def add(self, token: int) -> str:
        return self._backend.token_text(token)

    def flush(self) -> str:
        return ""


def _word_token(word: str) -> int:
    """"tok{k}" is token k; any other word some token of the toy vocabulary (not the end)."""
    if word.startswith("tok") and word[3:].isdigit() and 0 < int(word[3:]) < N_VOCAB:
        return int(word[3:])
    return 1 + zlib.crc32(word.encode()) % (N_VOCAB - 1)
