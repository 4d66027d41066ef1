"""The mlx-lm backend in-process, driven through its batcher (admit, step, release) on
generated MLX folders: load stages, limits, prompt-cache reuse, batching, seeds,
log-probabilities, recurrent caches, unsupported features."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from protocol.errors import ErrorKind
from protocol.messages import WorkerConfig
from worker.backend import Sampled, SeqSpec, SeqStats
from worker.backends import BackendMissing, make_backend
from worker.mlx_backend import MlxBackend
from worker.mlx_cache import MlxPromptCache
from worker.schema import RequestInvalid
from worker.task import Message, Reasoning, Sampling, Task, Tool, ToolCall

NO_EOS = ((0, -100.0), (2, -100.0))  # <|endoftext|> and <|im_end|> (the EOS) never come
GREEDY = Sampling(temperature=0.0, logit_bias=NO_EOS)
# Sampling with nothing filtered out: the drawn tokens depend on every logit.
RANDOM = Sampling(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7, logit_bias=NO_EOS)


@dataclass
class Run:
    tokens: list[int] = field(default_factory=list)
    probs: list[Sampled] = field(default_factory=list)
    stats: SeqStats = field(default_factory=SeqStats)
    reason: str = ""


def generate(backend: MlxBackend, *specs: SeqSpec) -> list[Run]:
    """Admit every spec at once, step until each choice ends (an end token or max_tokens,
    as the engine decides), release it; one Run per choice, in admission order."""
    slots = backend.batcher
    handles = [(h, spec) for spec in specs for h in slots.admit(spec)]
    runs = {h: Run() for h, _ in handles}
    live = dict(handles)
    for _ in range(10_000):
        if not live:
            break
        for s in slots.step():
            if s.handle not in live:
                continue
            run = runs[s.handle]
            if backend.is_end(s.token):
                run.reason = "stop"
            else:
                run.tokens.append(s.token)
                run.probs.append(s)
                if len(run.tokens) >= live[s.handle].max_tokens:
                    run.reason = "length"
            if run.reason:
                run.stats = slots.stats(s.handle)
                slots.release(s.handle)
                del live[s.handle]
    assert not live, "generation never ended"
    return [runs[h] for h, _ in handles]


def one(backend: MlxBackend, spec: SeqSpec) -> Run:
    return generate(backend, spec)[0]


def load(folder: Path, progress: Any = None, **options: Any) -> MlxBackend:
    backend = MlxBackend()
    backend.load(WorkerConfig(name="t", path=str(folder), backend="mlx", n_ctx=256, options=options),
                 progress or (lambda stage, v: True))
    return backend


@pytest.fixture(scope="module")
def loaded(models_dir: Path) -> Iterator[tuple[list[tuple[str, float]], MlxBackend]]:
    seen: list[tuple[str, float]] = []
    backend = load(models_dir / "tiny-mlx", lambda stage, v: seen.append((stage, v)) or True)
    yield seen, backend
    backend.close()


@pytest.fixture
def fresh(models_dir: Path) -> Iterator[MlxBackend]:
    backend = load(models_dir / "tiny-mlx")
    yield backend
    backend.close()


def test_load_reports_its_stages_in_order(models_dir: Path,
                                          loaded: tuple[list[tuple[str, float]], MlxBackend]) -> None:
    seen, backend = loaded
    stages = list(dict.fromkeys(stage for stage, _ in seen))
    assert stages == ["config", "weights", "tokenizer"]
    # The value is the whole load's progress: it never goes back when a stage begins.
    values = [v for _, v in seen]
    assert values[0] == 0.0 and values[-1] == 1.0 and values == sorted(values)
    assert len(set(values)) >= 4
    config = WorkerConfig(name="t", path=str(models_dir / "tiny-mlx"), backend="mlx", n_ctx=256)
    info = MlxBackend().load(config, lambda stage, v: True)
    assert (info.backend, info.n_ctx, info.n_ctx_train, info.n_vocab) == ("mlx", 256, 512, 320)
    assert info.chat_template and info.n_params > 0 and info.file_size > 0
    assert (info.device == "cpu") == (info.fallback is not None)  # and if not on a GPU, why not
    assert backend.batcher.parallel == 4 and backend.n_ctx == 256


@pytest.mark.parametrize("stage", ["config", "weights", "tokenizer"])
def test_a_refused_progress_report_aborts_the_load(models_dir: Path, stage: str) -> None:
    with pytest.raises(RuntimeError, match="load aborted"):
        MlxBackend().load(WorkerConfig(name="t", path=str(models_dir / "tiny-mlx"), backend="mlx"),
                          lambda s, v: s != stage)


def test_max_tokens_the_context_and_the_end_token(loaded: tuple[list[tuple[str, float]], MlxBackend]) -> None:
    _, backend = loaded
    prompt = tuple(backend.tokenize("a"))
    assert len(one(backend, SeqSpec(prompt, GREEDY, 7, cache_prompt=False)).tokens) == 7
    # mlx-lm ends a sequence at max_tokens itself: the whole context, and not a token more.
    slots = backend.batcher
    budget = backend.n_ctx - len(prompt)
    (handle,) = slots.admit(SeqSpec(prompt, GREEDY, budget))
    count = 0
    for _ in range(budget + 5):
        count += sum(1 for s in slots.step() if s.handle == handle)
    assert count == budget
    assert [s.n_tokens for s in slots.info() if s.handle == handle] == [backend.n_ctx]
    slots.release(handle)
    # The model's EOS (<|im_end|>, forced here) is an end token.
    eos = one(backend, SeqSpec(prompt, Sampling(logit_bias=((2, 100.0),)), 20))
    assert (eos.reason, eos.tokens) == ("stop", [])
    assert backend.special_tokens() == {"eos": 2}


def test_the_prompt_cache_is_reused_across_turns(loaded: tuple[list[tuple[str, float]], MlxBackend]) -> None:
    _, backend = loaded
    turn1 = (Message("user", "The quick brown fox"),)
    first_prompt = backend.chat_prompt(Task(messages=turn1)).tokens
    first = one(backend, SeqSpec(first_prompt, GREEDY, 6, conversation="c1"))
    reply = backend.detokenize(first.tokens)
    turn2 = (*turn1, Message("assistant", reply), Message("user", "and then?"))
    second_prompt = backend.chat_prompt(Task(messages=turn2)).tokens
    second = one(backend, SeqSpec(second_prompt, GREEDY, 6, conversation="c1"))
    # Everything the first turn's prompt held was reused, and only the rest read.
    assert second.stats.cached >= len(first_prompt)
    assert second.stats.cached + second.stats.evaluated == len(second_prompt)
    assert second.stats.restored and second.stats.prompt_done_at >= second.stats.admitted_at
    # The same prompt again: all but its last token come from the cache, and greedy
    # decoding on cached state says the same thing as on fresh state.
    again = one(backend, SeqSpec(first_prompt, GREEDY, 6))
    assert again.stats.cached == len(first_prompt) - 1
    assert again.tokens == first.tokens
    # cache_prompt false reads it all again (and says the same).
    full = one(backend, SeqSpec(first_prompt, GREEDY, 6, cache_prompt=False))
    assert (full.stats.cached, full.tokens) == (0, first.tokens)
    info = backend.batcher.cache_info()
    assert info.entries >= 1 and 0 < info.bytes <= info.max_bytes and info.hits >= 2


def shared_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def test_caches_of_interleaved_conversations_are_kept(fresh: MlxBackend) -> None:
    # Three prompts with the same opening: each later one starts from a copy of an earlier
    # one's cache, cut to what they share, and must not cut that cache short.
    ids = [tuple(fresh.tokenize(f"conversation number {i} says hello")) for i in range(3)]
    first = [one(fresh, SeqSpec(p, GREEDY, 6)) for p in ids]
    shared = [max((shared_prefix(ids[i], ids[j]) for j in range(i)), default=0) for i in range(3)]
    assert shared[1] > 0 and [r.stats.cached for r in first] == shared
    for p, before in zip(ids, first, strict=True):  # interleaved: each finds its own cache
        again = one(fresh, SeqSpec(p, GREEDY, 6))
        assert again.stats.cached == len(p) - 1
        assert again.tokens == before.tokens  # greedy on cached state says what it said on fresh state


def test_no_prompt_cache_with_cache_ram_mb_zero(models_dir: Path) -> None:
    backend = load(models_dir / "tiny-mlx", cache_ram_mb=0, parallel=2)
    prompt = tuple(backend.tokenize("the sky is blue"))
    for _ in range(2):
        assert one(backend, SeqSpec(prompt, GREEDY, 3)).stats.cached == 0
    assert backend.batcher.parallel == 2 and backend.batcher.cache_info().entries == 0
    backend.close()


def test_the_prompt_cache_forgets_the_least_recently_used_first() -> None:
    cache = MlxPromptCache(max_bytes=100)
    for i in range(3):
        assert cache.put((i, 1, 2), [f"state{i}"], 40, True, None, i)
    assert len(cache) == 2 and cache.bytes == 80  # the oldest went
    assert cache.find((0, 1, 2, 3), None) == (None, 0)
    entry, keep = cache.find((1, 1, 2, 3), None)
    assert entry is not None and keep == 3 and entry.cache == ["state1"]
    assert cache.put((9,), ["x"], 101, True, None, 9) is False  # too big for it at all
    # A conversation that moved on replaces its older state, even one it does not extend.
    cache.put((5, 6), ["a"], 10, True, "conv", 20)
    cache.put((7, 8), ["b"], 10, True, "conv", 21)
    assert cache.find((5, 6, 1), "conv") == (None, 0)
    # An untrimmable state is only continued: a prompt that leaves it part way finds nothing,
    # and a longer one does not replace the checkpoint it extends.
    cache.put((3, 4), ["ckpt"], 10, False, None, 30)
    cache.put((3, 4, 5, 6), ["final"], 10, False, None, 30)
    assert cache.find((3, 4, 5, 9), None)[0].cache == ["ckpt"]  # type: ignore[union-attr]
    assert cache.find((3, 4, 5, 6, 7), None)[0].cache == ["final"]  # type: ignore[union-attr]
    assert cache.find((3, 9), None) == (None, 0)
    assert (cache.hits, cache.misses) == (3, 3)


def test_sequences_batched_together_say_what_they_say_alone(fresh: MlxBackend) -> None:
    specs = [SeqSpec(tuple(fresh.tokenize(text)), GREEDY, 8, cache_prompt=False)
             for text in ("hello", "The quick brown fox jumps over the lazy dog", "Numbers 0123")]
    alone = [one(fresh, spec).tokens for spec in specs]
    together = generate(fresh, *specs)
    assert [r.tokens for r in together] == alone
    assert fresh.batcher.free == fresh.batcher.parallel
    assert len(set(map(tuple, alone))) == 3
    # Admitted while the others generate (continuous batching): the same again.
    slots = fresh.batcher
    (early,) = slots.admit(specs[1])
    for _ in range(3):
        slots.step()
    late = one(fresh, specs[0])
    slots.release(early)
    assert late.tokens == alone[0]


def test_a_seed_draws_the_same_tokens_from_the_same_state(fresh: MlxBackend) -> None:
    prompt = tuple(fresh.tokenize("Once upon a time"))
    spec = SeqSpec(prompt, RANDOM, 12, cache_prompt=False)
    first = one(fresh, spec).tokens
    assert one(fresh, spec).tokens == first
    # ...whatever else the batch holds.
    other = SeqSpec(tuple(fresh.tokenize("hello")), Sampling(seed=1, logit_bias=NO_EOS), 12,
                    cache_prompt=False)
    assert generate(fresh, other, spec)[1].tokens == first
    # Each choice of n draws its own tokens (seed + its index), the prompt read once.
    choices = generate(fresh, SeqSpec(prompt, RANDOM, 12, n=3, cache_prompt=False))
    assert choices[0].tokens == first and len({tuple(c.tokens) for c in choices}) == 3
    assert [c.stats.evaluated for c in choices] == [len(prompt)] * 3
    again = generate(fresh, SeqSpec(prompt, RANDOM, 12, n=3, cache_prompt=False))
    assert [c.tokens for c in again] == [c.tokens for c in choices]
    # Top-k, top-p and min-p keep the draw among the most likely tokens.
    narrow = one(fresh, SeqSpec(prompt, Sampling(temperature=1.0, top_k=2, seed=3, logit_bias=NO_EOS), 8,
                                logprobs=2, cache_prompt=False))
    assert all(s.token in {t for t, _ in s.probs.top} for s in narrow.probs if s.probs is not None)


def test_log_probabilities(fresh: MlxBackend) -> None:
    prompt = tuple(fresh.tokenize("The sky is"))
    run = one(fresh, SeqSpec(prompt, GREEDY, 4, logprobs=3))
    assert len(run.probs) == 4
    for s in run.probs:
        assert s.probs is not None and len(s.probs.top) == 3
        logprobs = [lp for _, lp in s.probs.top]
        assert logprobs == sorted(logprobs, reverse=True) and all(lp <= 0 for lp in logprobs)
        assert s.probs.top[0] == (s.token, s.probs.logprob)  # greedy: the most likely one
    bare = one(fresh, SeqSpec(prompt, GREEDY, 2, logprobs=0))
    assert all(s.probs is not None and s.probs.top == () for s in bare.probs)
    assert all(s.probs is None for s in one(fresh, SeqSpec(prompt, GREEDY, 2)).probs)


def test_a_release_mid_prefill_frees_the_slot_and_keeps_what_was_read(models_dir: Path) -> None:
    backend = load(models_dir / "tiny-mlx", prefill_step_size=16)
    slots = backend.batcher
    prompt = tuple(backend.tokenize("word " * 200))
    (handle,) = slots.admit(SeqSpec(prompt, GREEDY, 5))
    assert slots.free == slots.parallel - 1 and slots.busy
    for _ in range(3):  # three chunks of 16 tokens read
        assert slots.step() == []
    slots.release(handle)
    assert slots.free == slots.parallel and not slots.busy
    run = one(backend, SeqSpec(prompt, GREEDY, 2))
    assert run.stats.cached == 3 * 16 and len(run.tokens) == 2
    backend.close()


def test_a_release_mid_generation_frees_the_slot(fresh: MlxBackend) -> None:
    slots = fresh.batcher
    prompt = tuple(fresh.tokenize("the grass is green"))
    (handle,) = slots.admit(SeqSpec(prompt, GREEDY, 100))
    got: list[int] = []
    while len(got) < 3:
        got += [s.token for s in slots.step() if s.handle == handle]
    slots.release(handle)
    assert slots.free == slots.parallel and slots.step() == []
    # Its cache holds the prompt and the tokens it generated: a turn that goes on reuses them.
    run = one(fresh, SeqSpec((*prompt, *got, 5), GREEDY, 2))
    assert run.stats.cached == len(prompt) + len(got)


def test_a_choice_released_before_it_started_never_runs(fresh: MlxBackend) -> None:
    slots = fresh.batcher
    prompt = tuple(fresh.tokenize("a choice that leaves early"))
    first, second, third = slots.admit(SeqSpec(prompt, GREEDY, 100, n=3))
    slots.release(third)  # still waiting for the first choice to read the prompt
    assert slots.free == slots.parallel - 2
    seen: dict[int, int] = {}
    while len(seen) < 2 or min(seen.values()) < 3:
        for s in slots.step():
            seen[s.handle] = seen.get(s.handle, 0) + 1
    assert set(seen) == {first, second}
    slots.release(first)
    slots.release(second)
    assert slots.free == slots.parallel and slots.step() == []


def test_a_failed_step_keeps_no_cache_and_the_slots_go_on(fresh: MlxBackend,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    slots = fresh.batcher
    prompt = tuple(fresh.tokenize("a prompt that fails half way"))
    handles = slots.admit(SeqSpec(prompt, GREEDY, 5, n=2))
    slots.step()

    def boom() -> Any:
        raise RuntimeError("injected failure")

    monkeypatch.setattr(slots._gen, "next", boom)
    with pytest.raises(RuntimeError, match="injected"):
        slots.step()
    for h in handles:  # the engine ends what was in the failed step
        slots.release(h)
    run = one(fresh, SeqSpec(prompt, GREEDY, 3))
    assert run.stats.cached == 0 and len(run.tokens) == 3


def test_unsupported_features_are_refused_by_name(loaded: tuple[list[tuple[str, float]], MlxBackend]) -> None:
    _, backend = loaded
    assert MlxBackend.supports_grammar is False
    with pytest.raises(RequestInvalid) as refused:
        backend.batcher.admit(SeqSpec((1, 2), grammar='root ::= "x"'))
    assert refused.value.kind is ErrorKind.UNSUPPORTED and refused.value.param == "grammar"
    assert isinstance(refused.value, ValueError)  # what the engine's admit catches today
    assert backend.batcher.free == backend.batcher.parallel
    # (Requests that need a grammar are refused by the endpoints before a slot is asked for:
    # tests/test_backends.py checks those 400s through the daemon.)
    with pytest.raises(RequestInvalid, match="embeddings") as refused:
        backend.embed([[1]], 2)
    assert refused.value.kind is ErrorKind.UNSUPPORTED


def test_text_tokens_and_pieces(loaded: tuple[list[tuple[str, float]], MlxBackend]) -> None:
    _, backend = loaded
    tokens = backend.tokenize("héllo wörld")
    decoder = backend.decoder()
    assert "".join(decoder.add(t) for t in tokens) + decoder.flush() == "héllo wörld"
    assert b"".join(backend.piece(t) for t in tokens) == "héllo wörld".encode()
    assert backend.detokenize(tokens) == "héllo wörld"
    # Special tokens in text are read as such only when asked for.
    assert backend.tokenize("<|im_end|>", parse_special=True) == [2]
    assert len(backend.tokenize("<|im_end|>")) > 1
    assert backend.token_text(2) == "<|im_end|>" and backend.piece(2) == b"<|im_end|>"


TEMPLATE = (  # Hugging Face renders with trim_blocks: a newline after a tag is dropped
    "{% if tools %}TOOLS {{ tools | map(attribute='function') | map(attribute='name') | join(',') }}{{ nl }}"
    "{% endif %}{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %} CALL {{ c.function.name }}({{ c.function.arguments.city }})"
    "{% endfor %}"
    "{% if m.tool_call_id %} [{{ m.tool_call_id }}]{% endif %}{{ nl }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% if enable_thinking %} <think>{{ nl }}{% endif %}{% endif %}"
).replace("{{ nl }}", "{{ '\\n' }}")


def test_chat_prompts_carry_tools_calls_and_thinking(models_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(models_dir / "tiny-mlx", tmp_path / "tools")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    backend = load(folder)
    messages = (Message("user", "weather?"),
                Message("assistant", "", (ToolCall("c1", "weather", '{"city": "Oslo"}'),)),
                Message("tool", "rain", tool_call_id="c1"))
    prompt = backend.chat_prompt(Task(messages=messages, tools=(Tool("weather"),),
                                      reasoning=Reasoning(enabled=True)))
    assert prompt.text == ("TOOLS weather\nuser: weather?\nassistant:  CALL weather(Oslo)\ntool: rain [c1]\n"
                           "assistant: <think>\n")
    assert prompt.thinking_started and prompt.tokens == tuple(backend.tokenize(prompt.text))
    no_thinking = (("enable_thinking", False),)
    plain = backend.chat_prompt(Task(messages=messages[:1], chat_template_kwargs=no_thinking))
    assert plain.text == "user: weather?\nassistant:" and not plain.thinking_started
    assert backend.chat_template == TEMPLATE
    backend.close()


def test_a_model_without_a_chat_template_still_completes(models_dir: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(models_dir / "tiny-mlx", tmp_path / "no-template")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    backend = MlxBackend()
    info = backend.load(WorkerConfig(name="t", path=str(folder), backend="mlx"), lambda stage, v: True)
    assert info.chat_template is False
    with pytest.raises(RequestInvalid, match="chat template") as refused:
        backend.chat_prompt(Task(messages=(Message("user", "hi"),)))
    assert refused.value.kind is ErrorKind.UNSUPPORTED
    assert len(one(backend, SeqSpec(tuple(backend.tokenize("hi")), GREEDY, 2)).tokens) == 2
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
    for options, message in (({"n_batch": 8}, "unknown mlx options: n_batch"),
                             ({"parallel": 0}, "parallel must be at least 1")):
        with pytest.raises(ValueError, match=message):
            MlxBackend().load(WorkerConfig(name="t", path=str(odd), backend="mlx", options=options),
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
    backend = load(write_tiny_hybrid(models_dir, tmp_path / "hybrid"), prefill_step_size=4)
    prompt = tuple(backend.tokenize("the quick brown fox jumps"))
    spec = SeqSpec(prompt, RANDOM, 6)
    first = one(backend, spec)
    assert first.stats.cached == 0 and len(first.tokens) == 6
    # The same prompt again starts from the state kept at the end of the prompt (the state
    # after the reply cannot be cut back), and draws the same tokens from it.
    again = one(backend, spec)
    assert (again.stats.cached, again.tokens) == (len(prompt) - 1, first.tokens)
    # A turn that goes on from everything the state holds continues it.
    held = (*prompt, *first.tokens)
    more = (*held, *backend.tokenize(" and then"))
    turn = one(backend, SeqSpec(more, RANDOM, 4))
    assert turn.stats.cached == len(held)
    assert turn.tokens == one(backend, SeqSpec(more, RANDOM, 4, cache_prompt=False)).tokens
    # A prompt that leaves every kept state part way reads everything.
    assert one(backend, SeqSpec((*prompt[:3], 7, 7, 7), RANDOM, 2)).stats.cached == 0
    # Several sequences with recurrent state batched together say what they say alone.
    specs = [SeqSpec(p, GREEDY, 5, cache_prompt=False) for p in (prompt, tuple(backend.tokenize("hi there")))]
    assert [r.tokens for r in generate(backend, *specs)] == [one(backend, s).tokens for s in specs]
    backend.close()


def test_only_the_backend_library_missing_is_reported_as_an_install_problem(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Import worker.mlx_backend afresh with one module made unimportable (None in sys.modules).
    real = sys.modules["mlx_lm.generate"]
    for name in ("worker.mlx_backend", "worker.mlx_slots", "worker.mlx_sampling"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "mlx_lm.generate", None)
    with pytest.raises(BackendMissing, match=r"needs mlx_lm, which is not installed: "
                                             r"install modelherd\[mlx\]"):
        make_backend("mlx")
    monkeypatch.setitem(sys.modules, "mlx_lm.generate", real)
    monkeypatch.setitem(sys.modules, "jinja2", None)  # something else: reported as it is
    with pytest.raises(ImportError) as info:
        make_backend("mlx")
    assert not isinstance(info.value, BackendMissing) and info.value.name == "jinja2"
