"""mlx-lm backend: MLX model folders (config.json + *.safetensors + tokenizer files).

mlx-lm builds the model and the tokenizer (its chat template too); we run its
`generate_step` token loop ourselves, as for llama.cpp, so stop strings, token
counts, cancellation and the rendered bytes are the same for both backends.

Prompt caches: a few KV caches stay alive after their request, each with the
tokens it holds. A request takes the one sharing the longest prefix with its
prompt and evaluates only the rest, so a conversation's next turn skips
re-reading everything said before (llama.cpp does the same with its one slot).
"""

from __future__ import annotations

import copy
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jinja2
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.utils import get_total_parameters, load_model, load_tokenizer

from protocol.errors import ErrorKind
from protocol.messages import AUTO_N_CTX_CAP, BACKEND_OPTIONS, ModelInfo, WorkerConfig
from worker.backend import Embeddings, Finish, Generation, GenParams, ProgressFn
from worker.schema import RequestInvalid
from worker.stops import generate_text

_OPTION_KEYS = BACKEND_OPTIONS["mlx"]
DEFAULT_CACHE_SLOTS = 4
PENALTY_WINDOW = 64
# Weights are materialised in groups of about this many bytes, one progress report each.
_PROGRESS_STEP = 32 * 1024 * 1024
# Each load stage's part of the overall progress.
_STAGES = {"config": (0.0, 0.05), "weights": (0.05, 0.95), "tokenizer": (0.95, 1.0)}


class _Cancelled(Exception):
    """Raised from the prefill callback: the client left while its prompt was read."""


class MlxBackend:
    def __init__(self) -> None:
        self._model: Any = None
        self._tok: Any = None
        self._stream: Any = None
        self._n_ctx = 0
        self._caches: _PromptCaches | None = None
        self._prefill_step = 2048

    # ---- loading -----------------------------------------------------------

    def load(self, config: WorkerConfig, progress: ProgressFn) -> ModelInfo:
        opts = dict(config.options)
        unknown = set(opts) - _OPTION_KEYS
        if unknown:
            raise ValueError(f"unknown mlx options: {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(sorted(_OPTION_KEYS))})")
        folder = Path(config.path)
        # mlx-lm treats a path that does not exist as a Hugging Face repo id and
        # downloads it: never let a typo reach the network.
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not an MLX model folder (no config.json)")
        device, device_name, fallback = _pick_device(str(opts.get("device", "gpu")))
        mx.set_default_device(device)
        self._stream = mx.new_thread_local_stream(device)
        self._prefill_step = int(opts.get("prefill_step_size", 2048))
        report = _StageReporter(progress)

        report("config", 0.0)
        # Unsupported architectures fail here with mlx-lm's own message.
        model, model_config = load_model(folder, lazy=True)
        report("config", 1.0)
        _materialise(model, lambda v: report("weights", v))
        report("tokenizer", 0.0)
        tok = load_tokenizer(folder, eos_token_ids=model_config.get("eos_token_id"))  # type: ignore[no-untyped-call]
        report("tokenizer", 1.0)
        self._model, self._tok = model, tok
        self._caches = _PromptCaches(model, int(opts.get("prompt_cache_slots", DEFAULT_CACHE_SLOTS)))

        trained = int(model_config.get("max_position_embeddings") or 0)
        self._n_ctx = config.n_ctx or (min(AUTO_N_CTX_CAP, trained) if trained else AUTO_N_CTX_CAP)
        return ModelInfo(
            backend="mlx",
            device=device_name,
            n_ctx=self._n_ctx,
            n_ctx_train=trained,
            n_vocab=int(model_config.get("vocab_size") or len(tok)),
            n_params=int(get_total_parameters(model)),  # type: ignore[no-untyped-call]
            file_size=sum(p.stat().st_size for p in folder.glob("*.safetensors")),
            chat_template=bool(tok.has_chat_template),
            fallback=fallback,
            memory_bytes=int(mx.get_active_memory()),
        )

    def close(self) -> None:
        self._caches = None
        self._model = self._tok = None
        mx.clear_cache()

    # ---- generation --------------------------------------------------------

    def chat(self, messages: list[dict[str, str]], params: GenParams,
             cancel: threading.Event) -> Generation:
        tok = self._require()
        if not tok.has_chat_template:
            raise RequestInvalid("chat completions need a chat template and this model has none "
                                 "(tokenizer_config.json: chat_template); use /v1/completions",
                                 kind=ErrorKind.UNSUPPORTED, param="messages")
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except jinja2.TemplateError as exc:  # e.g. raise_exception() on roles that don't alternate
            raise RequestInvalid(f"the model's chat template rejected the messages: {exc}",
                                 param="messages") from exc
        # The template writes any BOS itself.
        return self._generate(list(tok.encode(text, add_special_tokens=False)), params, cancel,
                              "messages")

    def complete(self, prompt: str, params: GenParams, cancel: threading.Event) -> Generation:
        tok = self._require()
        bos = tok.bos_token
        tokens = tok.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
        return self._generate(list(tokens), params, cancel, "prompt")

    def _generate(self, prompt: list[int], params: GenParams, cancel: threading.Event,
                  field: str) -> Generation:
        for name, asked in (("grammar", params.grammar is not None),
                            ("response_format", params.json_schema is not None or params.json_object)):
            if asked:
                raise RequestInvalid(f"{name} is not supported by the mlx backend (constrained "
                                     "decoding needs llama.cpp: serve this model as a GGUF)",
                                     kind=ErrorKind.UNSUPPORTED, param=name)
        if not prompt:
            raise RequestInvalid("the prompt is empty", param=field)
        if len(prompt) >= self._n_ctx:
            raise RequestInvalid(
                f"the prompt is {len(prompt)} tokens, more than fits the model's context of {self._n_ctx}",
                kind=ErrorKind.CONTEXT_LENGTH_EXCEEDED, param=field)
        return self._run(prompt, params, cancel)

    def _run(self, prompt: list[int], params: GenParams, cancel: threading.Event) -> Generation:
        tok = self._require()
        budget = self._n_ctx - len(prompt)
        limit = min(params.max_tokens, budget) if params.max_tokens else budget
        # Always reseed: a seed one client chose must not make the next client's sampling repeat.
        mx.random.seed(params.seed if params.seed is not None else random.getrandbits(32))
        sampler = _sampler(params)
        processors = make_logits_processors(
            params.logit_bias or None,
            repetition_penalty=params.repeat_penalty if params.repeat_penalty != 1.0 else None,
            presence_penalty=params.presence_penalty or None,
            frequency_penalty=params.frequency_penalty or None,
            # The window llama.cpp's penalties look at (llama-cpp-python's last_n_tokens_size).
            repetition_context_size=PENALTY_WINDOW, presence_context_size=PENALTY_WINDOW,
            frequency_context_size=PENALTY_WINDOW)
        caches = self._caches
        assert caches is not None  # set with the tokenizer _require checked
        with mx.stream(self._stream):
            cache, cached = caches.take(prompt)
        fed = [cached]  # what the cache holds while the prompt is read

        def on_prefill(done: int, total: int) -> None:
            # Called before the first chunk, after each, and last after the first token
            # was sampled and fed back (so done == total means one more than the prompt).
            fed[0] = cached + done + (1 if done == total else 0)
            if cancel.is_set():  # a long prompt stops between prefill chunks too
                raise _Cancelled

        seen = list(prompt)  # the prompt, then every token received
        steps = generate_step(mx.array(prompt[cached:]), self._model, self._stream, max_tokens=-1,
                              sampler=sampler, logits_processors=processors, prompt_cache=cache,
                              prompt_progress_callback=on_prefill, prefill_step_size=self._prefill_step)
        eos = tok.eos_token_ids
        detok = tok.detokenizer

        def received() -> Iterator[int]:
            for step, _logprobs in steps:
                seen.append(int(step))  # generate_step yields plain ints, annotated as arrays
                yield seen[-1]

        def piece(token: int) -> str:
            detok.add_token(token)
            return str(detok.last_segment)

        def flush() -> str:
            detok.finalize()
            return str(detok.last_segment)

        intact = False
        try:
            reason, count = yield from generate_text(received(), eos.__contains__, piece, flush,
                                                     params.stop, limit, cancel)
            intact = True
        except _Cancelled:
            reason, count = "length", 0
            intact = True
        finally:
            steps.close()
            # A cache left by an exception inside the model may hold half a step: drop it.
            if intact:
                # Once a token arrived, every token received has been fed to the cache.
                held = len(seen) if len(seen) > len(prompt) else fed[0]
                with mx.stream(self._stream):
                    caches.put(seen, held, cache)
        yield Finish(reason, len(prompt), count, cached)

    def embed(self, inputs: list[str]) -> Embeddings:
        raise RequestInvalid("embeddings are not supported by the mlx backend: mlx-lm models "
                             "generate text only", kind=ErrorKind.UNSUPPORTED, param="model")

    def tokenize(self, text: str) -> list[int]:
        return list(self._require().encode(text, add_special_tokens=False))

    def _require(self) -> Any:
        if self._tok is None:
            raise RuntimeError("model is not loaded")
        return self._tok


class _PromptCaches:
    """KV caches of recent requests, most recent first, each with the tokens it holds.

    A cache that cannot be trimmed (a recurrent layer's state, a full sliding window) is
    only ever continued, never cut back to a shorter prefix."""

    def __init__(self, model: Any, slots: int) -> None:
        self._model = model
        self._slots = max(1, slots)
        self._entries: list[tuple[list[int], list[Any]]] = []

    def take(self, prompt: list[int]) -> tuple[list[Any], int]:
        """A cache for `prompt` and how many of its first tokens it already holds.

        At least one prompt token is always left to evaluate: generation starts from
        the logits of the last one."""
        best, best_len = -1, 0
        for i, (tokens, _cache) in enumerate(self._entries):
            n = _common_prefix(tokens, prompt)
            if n > best_len:
                best, best_len = i, n
        if best < 0:
            return make_prompt_cache(self._model), 0
        keep = min(best_len, len(prompt) - 1)
        tokens, cache = self._entries[best]
        if len(tokens) <= keep:  # the same conversation, one turn on: take its cache over
            del self._entries[best]
            return cache, keep
        # The prompt leaves the cached tokens part way (another conversation with the same
        # opening, or a regenerated turn): trim a copy, so the original stays for its owner.
        if not can_trim_prompt_cache(cache):
            return make_prompt_cache(self._model), 0
        cache = copy.deepcopy(cache)
        trim_prompt_cache(cache, len(tokens) - keep)
        return cache, keep

    def put(self, tokens: list[int], held: int, cache: list[Any]) -> None:
        """Keep `cache`, which holds `held` tokens: the first of `tokens`, and when `held`
        is larger, ones never seen (sampled, fed back, then the request stopped)."""
        if held > len(tokens):
            if not can_trim_prompt_cache(cache):
                return
            trim_prompt_cache(cache, held - len(tokens))
            held = len(tokens)
        self._entries.insert(0, (tokens[:held], cache))
        del self._entries[self._slots:]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _pick_device(want: str) -> tuple[Any, str, str | None]:
    """(mlx device, the name /models shows, why it is not the preferred one)."""
    if want not in ("gpu", "cpu"):
        raise ValueError(f"mlx option device must be 'gpu' or 'cpu', not {want!r}")
    if want == "cpu":
        return mx.cpu, "cpu", None
    if mx.metal.is_available():
        return mx.gpu, "metal", None
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return mx.gpu, "cuda", None
    return mx.cpu, "cpu", ("this mlx build has no GPU backend here (Metal and CUDA unavailable); "
                           "running on the CPU")


class _StageReporter:
    """Reports each stage's share of the load as overall progress, so `progress` only ever
    goes up (as llama-server's clients read it), and stops the load when told to."""

    def __init__(self, progress: ProgressFn) -> None:
        self._progress = progress

    def __call__(self, stage: str, value: float) -> None:
        start, end = _STAGES[stage]
        if self._progress(stage, start + (end - start) * value) is False:
            raise RuntimeError("load aborted")


def _materialise(model: Any, report: Callable[[float], None]) -> None:
    """Read the (lazily loaded) weights in groups, reporting the share of bytes done."""
    arrays: list[Any] = [item[1] for item in tree_flatten(model.parameters())]
    total = sum(a.nbytes for a in arrays) or 1
    done = 0
    group: list[Any] = []
    group_bytes = 0
    for a in arrays:
        if not group_bytes:
            report(done / total)
        group.append(a)
        group_bytes += a.nbytes
        if group_bytes >= _PROGRESS_STEP:
            mx.eval(group)
            done += group_bytes
            group, group_bytes = [], 0
    mx.eval(group)
    report(1.0)


def _sampler(params: GenParams) -> Any:
    # top_p 0 keeps only the most likely token, as in llama.cpp; mlx-lm would skip top-p.
    top_k = 1 if params.top_p <= 0 else params.top_k
    return make_sampler(params.temperature, top_p=params.top_p, min_p=params.min_p, top_k=top_k)
