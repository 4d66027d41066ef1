"""Slots: several sequences in one llama.cpp context, decoded together (continuous batching).

A model's context holds `parallel` sequences, one per slot, each in a KV stream of its own
(n_ctx cells): each slot is one conversation's context. Every `step` makes one
`llama_decode` call carrying the next token of each generating sequence and then chunks
of the prompts still being read, up to `n_batch` tokens, so a long prompt delays the
others by one chunk at most. Sequences join (`admit`) and leave (`release`) between steps.

Sampling runs in C: each sequence has its own llama.cpp sampler chain (logit bias,
grammar, penalties, top-k/top-p/min-p, temperature, a seeded distribution). Python
touches a token only to batch it and to read what was sampled; log-probabilities are
computed (numpy) only for requests that ask for them.

A request takes the idle slot whose cached tokens share the longest prefix with its
prompt (its conversation's slot first) and evaluates only the rest. Before a slot's
tokens are cut for another prompt, its state is saved to the host-RAM prompt cache
(worker.prompt_cache) and restored when a prompt comes back that continues it.
"""

from __future__ import annotations

import ctypes
import itertools
import random
import time
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import llama_cpp as L
import numpy as np

from worker.backend import CacheInfo, LazyGrammar, Sampled, SeqSpec, SeqStats, SlotInfo, TokenProbs
from worker.prompt_cache import PromptCache, common_prefix

# Below this many tokens a slot's state is not worth a copy in RAM: reading it again is cheap.
MIN_SAVE_TOKENS = 32
# A RAM entry is restored only when it saves at least this many tokens over what a slot holds.
MIN_RESTORE_GAIN = 16


class DecodeError(Exception):
    """llama_decode failed: the sequences in the batch cannot go on."""


@dataclass(eq=False)
class _Slot:
    id: int  # also its sequence id in the context
    tokens: list[int] = field(default_factory=list)  # what its KV cache holds, in order
    handle: int | None = None
    conversation: str | None = None
    last_used: int = 0
    saved: bool = False  # the RAM cache holds exactly `tokens`
    pending: list[int] = field(default_factory=list)  # prompt tokens still to evaluate
    next_token: int | None = None  # sampled, not evaluated yet
    chain: Any = None
    logprobs: int | None = None
    forks: list[_Slot] = field(default_factory=list)  # n > 1: slots that copy this prompt
    waiting_fork: bool = False  # a fork: waits for its primary's prompt
    stats: SeqStats = field(default_factory=SeqStats)
    out_index: int = -1  # its row of logits in the last batch, or -1


class LlamaSlots:
    def __init__(self, ctx: Any, vocab: Any, *, parallel: int, n_ctx: int, n_batch: int,
                 cache_ram_bytes: int) -> None:
        self._ctx = ctx
        self._vocab = vocab
        self._mem = L.llama_get_memory(ctx)
        self.n_ctx = n_ctx  # per slot
        self.n_batch = n_batch
        self.n_vocab = L.llama_vocab_n_tokens(vocab)
        self._slots = [_Slot(i) for i in range(parallel)]
        self._batch = L.llama_batch_init(n_batch + parallel, 0, 1)
        self._handles = itertools.count(1)
        self._uses = itertools.count(1)
        self._by_handle: dict[int, _Slot] = {}
        self.cache = PromptCache(cache_ram_bytes)
        self.prompt_hits = 0  # requests whose prompt was (partly) cached

    def close(self) -> None:
        for slot in self._slots:
            self._free_chain(slot)
        L.llama_batch_free(self._batch)

    # ---- views ----------------------------------------------------------------------

    @property
    def parallel(self) -> int:
        return len(self._slots)

    @property
    def free(self) -> int:
        return sum(1 for s in self._slots if s.handle is None)

    @property
    def busy(self) -> bool:
        return bool(self._by_handle)

    def info(self) -> list[SlotInfo]:
        return [SlotInfo(s.id, self.n_ctx, s.handle is not None, len(s.tokens), s.conversation, s.handle)
                for s in self._slots]

    def cache_info(self) -> CacheInfo:
        c = self.cache
        return CacheInfo(len(c), c.bytes, c.max_bytes, c.hits, c.misses)

    def stats(self, handle: int) -> SeqStats:
        return self._by_handle[handle].stats

    def holding(self, handle: int) -> int:
        """How many tokens the sequence's KV cache holds (prompt and generated)."""
        return len(self._by_handle[handle].tokens)

    # ---- joining and leaving ------------------------------------------------------------

    def admit(self, spec: SeqSpec) -> list[int]:
        """Give `spec` n idle slots; returns one handle per choice. The caller checks `free`
        first; a bad grammar raises ValueError before anything changes."""
        chains = [self._chain(spec, i) for i in range(spec.n)]
        try:
            idle = [s for s in self._slots if s.handle is None]
            if len(idle) < spec.n:
                raise RuntimeError(f"{spec.n} slot(s) asked for, {len(idle)} idle")
            primary, restored = self._pick(idle, spec)
            forks = sorted((s for s in idle if s is not primary),
                           key=lambda s: (len(s.tokens) > 0, s.last_used))[: spec.n - 1]
        except BaseException:
            for chain in chains:
                L.llama_sampler_free(chain)
            raise
        handles = []
        for slot, chain in zip([primary, *forks], chains, strict=True):
            handle = next(self._handles)
            handles.append(handle)
            self._by_handle[handle] = slot
            slot.handle = handle
            slot.chain = chain
            slot.logprobs = spec.logprobs
            slot.conversation = spec.conversation
            slot.last_used = next(self._uses)
            slot.next_token = None
            slot.out_index = -1
            slot.stats = SeqStats(admitted_at=time.perf_counter())
        now = primary.stats.admitted_at
        primary.stats.restored = restored
        self._place(primary, spec)
        primary.forks = forks
        for fork in forks:
            self._save(fork)
            L.llama_memory_seq_rm(self._mem, fork.id, -1, -1)
            fork.tokens = []
            fork.saved = False
            fork.waiting_fork = True
            fork.stats = SeqStats(primary.stats.cached, primary.stats.evaluated, primary.stats.restored, now)
        # Repetition penalties look back into the prompt, as llama.cpp's server does.
        window = spec.prompt[-64:]
        for slot in (primary, *forks):
            penalties = L.llama_sampler_chain_get(slot.chain, 0) if self._has_penalties(spec) else None
            if penalties:
                for token in window:
                    L.llama_sampler_accept(penalties, token)
        return handles

    def release(self, handle: int) -> None:
        """The sequence is done or cancelled: its slot is idle, its KV cache kept for reuse.
        A prompt read only in part keeps what was read."""
        slot = self._by_handle.pop(handle, None)
        if slot is None:
            return
        slot.handle = None
        slot.pending = []
        slot.next_token = None
        slot.out_index = -1
        slot.waiting_fork = False
        for fork in slot.forks:
            fork.waiting_fork = False
        slot.forks = []
        slot.last_used = next(self._uses)
        self._free_chain(slot)

    # ---- one decode --------------------------------------------------------------------

    def step(self, paused: AbstractSet[int] = frozenset()) -> list[Sampled]:
        """Decode one batch; returns the token sampled for each sequence that got logits.
        Sequences in `paused` (their client reads slowly) sit this step out."""
        batch = self._batch
        n = 0
        rows: list[_Slot] = []
        for slot in self._slots:
            slot.out_index = -1
            if slot.handle in paused:
                continue
            if slot.handle is not None and slot.next_token is not None:
                n = self._add(batch, n, slot, [slot.next_token], logits_last=True)
                slot.tokens.append(slot.next_token)
                slot.next_token = None
                rows.append(slot)
        budget = self.n_batch - n
        prompt_done: list[_Slot] = []
        chunks: list[tuple[_Slot, int]] = []
        for slot in sorted((s for s in self._slots if s.handle is not None and s.pending
                            and s.handle not in paused), key=lambda s: s.last_used):
            if budget <= 0:
                break
            chunk = slot.pending[:budget]
            last = len(chunk) == len(slot.pending)
            n = self._add(batch, n, slot, chunk, logits_last=last)
            slot.tokens.extend(chunk)
            slot.saved = False
            del slot.pending[: len(chunk)]
            chunks.append((slot, len(chunk)))
            budget -= len(chunk)
            if last:
                rows.append(slot)
                prompt_done.append(slot)
        if n == 0:
            return []
        batch.n_tokens = n
        code = L.llama_decode(self._ctx, batch)
        if code != 0:
            raise DecodeError(f"llama_decode returned {code}")
        now = time.perf_counter()
        for slot, count in chunks:
            slot.stats.read += count
        for slot in prompt_done:
            slot.stats.prompt_done_at = now
            for fork in slot.forks:  # n > 1: the other choices start from this prompt's cache
                L.llama_memory_seq_cp(self._mem, slot.id, fork.id, -1, -1)
                fork.tokens = list(slot.tokens)
                fork.waiting_fork = False
                fork.out_index = slot.out_index
                fork.stats.prompt_done_at = now
                rows.append(fork)
            slot.forks = []
        out = []
        for slot in rows:
            assert slot.handle is not None
            token = L.llama_sampler_sample(slot.chain, self._ctx, slot.out_index)
            slot.next_token = token
            probs = self._probs(slot, token) if slot.logprobs is not None else None
            out.append(Sampled(slot.handle, token, probs))
        return out

    # ---- inner workings ---------------------------------------------------------------

    def _add(self, batch: Any, n: int, slot: _Slot, tokens: Sequence[int], logits_last: bool) -> int:
        pos = len(slot.tokens)
        seq = slot.id
        for i, token in enumerate(tokens):
            batch.token[n] = token
            batch.pos[n] = pos + i
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = seq
            batch.logits[n] = 0
            n += 1
        if logits_last:
            batch.logits[n - 1] = 1
            slot.out_index = n - 1
        return n

    def _pick(self, idle: list[_Slot], spec: SeqSpec) -> tuple[_Slot, bool]:
        """The idle slot whose cache serves `spec` best, and whether it was restored from the
        RAM cache: the slot sharing the longest prefix (its conversation's on a tie, then
        the least recently used), unless the RAM cache holds a longer one."""
        prompt = spec.prompt
        if not spec.cache_prompt:
            return min(idle, key=lambda s: (len(s.tokens) > 0, s.last_used)), False

        def score(s: _Slot) -> tuple[int, bool, int]:
            own = spec.conversation is not None and s.conversation == spec.conversation
            return common_prefix(s.tokens, prompt), own, -s.last_used

        best = max(idle, key=score)
        best_n = common_prefix(best.tokens, prompt)
        entry, ram_n = self.cache.find(prompt, spec.conversation)
        if entry is None or ram_n < best_n + MIN_RESTORE_GAIN:
            self.cache.count(hit=False)
            return best, False
        # Restore into the slot whose loss matters least: one holding nothing of this prompt.
        target = min(idle, key=lambda s: (common_prefix(s.tokens, prompt) > 0, s.last_used))
        self._save(target)
        L.llama_memory_seq_rm(self._mem, target.id, -1, -1)
        target.saved = False
        if L.llama_state_seq_set_data(self._ctx, entry.state, entry.size, target.id) != entry.size:
            L.llama_memory_seq_rm(self._mem, target.id, -1, -1)  # could not: read it all again
            target.tokens = []
            return target, False
        target.tokens = list(entry.tokens)
        target.saved = True
        self.cache.count(hit=True)
        return target, True

    def _place(self, slot: _Slot, spec: SeqSpec) -> None:
        """Keep the slot's cache up to the prompt's common prefix (saving what would be lost)
        and queue the rest of the prompt. At least one token is evaluated: sampling starts
        from the logits of the last."""
        prompt = spec.prompt
        keep = min(common_prefix(slot.tokens, prompt), len(prompt) - 1) if spec.cache_prompt else 0
        if keep < len(slot.tokens):
            if len(slot.tokens) - keep >= MIN_SAVE_TOKENS:
                self._save(slot)
            L.llama_memory_seq_rm(self._mem, slot.id, keep, -1)
            del slot.tokens[keep:]
            slot.saved = False
        slot.pending = list(prompt[keep:])
        slot.stats.cached = keep
        slot.stats.evaluated = len(slot.pending)
        if keep:
            self.prompt_hits += 1

    def _save(self, slot: _Slot) -> None:
        """Copy the slot's state to the RAM cache, unless it holds nothing worth keeping."""
        if slot.saved or len(slot.tokens) < MIN_SAVE_TOKENS or self.cache.max_bytes <= 0:
            return
        if self.cache.holds(slot.tokens):
            slot.saved = True
            return
        size = L.llama_state_seq_get_size(self._ctx, slot.id)
        if size <= 0 or size > self.cache.max_bytes:
            return
        buf = (ctypes.c_uint8 * size)()
        got = L.llama_state_seq_get_data(self._ctx, buf, size, slot.id)
        if got == size and self.cache.put(slot.tokens, buf, size, slot.conversation):
            slot.saved = True

    def _has_penalties(self, spec: SeqSpec) -> bool:
        s = spec.sampling
        return s.repeat_penalty != 1.0 or s.frequency_penalty != 0.0 or s.presence_penalty != 0.0

    def _chain(self, spec: SeqSpec, choice: int) -> Any:
        """The sampler chain of one choice, in llama.cpp's server order."""
        s = spec.sampling
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        try:
            if self._has_penalties(spec):  # first: admit() feeds it the prompt's last tokens
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(
                    self.n_vocab, 64, s.repeat_penalty, s.frequency_penalty, s.presence_penalty))
            if s.logit_bias:
                biases = (L.llama_logit_bias * len(s.logit_bias))()
                for i, (token, bias) in enumerate(s.logit_bias):
                    biases[i].token = token  # type: ignore[assignment]
                    biases[i].bias = bias
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_logit_bias(
                    self.n_vocab, len(s.logit_bias), biases))
            if spec.grammar is not None:
                grammar = self._grammar(spec.grammar, spec.lazy)
                L.llama_sampler_chain_add(chain, grammar)
            if s.temperature <= 0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
            else:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(s.top_k))
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(s.top_p, 1))
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(s.min_p, 1))
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(s.temperature))
                # Each choice its own stream of randomness; the same seed gives the same choices.
                seed = (s.seed + choice) % 0xFFFFFFFF if s.seed is not None else _random_seed()
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed))
        except BaseException:
            L.llama_sampler_free(chain)
            raise
        return chain

    def _grammar(self, gbnf: str, lazy: LazyGrammar | None) -> Any:
        if lazy is None:
            grammar = L.llama_sampler_init_grammar(self._vocab, gbnf.encode(), b"root")
        else:
            patterns = (ctypes.c_char_p * max(1, len(lazy.patterns)))(*[p.encode() for p in lazy.patterns])
            tokens = (L.llama_token * max(1, len(lazy.tokens)))(*lazy.tokens)
            grammar = L.llama_sampler_init_grammar_lazy_patterns(
                self._vocab, gbnf.encode(), b"root", patterns, len(lazy.patterns), tokens, len(lazy.tokens))
        if not grammar:  # llama.cpp's parser rejected it (it logged why)
            raise ValueError("llama.cpp could not parse the grammar (see the GBNF guide for the syntax)")
        return grammar

    def _probs(self, slot: _Slot, token: int) -> TokenProbs:
        """Log-probabilities of the sampled token and the most likely ones, from the raw
        logits (the sampler chain works on a copy)."""
        ptr = L.llama_get_logits_ith(self._ctx, slot.out_index)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)
        peak = logits.max()
        logits -= peak + np.log(np.exp(logits - peak).sum())
        k = slot.logprobs or 0
        top: tuple[tuple[int, float], ...] = ()
        if k > 0:
            best = np.argpartition(-logits, k - 1)[:k]
            best = best[np.argsort(-logits[best], kind="stable")]
            top = tuple((int(t), float(logits[t])) for t in best)
        return TokenProbs(float(logits[token]), top)

    def _free_chain(self, slot: _Slot) -> None:
        if slot.chain is not None:
            L.llama_sampler_free(slot.chain)
            slot.chain = None


def _random_seed() -> int:
    return random.getrandbits(32) % 0xFFFFFFFF
