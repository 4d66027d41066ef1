"""llama-cpp-python backend: GGUF models through llama.cpp.

One `Llama` serves chat and completions. Embeddings need a context created with
`embedding=True`, so a second one is opened on first use; llama.cpp mmaps the
weights, so the two share the model's pages rather than loading it twice.

Generation does not use llama-cpp-python's streaming path: it re-detokenizes the
whole completion for every token (quadratic: 200 tokens cost ~14,000 detokenize
calls). We let its chat handler build the prompt, then run `Llama.generate`
with incremental UTF-8 decoding, our own stop strings and exact token counts.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import os
import random
import sys
import threading
from collections.abc import Iterator
from typing import Any

import jinja2
import llama_cpp
import llama_cpp.llama_chat_format as llama_chat_format
import llama_cpp.llama_cpp as llama_low
from llama_cpp import Llama, LogitsProcessorList
from llama_cpp._internals import LlamaModel
from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

from protocol.errors import ErrorKind
from protocol.messages import AUTO_N_CTX_CAP, BACKEND_OPTIONS, ModelInfo, WorkerConfig
from worker.backend import Embeddings, Finish, Generation, GenParams, ProgressFn
from worker.schema import RequestInvalid
from worker.stops import generate_text

_OPTION_KEYS = BACKEND_OPTIONS["llama_cpp"]


class LlamaBackend:
    def __init__(self) -> None:
        self._llm: Llama | None = None
        self._embedder: Llama | None = None
        self._kwargs: dict[str, Any] = {}

    # ---- loading -----------------------------------------------------------

    def load(self, config: WorkerConfig, progress: ProgressFn) -> ModelInfo:
        unknown = set(config.options) - _OPTION_KEYS
        if unknown:
            raise ValueError(f"unknown llama_cpp options: {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(sorted(_OPTION_KEYS))})")
        self._kwargs = {
            "model_path": config.path,
            "n_ctx": config.n_ctx or _auto_n_ctx(config.path),
            "n_gpu_layers": config.n_gpu_layers,
            "n_threads": config.n_threads or None,
            "chat_format": config.chat_format,
            "verbose": False,
            **config.options,
        }
        progress("load", 0.0)
        llm = self._llm = _load_with_progress(self._kwargs, lambda v: progress("load", v))
        progress("load", 1.0)
        device, fallback = _device(config.n_gpu_layers)
        return ModelInfo(
            backend="llama_cpp",
            device=device,
            n_ctx=llm.n_ctx(),
            n_ctx_train=llm._model.n_ctx_train(),
            n_vocab=llm.n_vocab(),
            n_params=llm._model.n_params(),
            file_size=os.path.getsize(config.path),
            chat_template="tokenizer.chat_template" in llm.metadata,
            fallback=fallback,
            memory_bytes=int(llm._model.size()),
        )

    def close(self) -> None:
        for llm in (self._embedder, self._llm):
            if llm is not None:
                llm.close()
        self._llm = self._embedder = None

    # ---- generation --------------------------------------------------------

    def chat(self, messages: list[dict[str, str]], params: GenParams,
             cancel: threading.Event) -> Generation:
        llm = self._require()
        capture = _PromptCapture(llm)
        handler = (llm.chat_handler or llm._chat_handlers.get(llm.chat_format or "")
                   or llama_chat_format.get_chat_completion_handler(llm.chat_format or ""))
        try:
            handler(llama=capture, messages=messages, stream=True)  # type: ignore[arg-type]
        except jinja2.TemplateError as exc:  # e.g. raise_exception() on roles that don't alternate
            raise RequestInvalid(f"the model's chat template rejected the messages: {exc}",
                                 param="messages") from exc
        if capture.prompt is None:
            raise RuntimeError(f"chat format {llm.chat_format!r} did not produce a prompt")
        return self._generate(capture.prompt, params, params.stop + capture.stop, cancel, "messages")

    def complete(self, prompt: str, params: GenParams,
                 cancel: threading.Event) -> Generation:
        llm = self._require()
        tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
        return self._generate(tokens, params, params.stop, cancel, "prompt")

    def _generate(self, prompt: list[int], params: GenParams, stops: list[str],
                  cancel: threading.Event, field: str) -> Generation:
        n_ctx = self._require().n_ctx()
        if not prompt:  # llama.cpp asserts on an empty batch
            raise RequestInvalid("the prompt is empty", param=field)
        if len(prompt) >= n_ctx:
            raise RequestInvalid(
                f"the prompt is {len(prompt)} tokens, more than fits the model's context of {n_ctx}",
                kind=ErrorKind.CONTEXT_LENGTH_EXCEEDED, param=field)
        grammar = _grammar(params, self._require())  # a bad grammar fails here, before any token
        return self._run(prompt, params, stops, cancel, grammar, n_ctx)

    def _run(self, prompt: list[int], params: GenParams, stops: list[str], cancel: threading.Event,
             grammar: LlamaGrammar | None, n_ctx: int) -> Generation:
        llm = self._require()
        budget = n_ctx - len(prompt)
        limit = min(params.max_tokens, budget) if params.max_tokens else budget
        # Always reseed: a seed one client chose must not make the next client's sampling repeat.
        llm.set_seed(params.seed if params.seed is not None else random.getrandbits(32))
        processors = LogitsProcessorList([_bias(params.logit_bias)]) if params.logit_bias else None
        cached = _reused_prefix(llm, prompt)
        vocab = llm._model.vocab
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        buf = ctypes.create_string_buffer(256)
        tokens = llm.generate(
            prompt, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
            temp=params.temperature, repeat_penalty=params.repeat_penalty,
            frequency_penalty=params.frequency_penalty, presence_penalty=params.presence_penalty,
            logits_processor=processors, grammar=grammar,
        )
        try:
            reason, count = yield from generate_text(
                tokens, lambda t: bool(llama_cpp.llama_vocab_is_eog(vocab, t)),
                lambda t: decoder.decode(_piece(vocab, t, buf)), lambda: decoder.decode(b"", final=True),
                stops, limit, cancel)
        finally:
            tokens.close()
        yield Finish(reason, len(prompt), count, cached)

    def embed(self, inputs: list[str]) -> Embeddings:
        if self._embedder is None:
            self._embedder = Llama(**dict(self._kwargs, embedding=True,
                                          pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN))
        n_ctx = self._embedder.n_ctx()
        for i, text in enumerate(inputs):
            n = len(self._embedder.tokenize(text.encode("utf-8")))
            if n > n_ctx:
                raise RequestInvalid(
                    f"input[{i}] has {n} tokens, more than the model's context of {n_ctx}",
                    kind=ErrorKind.CONTEXT_LENGTH_EXCEEDED, param="input")
        result = self._embedder.create_embedding(inputs)
        vectors = [[float(x) for x in d["embedding"]] for d in result["data"]]  # type: ignore[arg-type]
        return Embeddings(vectors, int(result["usage"]["prompt_tokens"]))

    def tokenize(self, text: str) -> list[int]:
        return self._require().tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def _require(self) -> Llama:
        if self._llm is None:
            raise RuntimeError("model is not loaded")
        return self._llm


class _PromptCapture:
    """Stands in for `Llama` when calling a chat handler, to learn the prompt it builds.

    Handlers render the chat template (the GGUF's own, or a named chat_format),
    tokenize, merge the template's stop strings and then call `create_completion`;
    we record that call instead of running it.
    """

    def __init__(self, llm: Llama) -> None:
        self._llm = llm
        self.verbose = False
        self.prompt: list[int] | None = None
        self.stop: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def create_completion(self, prompt: list[int], stop: Any = None, **_: Any) -> Iterator[Any]:
        self.prompt = list(prompt)
        self.stop = [stop] if isinstance(stop, str) else list(stop or [])
        return iter(())


def _device(n_gpu_layers: int) -> tuple[str, str | None]:
    """(device, why not the GPU asked for): a CPU-only build ignores n_gpu_layers."""
    if n_gpu_layers == 0:
        return "cpu", None
    if not llama_cpp.llama_supports_gpu_offload():
        return "cpu", (f"n_gpu_layers={n_gpu_layers} asks for a GPU, but this llama-cpp-python "
                       "was built without GPU offload (CUDA or Metal); running on the CPU")
    return ("metal" if sys.platform == "darwin" else "cuda"), None


def _reused_prefix(llm: Llama, prompt: list[int]) -> int:
    """How many prompt tokens `Llama.generate` will take from its KV cache instead of
    evaluating: its own rule (0.3.36), worked out before it runs."""
    held = list(llm._input_ids)
    n = 0
    for a, b in zip(held, prompt, strict=False):
        if a != b:
            break
        n += 1
    if n < len(prompt):
        return n
    if len(held) == len(prompt) and not getattr(llm, "_requires_eval", True):
        return n  # the whole prompt, logits and all
    return n - 1  # one token is evaluated again for fresh logits


def _bias(bias: dict[int, float]) -> Any:
    def apply(_input_ids: Any, scores: Any) -> Any:
        for token, value in bias.items():
            scores[token] += value
        return scores
    return apply


def _auto_n_ctx(path: str) -> int:
    """n_ctx = 0 means: the training context, capped so a 128k model doesn't reserve 128k of KV."""
    params = llama_low.llama_model_default_params()
    params.vocab_only = True  # metadata only: no weights, no context
    probe = LlamaModel(path_model=path, params=params, verbose=False)
    try:
        meta = probe.metadata()
        trained = int(meta.get(f"{meta.get('general.architecture', '')}.context_length", 0) or 0)
    finally:
        probe.close()  # type: ignore[no-untyped-call]
    return min(AUTO_N_CTX_CAP, trained) if trained > 0 else AUTO_N_CTX_CAP


def _piece(vocab: Any, token: int, buf: Any) -> bytes:
    # llama-cpp-python's token_to_piece returns the whole buffer, NULs included.
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    return bytes(buf[:n]) if n > 0 else b""


def _grammar(params: GenParams, llm: Llama) -> LlamaGrammar | None:
    field = "grammar" if params.grammar is not None else "response_format"
    try:
        if params.grammar is not None:
            grammar = LlamaGrammar.from_string(params.grammar, verbose=False)
        elif params.json_schema is not None:
            grammar = LlamaGrammar.from_json_schema(json.dumps(params.json_schema), verbose=False)
        elif params.json_object:
            grammar = LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        else:
            return None
    except Exception as exc:
        raise RequestInvalid(f"invalid {field}: {exc}", param=field) from exc
    # llama-cpp-python defers parsing to sampler construction, where a bad grammar
    # becomes a NULL sampler and a crash. Parse it here with llama.cpp's own parser.
    probe = llama_cpp.llama_sampler_init_grammar(
        llm._model.vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8"))
    if not probe:
        raise RequestInvalid(f"invalid {field}: llama.cpp could not parse the grammar "
                             "(see the GBNF guide for the syntax)", param=field)
    llama_cpp.llama_sampler_free(probe)
    return grammar


def _load_with_progress(kwargs: dict[str, Any], report: Any) -> Llama:
    """Construct `Llama` with llama.cpp's load progress callback wired to `report`.

    `Llama.__init__` offers no progress parameter, but it builds its model params
    from `llama_model_default_params()`; we wrap that one call for the duration of
    this (single-threaded) construction so the params carry our callback.
    """

    @llama_cpp.llama_progress_callback  # type: ignore[untyped-decorator]
    def on_progress(value: float, _user: ctypes.c_void_p) -> bool:
        return report(float(value)) is not False

    module: Any = llama_low  # the module object llama.py calls through
    original = module.llama_model_default_params

    def with_callback() -> Any:
        p = original()
        p.progress_callback = on_progress
        return p

    module.llama_model_default_params = with_callback
    try:
        return Llama(**kwargs)
    finally:
        module.llama_model_default_params = original
