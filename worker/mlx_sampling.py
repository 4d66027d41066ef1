"""Sampling for the MLX slots: one sampler and one set of logits processors per sequence.

mlx-lm's BatchGenerator takes a sampler and logits processors per sequence. Ours follow
llama.cpp's server: penalties over the last 64 tokens (the prompt's tail included) and
the logit bias act on the logits; top-k, top-p and min-p filter the candidates at
temperature 1, then the temperature scales what is left and one token is drawn. Each
sequence draws from its own random key (the seed plus its choice index), so a seed
gives the same tokens whatever else the batch holds: mx.random's global seed would be
shared by every sequence of the batch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import greedy_sampler, make_logits_processors

from worker.backend import TokenProbs
from worker.task import Sampling

Sampler = Callable[[mx.array], mx.array]
Processor = Callable[[mx.array, mx.array], mx.array]

# The window llama.cpp's penalties look at (llama-server's repeat_last_n default).
PENALTY_WINDOW = 64


def is_greedy(s: Sampling) -> bool:
    """Whether only the most likely token can come out (top_p 0 keeps one, as in llama.cpp)."""
    return s.temperature <= 0 or s.top_p <= 0 or s.top_k == 1


def make_sampler(s: Sampling, choice: int) -> Sampler:
    """The sampler of one choice. Greedy sequences share mlx-lm's sampler: a batch of them
    is then sampled in one call."""
    if is_greedy(s):
        return greedy_sampler
    seed = (s.seed + choice) % 0xFFFFFFFF if s.seed is not None else random.getrandbits(32)
    key = [mx.random.key(seed)]
    top_k, top_p, min_p, inv_temp = s.top_k, s.top_p, s.min_p, 1.0 / s.temperature

    def sample(logprobs: mx.array) -> mx.array:
        x = logprobs
        cut = mx.array(-math.inf, dtype=x.dtype)
        if 0 < top_k < x.shape[-1]:
            kth = mx.topk(x, top_k, axis=-1).min(axis=-1, keepdims=True)
            x = mx.where(x >= kth, x, cut)
        if top_p < 1.0:
            x = x - mx.logsumexp(x, axis=-1, keepdims=True)  # over what top-k left, as llama.cpp
            ordered = mx.sort(x, axis=-1)[..., ::-1]
            p = mx.exp(ordered)
            before = mx.cumsum(p, axis=-1) - p  # probability of the more likely ones
            floor = mx.where(before < top_p, ordered, mx.array(math.inf, dtype=x.dtype)).min(
                axis=-1, keepdims=True)
            x = mx.where(x >= floor, x, cut)
        if min_p > 0.0:
            x = mx.where(x >= x.max(axis=-1, keepdims=True) + math.log(min_p), x, cut)
        keys = mx.random.split(key[0])
        key[0] = keys[1]
        return mx.random.categorical(x * inv_temp, key=keys[0])

    return sample


def make_processors(s: Sampling) -> list[Processor]:
    """Logit bias and repetition penalties (mlx-lm's, over llama.cpp's window)."""
    return list(make_logits_processors(
        dict(s.logit_bias) or None,
        repetition_penalty=s.repeat_penalty if s.repeat_penalty != 1.0 else None,
        presence_penalty=s.presence_penalty or None,
        frequency_penalty=s.frequency_penalty or None,
        repetition_context_size=PENALTY_WINDOW, presence_context_size=PENALTY_WINDOW,
        frequency_context_size=PENALTY_WINDOW))


def token_probs(logprobs: mx.array, token: int, k: int) -> TokenProbs:
    """The sampled token's log-probability and the k most likely tokens', from the
    distribution it was drawn from (after bias and penalties, before top-k/p filters)."""
    row = np.asarray(logprobs.astype(mx.float32)).reshape(-1)
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        k = min(k, row.shape[0])
        best = np.argpartition(-row, k - 1)[:k]
        best = best[np.argsort(-row[best], kind="stable")]
        top = tuple((int(t), float(row[t])) for t in best)
    return TokenProbs(float(row[token]), top)
