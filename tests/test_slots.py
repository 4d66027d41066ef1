"""The llama.cpp slots in-process, on a real model (SmolLM2-135M-Instruct): continuous
batching gives what one request alone gives, conversations come back from a slot or from
the host-RAM cache, releasing a sequence disturbs nobody, seeds and n > 1."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.messages import WorkerConfig
from worker.backend import SeqSpec
from worker.llama_backend import LlamaBackend
from worker.task import Message, Sampling, Task

GREEDY = Sampling(temperature=0.0)
QUESTIONS = ["What is the capital of France?", "Name three colors.", "Write a haiku about the sea.",
             "What is 2+2?", "Who wrote Hamlet?", "What is the boiling point of water?"]


@pytest.fixture(scope="module")
def smol(smollm2_gguf: Path) -> Iterator[LlamaBackend]:
    backend = LlamaBackend()
    backend.load(WorkerConfig("smol", str(smollm2_gguf), n_ctx=1024,
                              options={"parallel": 4, "cache_ram_mb": 512}), lambda stage, value: True)
    yield backend
    backend.close()


def prompt(backend: LlamaBackend, *turns: str) -> tuple[int, ...]:
    roles = ["user", "assistant"] * len(turns)
    task = Task(messages=tuple(Message(r, t) for r, t in zip(roles, turns, strict=False)))
    return backend.chat_prompt(task).tokens


def run(backend: LlamaBackend, specs: list[SeqSpec], release_after: dict[int, int] | None = None,
        ) -> tuple[list[list[int]], list[int]]:
    """Run every spec to its end (admitting as slots free up, in order); returns each
    choice's tokens and each spec's cached prompt tokens. `release_after`: spec index ->
    release it after that many tokens."""
    slots = backend.batcher
    queue = list(enumerate(specs))
    out: list[list[int]] = [[] for _ in specs]
    cached = [0] * len(specs)
    running: dict[int, int] = {}
    while queue or running:
        while queue and slots.free >= queue[0][1].n:
            i, spec = queue.pop(0)
            for handle in slots.admit(spec):
                running[handle] = i
            cached[i] = slots.stats(handle).cached
        for s in slots.step():
            i = running[s.handle]
            done = backend.is_end(s.token)
            if not done:
                out[i].append(s.token)
            limit = (release_after or {}).get(i, specs[i].max_tokens)
            if done or len(out[i]) >= limit:
                slots.release(s.handle)
                del running[s.handle]
    return out, cached


def test_four_sequences_batched_give_what_each_gives_alone(smol: LlamaBackend) -> None:
    specs = [SeqSpec(prompt(smol, q), GREEDY, max_tokens=48, cache_prompt=False) for q in QUESTIONS[:4]]
    alone = [run(smol, [spec])[0][0] for spec in specs]
    together, _ = run(smol, specs)
    assert smol.batcher.info() and all(not s.is_processing for s in smol.batcher.info())
    for a, b in zip(alone, together, strict=True):
        # Batched float arithmetic may flip a late near-tie; the first half must agree.
        half = max(1, len(a) // 2)
        assert a[:half] == b[:half]
        assert len(a) > 3


def test_a_conversation_comes_back_from_its_slot_or_from_ram(smol: LlamaBackend) -> None:
    """Six conversations on four slots: each one's second turn reuses its first turn's
    prompt and reply, whether its state stayed in a slot or was saved to RAM and restored."""
    first = [prompt(smol, q) for q in QUESTIONS]
    replies, _ = run(smol, [SeqSpec(p, GREEDY, max_tokens=24, conversation=f"c{i}")
                            for i, p in enumerate(first)])
    hits_before = smol.batcher.cache_info().hits
    texts = [smol.detokenize(r) for r in replies]
    second = [prompt(smol, q, t, "Tell me more.") for q, t in zip(QUESTIONS, texts, strict=True)]
    _, cached = run(smol, [SeqSpec(p, GREEDY, max_tokens=8, conversation=f"c{i}")
                           for i, p in enumerate(second)])
    for i in range(len(QUESTIONS)):
        reused = len(first[i]) + len(replies[i])
        # Nearly all of it: the reply's last token was sampled but never evaluated, and a
        # template may render the assistant turn's end differently from what was sampled.
        assert cached[i] >= reused - 3, (i, cached[i], reused)
    assert smol.batcher.cache_info().hits > hits_before  # some came back from RAM


def test_releasing_one_sequence_mid_batch_disturbs_nobody(smol: LlamaBackend) -> None:
    specs = [SeqSpec(prompt(smol, q), GREEDY, max_tokens=32, cache_prompt=False) for q in QUESTIONS[:3]]
    alone = [run(smol, [spec])[0][0] for spec in specs]
    together, _ = run(smol, specs, release_after={1: 5})
    assert len(together[1]) == 5
    assert smol.batcher.free == smol.batcher.parallel  # every slot is idle again
    for i in (0, 2):
        half = max(1, len(alone[i]) // 2)
        assert together[i][:half] == alone[i][:half]


def test_a_seed_gives_the_same_tokens_in_the_same_cache_state(smol: LlamaBackend) -> None:
    seeded = Sampling(temperature=1.0, seed=42)
    spec = SeqSpec(prompt(smol, QUESTIONS[2]), seeded, max_tokens=24, cache_prompt=False)
    a, _ = run(smol, [spec])
    b, _ = run(smol, [spec])
    assert a == b
    other, _ = run(smol, [SeqSpec(spec.prompt, Sampling(temperature=1.0, seed=43), max_tokens=24,
                                  cache_prompt=False)])
    assert other != a


def test_n_choices_read_the_prompt_once_and_differ(smol: LlamaBackend) -> None:
    spec = SeqSpec(prompt(smol, QUESTIONS[2]), Sampling(temperature=1.0, seed=7), max_tokens=16, n=3,
                   cache_prompt=False)
    slots = smol.batcher
    handles = slots.admit(spec)
    evaluated = {slots.stats(h).evaluated for h in handles}
    assert len(handles) == 3 and evaluated == {len(spec.prompt)}
    outs: dict[int, list[int]] = {h: [] for h in handles}
    while outs and any(len(v) < 16 for v in outs.values()):
        for s in slots.step():
            outs[s.handle].append(s.token)
    for h in handles:
        slots.release(h)
    assert len({tuple(v) for v in outs.values()}) > 1  # each choice its own randomness


def test_log_probabilities_are_a_distribution(smol: LlamaBackend) -> None:
    spec = SeqSpec(prompt(smol, QUESTIONS[0]), GREEDY, max_tokens=4, logprobs=3, cache_prompt=False)
    slots = smol.batcher
    (handle,) = slots.admit(spec)
    sampled = next(s for s in slots.step() if s.handle == handle)
    slots.release(handle)
    assert sampled.probs is not None
    top = sampled.probs.top
    assert len(top) == 3 and top[0][0] == sampled.token  # greedy took the most likely one
    assert sampled.probs.logprob == pytest.approx(top[0][1])
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    assert sum(math.exp(lp) for _, lp in top) <= 1.0 + 1e-6


def test_a_grammar_llama_cpp_rejects_takes_no_slot(smol: LlamaBackend) -> None:
    slots = smol.batcher
    free = slots.free
    with pytest.raises(ValueError, match="could not parse the grammar"):
        slots.admit(SeqSpec(prompt(smol, QUESTIONS[0]), GREEDY, grammar="root ::= (", max_tokens=4))
    assert slots.free == free
