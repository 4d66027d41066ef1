"""Slots on mlx-lm's BatchGenerator: several sequences decoded together (continuous batching).

Each admitted sequence is inserted into one BatchGenerator with its own cache, sampler and
logits processors (worker.mlx_sampling). Every `step` is one `next()` of the generator:
one decode of all generating sequences, plus one chunk (`prefill_step_size` tokens) of
the prompts still being read, so a long prompt delays the others by a chunk at most and
a release between steps stops it between chunks. The generator samples one step ahead:
a token it returns is already in its sequence's cache.

Sequences have no slot of their own between requests (as llama.cpp's do): the cache of a
sequence that leaves goes to the prompt cache (worker.mlx_cache), with the tokens it holds,
and a new sequence starts from the entry sharing the longest prefix with its prompt.

With n > 1 choices, the prompt is read once: the other choices wait until the first has
read all but the prompt's last token, then start from a copy of its cache. The same point
is a checkpoint for models whose cache cannot be cut (recurrent layers, sliding windows):
their state at the end of the prompt is kept too, so the same prompt again, or one that
goes on from it, need not be read again from the start.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import KVCache, can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from protocol.errors import ErrorKind
from worker.backend import CacheInfo, Sampled, SeqSpec, SeqStats, SlotInfo
from worker.mlx_cache import MlxPromptCache
from worker.mlx_sampling import Processor, Sampler, make_processors, make_sampler, token_probs
from worker.schema import RequestInvalid

# The engine decides when a sequence ends (end tokens, stop strings): mlx-lm stops none.
_NO_STOPS = StopSequences()


class GrammarUnsupported(RequestInvalid, ValueError):
    """A grammar reached the MLX slots. Also a ValueError: the engine's admit handles that
    (as a grammar it cannot use) instead of its thread dying on an unexpected exception."""


@dataclass(eq=False)
class _Seq:
    handle: int
    slot: int
    spec: SeqSpec
    origin: int  # the request it belongs to (its first choice's handle)
    sampler: Sampler
    processors: list[Processor]
    stats: SeqStats
    uid: int | None = None  # in the generator; None before a fork starts, or once it is out
    held: int = 0  # tokens its cache holds
    forks: list[_Seq] = field(default_factory=list)  # n > 1: choices waiting for this prompt
    final: tuple[list[Any], list[int]] | None = None  # mlx-lm ended it (max_tokens): its cache
    broken: bool = False  # a failed step left its cache in doubt: it is not kept


class MlxSlots:
    def __init__(self, model: Any, *, parallel: int, n_ctx: int, prefill_step: int, cache_ram_bytes: int,
                 stream: Any) -> None:
        self._model = model
        self.n_ctx = n_ctx
        self._prefill_step = prefill_step
        self._stream = stream
        self._gen = self._generator(parallel)
        self._slots: list[_Seq | None] = [None] * parallel
        self._by_handle: dict[int, _Seq] = {}
        self._by_uid: dict[int, _Seq] = {}
        self._handles = itertools.count(1)
        self.cache = MlxPromptCache(cache_ram_bytes)
        # A cache other than plain KV (a recurrent state, a sliding window) may not be cut
        # back once used: such models keep a checkpoint at the end of each prompt.
        self._checkpoints = any(type(c) is not KVCache for c in make_prompt_cache(model))

    def _generator(self, parallel: int) -> Any:  # mlx-lm's BatchGenerator (untyped)
        return BatchGenerator(self._model, completion_batch_size=parallel, prefill_batch_size=parallel,
                              prefill_step_size=self._prefill_step, stream=self._stream)

    def close(self) -> None:
        self._gen.close()
        self._by_handle.clear()
        self._by_uid.clear()

    # ---- views ----------------------------------------------------------------------

    @property
    def parallel(self) -> int:
        return len(self._slots)

    @property
    def free(self) -> int:
        return sum(1 for s in self._slots if s is None)

    @property
    def busy(self) -> bool:
        return bool(self._by_handle)

    def stats(self, handle: int) -> SeqStats:
        return self._by_handle[handle].stats

    def info(self) -> list[SlotInfo]:
        return [SlotInfo(i, self.n_ctx, s is not None, s.held if s else 0, s.spec.conversation if s else None,
                         s.handle if s else None) for i, s in enumerate(self._slots)]

    def cache_info(self) -> CacheInfo:
        c = self.cache
        return CacheInfo(len(c), c.bytes, c.max_bytes, c.hits, c.misses)

    # ---- joining and leaving ------------------------------------------------------------

    def admit(self, spec: SeqSpec) -> list[int]:
        """Queue `spec`'s n choices; returns one handle per choice. Nothing is evaluated
        here: the prompt is read by the next steps. The caller checks `free` first."""
        if spec.grammar is not None or spec.lazy is not None:
            raise GrammarUnsupported("grammars (and the JSON or tool-call formats built on them) are not "
                                     "supported by the mlx backend: serve this model as a GGUF for "
                                     "constrained decoding", kind=ErrorKind.UNSUPPORTED, param="grammar")
        idle = [i for i, s in enumerate(self._slots) if s is None]
        if len(idle) < spec.n:
            raise RuntimeError(f"{spec.n} slot(s) asked for, {len(idle)} idle")
        if not spec.prompt:
            raise RequestInvalid("the prompt is empty", param="prompt")
        cache, tokens = self._take(spec)
        now = time.perf_counter()
        seqs: list[_Seq] = []
        for choice, slot in zip(range(spec.n), idle, strict=False):
            handle = next(self._handles)
            stats = SeqStats(len(tokens), len(spec.prompt) - len(tokens), bool(tokens), now)
            origin = seqs[0].handle if seqs else handle
            seq = _Seq(handle, slot, spec, origin, make_sampler(spec.sampling, choice),
                       make_processors(spec.sampling), stats, held=len(tokens))
            seqs.append(seq)
            self._slots[slot] = seq
            self._by_handle[handle] = seq
        primary, forks = seqs[0], seqs[1:]
        if len(spec.prompt) - len(tokens) > 1:
            self._insert(primary, cache, tokens)
            primary.forks = forks  # they start from its cache once it has read the prompt
        else:
            for seq in seqs:  # only the last token to read: each choice reads it from the cache
                self._insert(seq, cache, tokens)
        return [s.handle for s in seqs]

    def release(self, handle: int) -> None:
        """The sequence is done or cancelled: its slot is free, its cache goes to the prompt
        cache (a prompt read only in part keeps what was read)."""
        seq = self._by_handle.pop(handle, None)
        if seq is None:
            return
        self._slots[seq.slot] = None
        for other in self._by_handle.values():  # a choice still waiting for the prompt: it never starts
            if seq in other.forks:
                other.forks.remove(seq)
        held = None
        if seq.uid is not None:
            uid, seq.uid = seq.uid, None
            del self._by_uid[uid]
            with mx.stream(self._gen.stream):
                held = self._gen.remove([uid], return_prompt_caches=True).get(uid)
        elif seq.final is not None:
            held, seq.final = seq.final, None
        if seq.forks:  # it left before the prompt was read: the other choices read on from its cache
            cache, tokens = held if held is not None else (make_prompt_cache(self._model), [])
            for fork in seq.forks:
                self._insert(fork, cache, tokens)
            seq.forks = []
        if held is not None and not seq.broken and len(held[1]) > seq.stats.cached:
            self._save(held[0], held[1], seq)

    # ---- one step ----------------------------------------------------------------------

    def step(self, paused: AbstractSet[int] = frozenset()) -> list[Sampled]:
        """One `next()` of the generator; returns the tokens it sampled. mlx-lm's generator
        cannot leave a sequence out of a step: a `paused` one runs on, and the engine holds
        its bytes until its client reads them."""
        if not self._by_uid:
            return []
        try:
            prompt_out, gen_out = self._gen.next()
        except Exception:
            self._reset()
            raise
        now = time.perf_counter()
        for p in prompt_out:
            seq = self._by_uid.get(p.uid)
            if seq is None:
                continue
            seq.held = seq.stats.cached + int(p.progress[0])
            seq.stats.read = int(p.progress[0])
            if p.end_of_prompt:
                seq.stats.prompt_done_at = now
            elif p.end_of_segment:  # all but the prompt's last token read (see admit)
                self._checkpoint(seq)
        out = []
        for r in gen_out:
            seq = self._by_uid.get(r.uid)
            if seq is None:
                continue
            seq.held += 1
            if r.finish_reason is not None:  # max_tokens: mlx-lm dropped it from the batch
                del self._by_uid[r.uid]
                seq.uid = None
                seq.final = (r.prompt_cache, list(r.all_tokens))
            k = seq.spec.logprobs
            out.append(Sampled(seq.handle, int(r.token), token_probs(r.logprobs, r.token, k) if k is not None
                               else None))
        return out

    # ---- inner workings ---------------------------------------------------------------

    def _take(self, spec: SeqSpec) -> tuple[list[Any], tuple[int, ...]]:
        """The cache to start from and the prompt tokens it holds."""
        if spec.cache_prompt:
            entry, keep = self.cache.find(spec.prompt, spec.conversation)
            if entry is not None:
                if keep == len(entry.tokens):
                    return entry.cache, entry.tokens  # the batch copies what it reads: shared as is
                return _cut(entry.cache, len(entry.tokens) - keep), entry.tokens[:keep]
        return make_prompt_cache(self._model), ()

    def _insert(self, seq: _Seq, cache: list[Any], tokens: Any) -> None:
        spec = seq.spec
        rest = list(spec.prompt[len(tokens):])
        # all_tokens: what the cache holds; mlx-lm extends it in place, and its penalties
        # read the last of it (the prompt's tail).
        (uid,) = self._gen.insert_segments([[rest]], max_tokens=[max(1, spec.max_tokens)], caches=[cache],
                                           all_tokens=[list(tokens)], samplers=[seq.sampler],
                                           logits_processors=[seq.processors], stop_sequences=[_NO_STOPS])
        seq.uid = uid
        seq.held = len(tokens)
        self._by_uid[uid] = seq

    def _checkpoint(self, seq: _Seq) -> None:
        """Its cache holds the prompt but its last token: start the waiting choices from
        it, and keep it when the model's cache cannot be cut back later."""
        if not seq.forks and not (self._checkpoints and seq.spec.cache_prompt):
            return
        assert seq.uid is not None
        with mx.stream(self._gen.stream):
            cache, tokens = self._gen.extract_cache([seq.uid])[seq.uid]
            tokens = list(tokens)  # the generator's own list goes on growing
            mx.eval([c.state for c in cache])
        for fork in seq.forks:
            self._insert(fork, cache, tokens)
        seq.forks = []
        if self._checkpoints and seq.spec.cache_prompt and not can_trim_prompt_cache(cache):
            self._save(cache, tokens, seq)

    def _save(self, cache: list[Any], tokens: list[int], seq: _Seq) -> None:
        if self.cache.max_bytes <= 0 or self.cache.holds(tokens):
            return
        with mx.stream(self._gen.stream):
            mx.eval([c.state for c in cache])  # a copy of its own, not a view of the batch's arrays
        size = sum(int(c.nbytes) for c in cache)
        self.cache.put(tokens, cache, size, can_trim_prompt_cache(cache), seq.spec.conversation, seq.origin)

    def _reset(self) -> None:
        """A step failed part way: the generator's state is in doubt. Its sequences end
        (the engine releases them) and keep no cache; the slots go on with a new one."""
        for seq in self._by_handle.values():
            seq.broken = True
            seq.uid = None
            seq.final = None
            seq.forks = []
        self._by_uid.clear()
        old, self._gen = self._gen, self._generator(self.parallel)
        old.close()


def _cut(cache: list[Any], n: int) -> list[Any]:
    """A copy of `cache` without its last `n` tokens; the original stays as it is. A plain
    KV cache is copied as a view (the batch copies what it reads), any other in full."""
    out = [copy.copy(c) if type(c) is KVCache else copy.deepcopy(c) for c in cache]
    trim_prompt_cache(out, n)
    return out
