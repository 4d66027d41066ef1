"""The llama.cpp backend in-process, on a generated GGUF: progress, cancel, limits."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.errors import ErrorKind
from protocol.messages import WorkerConfig
from worker.backend import Finish, GenParams
from worker.llama_backend import LlamaBackend
from worker.schema import RequestInvalid

NO_EOS = {0: -100.0, 2: -100.0}


@pytest.fixture(scope="module")
def progress_and_backend(models_dir: Path) -> Iterator[tuple[list[float], LlamaBackend]]:
    seen: list[float] = []
    backend = LlamaBackend()
    info = backend.load(WorkerConfig(name="t", path=str(models_dir / "tiny-a.gguf"), n_ctx=256),
                        lambda stage, v: seen.append(v) or True)
    assert (info.backend, info.n_ctx, info.n_ctx_train) == ("llama_cpp", 256, 512)
    assert info.chat_template and info.n_params > 0 and info.file_size > 0
    yield seen, backend
    backend.close()


def test_load_progress_comes_from_llama_cpp_and_is_monotonic(
        progress_and_backend: tuple[list[float], LlamaBackend]) -> None:
    seen, _ = progress_and_backend
    assert seen[0] == 0.0 and seen[-1] == 1.0
    assert seen == sorted(seen)
    assert any(0.0 < v < 1.0 for v in seen)  # intermediate values: llama.cpp's callback, not ours


def test_cancel_stops_generation_within_one_token(
        progress_and_backend: tuple[list[float], LlamaBackend]) -> None:
    _, backend = progress_and_backend
    cancel = threading.Event()
    gen = backend.complete("hello", GenParams(max_tokens=200, logit_bias=NO_EOS), cancel)
    llm = backend._llm
    assert llm is not None
    evaluated_at_cancel = -1
    for n, item in enumerate(gen, start=1):
        if isinstance(item, Finish):
            finish = item
            break
        if n == 3:
            cancel.set()
            evaluated_at_cancel = llm.n_tokens
    # Nothing was evaluated after the flag was set, and generation ended early.
    assert llm.n_tokens == evaluated_at_cancel
    assert finish.completion_tokens < 200


def test_max_tokens_and_context_limits(progress_and_backend: tuple[list[float], LlamaBackend]) -> None:
    _, backend = progress_and_backend
    never = threading.Event()
    out = list(backend.complete("a", GenParams(max_tokens=7, logit_bias=NO_EOS), never))
    assert out[-1] == Finish("length", out[-1].prompt_tokens, 7)  # type: ignore[union-attr]
    # No max_tokens: generation stops at the end of the context, not beyond it.
    out = list(backend.complete("a", GenParams(logit_bias=NO_EOS), never))
    last = out[-1]
    assert isinstance(last, Finish) and last.prompt_tokens + last.completion_tokens == 256
    with pytest.raises(RequestInvalid) as info:
        backend.complete("word " * 400, GenParams(), never)
    assert info.value.kind is ErrorKind.CONTEXT_LENGTH_EXCEEDED


def test_grammar_constrains_output(progress_and_backend: tuple[list[float], LlamaBackend]) -> None:
    _, backend = progress_and_backend
    out = list(backend.complete("x", GenParams(max_tokens=20, grammar='root ::= ("yes" | "no")'),
                                threading.Event()))
    assert "".join(p for p in out if isinstance(p, str)) in ("yes", "no")
    with pytest.raises(RequestInvalid, match="grammar"):
        backend.complete("x", GenParams(grammar="root ::= ("), threading.Event())


def test_cached_tokens_count_what_llama_cpp_reuses(
        progress_and_backend: tuple[list[float], LlamaBackend]) -> None:
    _, backend = progress_and_backend
    params = GenParams(max_tokens=3, logit_bias=NO_EOS)
    never = threading.Event()
    list(backend.complete("the sky is blue today", params, never))
    again = list(backend.complete("the sky is blue today", params, never))[-1]
    # The prompt's KV cache is there; its last token is read again for fresh logits.
    assert isinstance(again, Finish) and again.cached_tokens == again.prompt_tokens - 1
    other = list(backend.complete("zzz", params, never))[-1]
    assert isinstance(other, Finish) and other.cached_tokens == 0


def test_an_empty_prompt_is_refused(progress_and_backend: tuple[list[float], LlamaBackend]) -> None:
    _, backend = progress_and_backend
    with pytest.raises(RequestInvalid, match="empty"):
        backend.complete("", GenParams(max_tokens=3), threading.Event())
