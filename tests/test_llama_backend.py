"""The llama.cpp backend in-process, on a generated GGUF: load progress, limits, grammars,
cached tokens, tokenizer, embeddings. (Batching on a real model: tests/test_slots.py.)"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.messages import WorkerConfig
from worker.backend import SeqSpec
from worker.llama_backend import LlamaBackend
from worker.task import Sampling

NO_EOS = Sampling(temperature=0.0, logit_bias=((0, -100.0), (2, -100.0)))


@pytest.fixture(scope="module")
def progress_and_backend(models_dir: Path) -> Iterator[tuple[list[float], LlamaBackend]]:
    seen: list[float] = []
    backend = LlamaBackend()
    info = backend.load(WorkerConfig(name="t", path=str(models_dir / "tiny-a.gguf"), n_ctx=256,
                                     options={"parallel": 2}),
                        lambda stage, v: seen.append(v) or True)
    assert (info.backend, info.n_ctx, info.n_ctx_train) == ("llama_cpp", 256, 512)
    assert info.chat_template and info.n_params > 0 and info.file_size > 0
    assert backend.batcher.parallel == 2
    yield seen, backend
    backend.close()


def generate(backend: LlamaBackend, spec: SeqSpec, cancel_after: int | None = None) -> tuple[list[int], int]:
    """One sequence to its end: its tokens, and the prompt tokens it took from the cache."""
    slots = backend.batcher
    (handle,) = slots.admit(spec)
    cached = slots.stats(handle).cached
    tokens: list[int] = []
    while True:
        (s,) = slots.step()
        if backend.is_end(s.token) or len(tokens) >= spec.max_tokens or len(tokens) == cancel_after:
            break
        tokens.append(s.token)
    slots.release(handle)
    return tokens, cached


def test_load_progress_comes_from_llama_cpp_and_is_monotonic(
        progress_and_backend: tuple[list[float], LlamaBackend]) -> None:
    seen, _ = progress_and_backend
    assert seen[0] == 0.0 and seen[-1] == 1.0
    assert seen == sorted(seen)
    assert any(0.0 < v < 0.95 for v in seen)  # intermediate values: llama.cpp's callback, not ours


def test_a_released_sequence_frees_its_slot_and_keeps_what_it_read(
        progress_and_backend: tuple[list[float], LlamaBackend]) -> None:
    _, backend = progress_and_backend
    prompt = tuple(backend.tokenize("hello there", add_special=True))
    tokens, _ = generate(backend, SeqSpec(prompt, NO_EOS, max_tokens=200), cancel_after=3)
    assert len(tokens) == 3 and backend.batcher.free == 2
    # What the slot read stays: the same prompt again reuses it, all but the last token.
    _, cached = generate(backend, SeqSpec(prompt, NO_EOS, max_tokens=1))
    assert cached == len(prompt) - 1


def test_the_token_limit_is_exact(progress_and_backend: tuple[list[float], LlamaBackend]) -> None:
    _, backend = progress_and_backend
    prompt = tuple(backend.tokenize("a", add_special=True))
    tokens, _ = generate(backend, SeqSpec(prompt, NO_EOS, max_tokens=7))
    assert len(tokens) == 7


def test_a_grammar_constrains_the_output(progress_and_backend: tuple[list[float], LlamaBackend]) -> None:
    _, backend = progress_and_backend
    prompt = tuple(backend.tokenize("x", add_special=True))
    spec = SeqSpec(prompt, Sampling(temperature=0.0), max_tokens=20, grammar='root ::= ("yes" | "no")')
    tokens, _ = generate(backend, spec)
    assert backend.detokenize(tokens) in ("yes", "no")
    with pytest.raises(ValueError, match="grammar"):
        backend.batcher.admit(SeqSpec(prompt, grammar="root ::= ("))
    assert backend.batcher.free == 2


def test_cached_tokens_count_what_the_slot_held(
        progress_and_backend: tuple[list[float], LlamaBackend]) -> None:
    _, backend = progress_and_backend
    prompt = tuple(backend.tokenize("the sky is blue today", add_special=True))
    generate(backend, SeqSpec(prompt, NO_EOS, max_tokens=3))
    _, again = generate(backend, SeqSpec(prompt, NO_EOS, max_tokens=3))
    assert again == len(prompt) - 1  # its last token is read again for fresh logits
    _, fresh = generate(backend, SeqSpec(prompt, NO_EOS, max_tokens=3, cache_prompt=False))
    assert fresh == 0  # cache_prompt false: the whole prompt is read


def test_tokenizer_round_trip_and_pieces(progress_and_backend: tuple[list[float], LlamaBackend]) -> None:
    _, backend = progress_and_backend
    tokens = backend.tokenize("the quick fox", add_special=False)
    assert tokens and backend.detokenize(tokens) == "the quick fox"
    assert b"".join(backend.piece(t) for t in tokens) == b"the quick fox"
    decoder = backend.decoder()
    assert "".join(decoder.add(t) for t in tokens) + decoder.flush() == "the quick fox"


def test_embeddings_are_normalised_and_an_empty_input_is_zero(
        progress_and_backend: tuple[list[float], LlamaBackend]) -> None:
    _, backend = progress_and_backend
    tokens = backend.tokenize("hello world", add_special=False)
    result = backend.embed([tokens, []], normalize=2)
    unit, empty = result.vectors
    assert math.isclose(math.sqrt(sum(x * x for x in unit)), 1.0, rel_tol=1e-5)
    assert not any(empty) and len(empty) == len(unit)
    raw = backend.embed([tokens], normalize=-1).vectors[0]
    assert not math.isclose(math.sqrt(sum(x * x for x in raw)), 1.0, rel_tol=1e-3)
    assert result.prompt_tokens == len(tokens)
