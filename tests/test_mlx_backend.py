"""The mlx-lm backend in-process, on a generated MLX folder: load stages, cancel, limits,
prompt-cache reuse, unsupported features."""

from __future__ import annotations

import json
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.errors import ErrorKind
from protocol.messages import WorkerConfig
from worker.backend import Finish, GenParams
from worker.backends import BackendMissing, make_backend
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


def fresh(models_dir: Path, **options: int) -> MlxBackend:
    backend = MlxBackend()
    backend.load(WorkerConfig(name="t", path=str(models_dir / "tiny-mlx"), backend="mlx", n_ctx=512,
                              options=dict(options)), lambda stage, v: True)
    return backend


def text_and_finish(items: list[str | Finish]) -> tuple[str, Finish]:
    finish = items[-1]
    assert isinstance(finish, Finish)
    return "".join(p for p in items[:-1] if isinstance(p, str)), finish


def test_load_reports_its_stages_in_order(loaded: tuple[list[tuple[str, float]], MlxBackend]) -> None:
    seen, _ = loaded
    stages = list(dict.fromkeys(stage for stage, _ in seen))
    assert stages == ["config", "weights", "tokenizer"]
    # The value is the whole load's progress: it never goes back when a stage begins.
    values = [v for _, v in seen]
    assert values[0] == 0.0 and values[-1] == 1.0 and values == sorted(values)
    assert len(set(values)) >= 4


@pytest.mark.parametrize("stage", ["config", "weights", "tokenizer"])
def test_a_refused_progress_report_aborts_the_load(models_dir: Path, stage: str) -> None:
    backend = MlxBackend()
    with pytest.raises(RuntimeError, match="load aborted"):
        backend.load(WorkerConfig(name="t", path=str(models_dir / "tiny-mlx"), backend="mlx"),
                     lambda s, v: s != stage)


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


class Turns(threading.Event):
    """Unset for its first n looks, then set (a client leaving at an exact point) or, with
    `fail`, raising (an error inside generation at an exact point)."""

    def __init__(self, looks: int, fail: bool = False) -> None:
        super().__init__()
        self.looks = looks
        self.fail = fail

    def is_set(self) -> bool:
        self.looks -= 1
        if self.looks >= 0:
            return False
        if self.fail:
            raise RuntimeError("injected failure")
        return True


def test_a_cancel_during_a_long_prompt_stops_between_prefill_chunks(models_dir: Path) -> None:
    backend = fresh(models_dir, prefill_step_size=16)
    # Looked at before the first chunk and after each: gone after the third of 25 chunks.
    out = list(backend.complete("word " * 200, GenParams(max_tokens=5, logit_bias=NO_EOS), Turns(3)))
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
    # No max_tokens, or more than fit: generation stops at the end of the context.
    for params in (GenParams(logit_bias=NO_EOS), GenParams(max_tokens=1000, logit_bias=NO_EOS)):
        _, last = text_and_finish(list(backend.complete("a", params, NEVER)))
        assert last.prompt_tokens + last.completion_tokens == 256
    # A prompt that fills the context leaves no room for a token.
    text = next(t for t in ("x " * k for k in range(100, 400)) if len(backend.tokenize(t)) == 256)
    with pytest.raises(RequestInvalid) as info:
        backend.complete(text, GenParams(), NEVER)
    assert info.value.kind is ErrorKind.CONTEXT_LENGTH_EXCEEDED
    with pytest.raises(RequestInvalid, match="empty"):
        backend.complete("", GenParams(), NEVER)


def test_the_end_of_text_token_ends_generation(loaded: tuple[list[tuple[str, float]], MlxBackend]) -> None:
    _, backend = loaded
    eos_forced = GenParams(max_tokens=20, logit_bias={2: 100.0})  # <|im_end|>, the model's EOS
    assert list(backend.complete("hi", eos_forced, NEVER))[-1] == Finish(
        "stop", len(backend.tokenize("hi")), 0, 0)


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


def shared_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


GREEDY = GenParams(max_tokens=6, temperature=0.0, logit_bias=NO_EOS)


def test_caches_of_several_conversations_are_kept(models_dir: Path) -> None:
    backend = fresh(models_dir)
    # Three conversations with the same opening: each later one starts from a copy of an
    # earlier one's cache, trimmed to what they share, and must not cut that cache short.
    prompts = [f"conversation number {i} says hello" for i in range(3)]
    first = [text_and_finish(list(backend.complete(p, GREEDY, NEVER))) for p in prompts]
    ids = [backend.tokenize(p) for p in prompts]
    shared = [max((shared_prefix(ids[i], ids[j]) for j in range(i)), default=0) for i in range(3)]
    assert shared[1] > 0 and [f.cached_tokens for _, f in first] == shared
    for p, (text, _) in zip(prompts, first, strict=True):  # interleaved: each finds its own cache
        again, finish = text_and_finish(list(backend.complete(p, GREEDY, NEVER)))
        assert finish.cached_tokens == finish.prompt_tokens - 1
        assert again == text  # greedy on cached state says what it said on fresh state
    backend.close()
    # One slot: the second conversation's cache pushed the first one's out.
    one = fresh(models_dir, prompt_cache_slots=1)
    for p in prompts[:2]:
        list(one.complete(p, GREEDY, NEVER))
    _, finish = text_and_finish(list(one.complete(prompts[0], GREEDY, NEVER)))
    assert finish.cached_tokens == shared_prefix(ids[0], ids[1])
    one.close()


def test_a_cache_a_failure_left_behind_is_not_reused(models_dir: Path) -> None:
    backend = fresh(models_dir)
    with pytest.raises(RuntimeError, match="injected"):
        list(backend.complete("a prompt that fails half way", GREEDY, Turns(4, fail=True)))
    _, finish = text_and_finish(list(backend.complete("a prompt that fails half way", GREEDY, NEVER)))
    assert finish.cached_tokens == 0
    backend.close()


def test_a_cancel_right_after_the_prompt_leaves_a_cache_of_the_prompt_alone(models_dir: Path) -> None:
    reference = fresh(models_dir)
    expected, _ = text_and_finish(list(reference.complete("the sky is blue", GREEDY, NEVER)))
    reference.close()
    backend = fresh(models_dir)
    # Looked at before the prompt is read, after it (but its last token) was read, then once
    # the first token was sampled and fed back: the cache then holds a token the client
    # never saw, which must not be kept.
    out = list(backend.complete("the sky is blue", GREEDY, Turns(2)))
    assert len(out) == 1 and isinstance(out[0], Finish) and out[0].completion_tokens == 0
    text, finish = text_and_finish(list(backend.complete("the sky is blue", GREEDY, NEVER)))
    assert finish.cached_tokens == finish.prompt_tokens - 1
    assert text == expected
    backend.close()


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


def write_tiny_hybrid(models_dir: Path, folder: Path) -> Path:
    """A tiny LFM2 folder: convolution layers whose cache is a state, not trimmable KV."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import lfm2

    src = json.loads((models_dir / "tiny-mlx" / "config.json").read_text())
    config = {"model_type": "lfm2", "vocab_size": src["vocab_size"], "hidden_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
              "max_position_embeddings": 512, "norm_eps": 1e-5, "conv_bias": False, "conv_L_cache": 3,
              "block_dim": 64, "block_multiple_of": 16, "block_ffn_dim_multiplier": 1.0,
              "block_auto_adjust_ff_dim": False, "intermediate_size": 128, "full_attn_idxs": [1],
              "eos_token_id": src["eos_token_id"]}
    mx.random.seed(5)
    model = lfm2.Model(lfm2.ModelArgs.from_dict(config))
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(models_dir / "tiny-mlx" / name, folder / name)
    return folder


def test_a_model_with_recurrent_layers_continues_its_cache_but_never_cuts_it(
        models_dir: Path, tmp_path: Path) -> None:
    backend = MlxBackend()
    backend.load(WorkerConfig(name="h", path=str(write_tiny_hybrid(models_dir, tmp_path / "hybrid")),
                              backend="mlx"), lambda stage, v: True)
    prompt = backend.tokenize("the quick brown fox")
    _, first = text_and_finish(list(backend._generate(prompt, GREEDY, NEVER, "prompt")))
    assert first.completion_tokens == GREEDY.max_tokens
    # The same prompt again would need the state cut back by the reply: it starts afresh.
    _, again = text_and_finish(list(backend._generate(prompt, GREEDY, NEVER, "prompt")))
    assert again.cached_tokens == 0
    # A conversation that goes on from everything the state holds continues it.
    assert backend._caches is not None
    held = backend._caches._entries[0][0]
    assert held[: len(prompt)] == prompt and len(held) == len(prompt) + GREEDY.max_tokens
    _, turn = text_and_finish(list(backend._generate([*held, *prompt], GREEDY, NEVER, "prompt")))
    assert turn.cached_tokens == len(held)
    backend.close()


def test_only_the_backend_library_missing_is_reported_as_an_install_problem(
        monkeypatch: pytest.MonkeyPatch) -> None:

    # Import worker.mlx_backend afresh with one module made unimportable (None in sys.modules).
    real = sys.modules["mlx_lm.generate"]
    monkeypatch.delitem(sys.modules, "worker.mlx_backend")
    monkeypatch.setitem(sys.modules, "mlx_lm.generate", None)
    with pytest.raises(BackendMissing, match=r"needs mlx_lm, which is not installed: "
                                             r"install modelherd\[mlx\]"):
        make_backend("mlx")
    monkeypatch.setitem(sys.modules, "mlx_lm.generate", real)
    monkeypatch.setitem(sys.modules, "jinja2", None)  # something else: reported as it is
    with pytest.raises(ImportError) as info:
        make_backend("mlx")
    assert not isinstance(info.value, BackendMissing) and info.value.name == "jinja2"
