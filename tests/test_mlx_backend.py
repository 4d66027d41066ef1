"""The mlx-lm backend in-process, on a generated MLX folder: load stages, cancel, limits,
prompt-cache reuse, unsupported features."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.errors import ErrorKind
from protocol.messages import WorkerConfig
from worker.backend import Finish, GenParams
from worker.mlx_backend import MlxBackend
from worker.schema import RequestInvalid

NO_EOS = {0: -100.0, 2: -100.0}
NEVER = threading.Event()


@pytest.fixture(scope="module")
def loaded(models_dir: Path) -> Iterator[tuple[list[tuple[str, float]], MlxBackend]]:
    seen: list[tuple[str, float]] = []
    backend = MlxBackend()
    info = backend.load(WorkerConfig(name="t", path=str(models_dir / "tiny-mlx"), backend="mlx", n_ctx=256),
                        lambda stage, v: seen.append((stage, v)) or True)
    assert (info.backend, info.n_ctx, info.n_ctx_train, info.n_vocab) == ("mlx", 256, 512, 320)
    assert info.chat_template and info.n_params > 0 and info.file_size > 0
    # Where it runs, and if not on a GPU, why not.
    assert info.device in ("cpu", "metal", "cuda")
    assert (info.device == "cpu") == (info.fallback is not None)
    yield seen, backend
    backend.close()


def text_and_finish(items: list[str | Finish]) -> tuple[str, Finish]:
    finish = items[-1]
    assert isinstance(finish, Finish)
    return "".join(p for p in items[:-1] if isinstance(p, str)), finish


def test_load_reports_its_stages_in_order(loaded: tuple[list[tuple[str, float]], MlxBackend]) -> None:
    seen, _ = loaded
    stages = list(dict.fromkeys(stage for stage, _ in seen))
    assert stages == ["config", "weights", "tokenizer"]
    for stage in stages:
        values = [v for s, v in seen if s == stage]
        assert values[0] == 0.0 and values[-1] == 1.0 and values == sorted(values)


def test_a_refused_progress_report_aborts_the_load(models_dir: Path) -> None:
    backend = MlxBackend()
    with pytest.raises(RuntimeError, match="load aborted"):
        backend.load(WorkerConfig(name="t", path=str(models_dir / "tiny-mlx"), backend="mlx"),
                     lambda stage, v: stage != "weights" or v < 1.0)


def test_cancel_stops_generation_between_tokens(loaded: tuple[list[tuple[str, float]], MlxBackend]) -> None:
    _, backend = loaded
    cancel = threading.Event()
    pieces = 0
    for item in backend.complete("hello", GenParams(max_tokens=200, logit_bias=NO_EOS), cancel):
        if isinstance(item, Finish):
            finish = item
            break
        pieces += 1
        if pieces == 3:
            cancel.set()
    assert 3 <= finish.completion_tokens < 10


class CancelAfter(threading.Event):
    """Set from the n+1-th look on: a client leaving at an exact point of the prefill."""

    def __init__(self, looks: int) -> None:
        super().__init__()
        self.looks = looks

    def is_set(self) -> bool:
        self.looks -= 1
        return self.looks < 0


def test_a_cancel_during_a_long_prompt_stops_between_prefill_chunks(models_dir: Path) -> None:
    backend = MlxBackend()
    backend.load(WorkerConfig(name="t", path=str(models_dir / "tiny-mlx"), backend="mlx", n_ctx=512,
                              options={"prefill_step_size": 16}), lambda stage, v: True)
    # Looked at before the first chunk and after each: gone after the third of 25 chunks.
    out = list(backend.complete("word " * 200, GenParams(max_tokens=5, logit_bias=NO_EOS), CancelAfter(3)))
    assert len(out) == 1 and isinstance(out[0], Finish) and out[0].completion_tokens == 0
    # The cache it left holds the three chunks read, and the next request starts from them.
    _, finish = text_and_finish(list(backend.complete("word " * 200, GenParams(max_tokens=2), NEVER)))
    assert finish.cached_tokens == 3 * 16
    backend.close()


def test_max_tokens_and_context_limits(loaded: tuple[list[tuple[str, float]], MlxBackend]) -> None:
    _, backend = loaded
    seven = GenParams(max_tokens=7, logit_bias=NO_EOS)
    _, finish = text_and_finish(list(backend.complete("a", seven, NEVER)))
    assert (finish.reason, finish.completion_tokens) == ("length", 7)
    # No max_tokens: generation stops at the end of the context, not beyond it.
    _, last = text_and_finish(list(backend.complete("a", GenParams(logit_bias=NO_EOS), NEVER)))
    assert last.prompt_tokens + last.completion_tokens == 256
    with pytest.raises(RequestInvalid) as info:
        backend.complete("word " * 400, GenParams(), NEVER)
    assert info.value.kind is ErrorKind.CONTEXT_LENGTH_EXCEEDED


def test_the_prompt_cache_is_reused_across_turns(loaded: tuple[list[tuple[str, float]], MlxBackend]) -> None:
    _, backend = loaded
    params = GenParams(max_tokens=6, temperature=0.0, logit_bias=NO_EOS)
    turn1 = [{"role": "user", "content": "The quick brown fox"}]
    reply, first = text_and_finish(list(backend.chat(turn1, params, NEVER)))
    turn2 = [*turn1, {"role": "assistant", "content": reply}, {"role": "user", "content": "and then?"}]
    _, second = text_and_finish(list(backend.chat(turn2, params, NEVER)))
    # Everything the first turn's prompt held was reused (its last token at most is read again).
    assert second.cached_tokens >= first.prompt_tokens - 1
    assert second.prompt_tokens > first.prompt_tokens
    # The same prompt again: all but its last token come from the cache, and greedy
    # decoding on cached state says the same thing as on fresh state.
    again_reply, again = text_and_finish(list(backend.chat(turn1, params, NEVER)))
    assert again.cached_tokens == again.prompt_tokens - 1
    assert again_reply == reply


def test_caches_of_several_conversations_are_kept(loaded: tuple[list[tuple[str, float]], MlxBackend]) -> None:
    _, backend = loaded
    params = GenParams(max_tokens=3, temperature=0.0)
    prompts = [f"conversation number {i} says hello" for i in range(3)]
    for p in prompts:
        list(backend.complete(p, params, NEVER))
    for p in prompts:  # interleaved: each still finds its own cache (4 slots by default)
        _, finish = text_and_finish(list(backend.complete(p, params, NEVER)))
        assert finish.cached_tokens == finish.prompt_tokens - 1


def test_unsupported_features_are_refused_by_name(loaded: tuple[list[tuple[str, float]], MlxBackend]) -> None:
    _, backend = loaded
    for params, name in ((GenParams(grammar='root ::= "x"'), "grammar"),
                         (GenParams(json_object=True), "response_format")):
        with pytest.raises(RequestInvalid) as info:
            backend.complete("x", params, NEVER)
        assert info.value.kind is ErrorKind.UNSUPPORTED and info.value.param == name
        assert name in info.value.message
    with pytest.raises(RequestInvalid, match="embeddings") as refused:
        backend.embed(["x"])
    assert refused.value.kind is ErrorKind.UNSUPPORTED


def test_a_model_without_a_chat_template_still_completes(models_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(models_dir / "tiny-mlx", tmp_path / "no-template")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    backend = MlxBackend()
    info = backend.load(WorkerConfig(name="t", path=str(folder), backend="mlx"), lambda stage, v: True)
    assert info.chat_template is False
    with pytest.raises(RequestInvalid, match="chat template") as refused:
        backend.chat([{"role": "user", "content": "hi"}], GenParams(), NEVER)
    assert refused.value.kind is ErrorKind.UNSUPPORTED
    two = GenParams(max_tokens=2, logit_bias=NO_EOS)
    _, finish = text_and_finish(list(backend.complete("hi", two, NEVER)))
    assert finish.completion_tokens == 2
    backend.close()


def test_load_failures_say_what_is_wrong(models_dir: Path, tmp_path: Path) -> None:
    odd = shutil.copytree(models_dir / "tiny-mlx", tmp_path / "odd")
    cfg = json.loads((odd / "config.json").read_text())
    cfg["model_type"] = "nosucharch"
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="Model type nosucharch not supported"):  # mlx-lm's words
        MlxBackend().load(WorkerConfig(name="t", path=str(odd), backend="mlx"), lambda stage, v: True)
    # A folder that is not there is not looked up on the Hugging Face hub.
    with pytest.raises(FileNotFoundError, match="not an MLX model folder"):
        MlxBackend().load(WorkerConfig(name="t", path=str(tmp_path / "absent"), backend="mlx"),
                          lambda stage, v: True)
    with pytest.raises(ValueError, match="unknown mlx options: n_batch"):
        MlxBackend().load(WorkerConfig(name="t", path=str(odd), backend="mlx", options={"n_batch": 8}),
                          lambda stage, v: True)
