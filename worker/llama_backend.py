"""llama-cpp-python backend: GGUF models through llama.cpp's low-level API.

One model, one context holding `parallel` sequences in a unified KV buffer
(`parallel x n_ctx` cells), decoded together by worker.llama_slots. The model's own
Jinja chat template (or a named llama-cpp-python chat format) builds chat prompts, with
tools passed to it as llama-server's --jinja does. Embeddings use a second context made
for them on first use; llama.cpp mmaps the weights, so both share the model's pages.
llama.cpp's own log lines go to this process's log at debug level.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jinja2
import llama_cpp as L
import llama_cpp.llama_chat_format as chat_formats
import numpy as np
from llama_cpp._internals import LlamaModel

from protocol.errors import ErrorKind
from protocol.messages import (
    AUTO_N_CTX_CAP,
    BACKEND_OPTIONS,
    DEFAULT_CACHE_RAM_MB,
    DEFAULT_PARALLEL,
    ModelInfo,
    WorkerConfig,
)
from worker.backend import Embeddings, ProgressFn, Prompt
from worker.llama_slots import LlamaSlots
from worker.schema import RequestInvalid
from worker.task import Message, Task

log = logging.getLogger("modelherd.worker.llama")
llama_log = logging.getLogger("modelherd.worker.llama.cpp")

_OPTION_KEYS = BACKEND_OPTIONS["llama_cpp"]
MIB = 1024 * 1024


class LlamaBackend:
    supports_grammar = True

    def __init__(self) -> None:
        self._model: LlamaModel | None = None
        self._ctx: Any = None
        self._embed_ctx: Any = None
        self._slots: LlamaSlots | None = None
        self._template: _Template | None = None
        self._n_ctx = 0
        self._ctx_params: Any = None
        self._buf = ctypes.create_string_buffer(256)

    # ---- loading -----------------------------------------------------------

    def load(self, config: WorkerConfig, progress: ProgressFn) -> ModelInfo:
        opts = dict(config.options)
        unknown = set(opts) - _OPTION_KEYS
        if unknown:
            raise ValueError(f"unknown llama_cpp options: {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(sorted(_OPTION_KEYS))})")
        _route_llama_log()
        L.llama_backend_init()
        aborted = [False]

        @L.llama_progress_callback  # type: ignore[untyped-decorator]
        def on_progress(value: float, _user: ctypes.c_void_p) -> bool:
            go = progress("load", float(value) * 0.95) is not False
            aborted[0] = not go
            return go

        self._keep_alive = on_progress  # ctypes frees a callback nobody holds
        params = L.llama_model_default_params()
        params.n_gpu_layers = config.n_gpu_layers
        params.progress_callback = on_progress
        params.use_mmap = bool(opts.get("use_mmap", True))
        params.use_mlock = bool(opts.get("use_mlock", False))
        progress("load", 0.0)
        if not os.path.isfile(config.path):
            raise FileNotFoundError(f"model file not found: {config.path}")
        try:
            model = self._model = LlamaModel(path_model=config.path, params=params, verbose=False)
        except ValueError as exc:
            raise RuntimeError("load aborted" if aborted[0] else f"llama.cpp could not load {config.path}: "
                               f"{exc} (see the worker's log lines above)") from exc
        trained = model.n_ctx_train()
        self._n_ctx = config.n_ctx or (min(AUTO_N_CTX_CAP, trained) if trained > 0 else AUTO_N_CTX_CAP)
        parallel = int(opts.get("parallel", DEFAULT_PARALLEL))
        if parallel < 1:
            raise ValueError(f"option parallel must be at least 1, not {parallel}")
        n_batch = int(opts.get("n_batch", 512))
        cp = self._ctx_params = L.llama_context_default_params()
        cp.n_ctx = self._n_ctx * parallel
        cp.n_batch = n_batch
        cp.n_ubatch = int(opts.get("n_ubatch", min(512, n_batch)))
        cp.n_seq_max = parallel
        # One KV stream per slot, n_ctx cells each. A unified buffer shared by all slots was
        # measured to change greedy output from the first token when prompts are decoded
        # together (masked cells still change the float summation); separate streams give
        # exactly what a request gives alone.
        cp.kv_unified = False
        threads = config.n_threads or max(1, (os.cpu_count() or 2) // 2)
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        if "flash_attn" in opts:
            cp.flash_attn_type = 1 if opts["flash_attn"] else 0
        for key in ("type_k", "type_v"):
            if key in opts:
                setattr(cp, key, int(opts[key]))
        if "offload_kqv" in opts:
            cp.offload_kqv = bool(opts["offload_kqv"])
        for key in ("rope_freq_base", "rope_freq_scale"):
            if key in opts:
                setattr(cp, key, float(opts[key]))
        ctx = self._ctx = L.llama_init_from_model(model.model, cp)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {cp.n_ctx} tokens "
                               f"({parallel} slots x n_ctx {self._n_ctx}); lower n_ctx or parallel")
        progress("load", 0.95)
        cache_mb = int(opts.get("cache_ram_mb", DEFAULT_CACHE_RAM_MB))
        self._slots = LlamaSlots(ctx, model.vocab, parallel=parallel, n_ctx=self._n_ctx, n_batch=n_batch,
                                 cache_ram_bytes=cache_mb * MIB)
        self._template = _Template.of(model, config.chat_format)
        progress("load", 1.0)
        device, fallback = _device(config.n_gpu_layers)
        return ModelInfo(
            backend="llama_cpp",
            device=device,
            n_ctx=self._n_ctx,
            n_ctx_train=trained,
            n_vocab=model.n_vocab(),
            n_params=model.n_params(),
            file_size=os.path.getsize(config.path),
            chat_template=self._template.from_model,
            fallback=fallback,
            memory_bytes=int(model.size()),
        )

    def warm_up(self) -> None:
        """The first decode, on the engine thread before any request: it repacks weights, and
        it makes the engine thread own llama.cpp's OpenMP team. A decode on the loading
        thread would start a second team; with more OpenMP threads than cores libgomp cuts
        its spin-waits short, which made every later decode ~35% slower (80 against
        119 tokens/s with SmolLM2-135M on 2 cores)."""
        bos = self._require().token_bos()
        ids = (L.llama_token * 1)(bos if bos >= 0 else 0)  # held: the batch points into it
        batch = L.llama_batch_get_one(ids, 1)
        L.llama_decode(self._ctx, batch)
        L.llama_memory_clear(L.llama_get_memory(self._ctx), True)

    def close(self) -> None:
        if self._slots is not None:
            self._slots.close()
            self._slots = None
        for ctx in (self._embed_ctx, self._ctx):
            if ctx:
                L.llama_free(ctx)
        self._ctx = self._embed_ctx = None
        if self._model is not None:
            self._model.close()  # type: ignore[no-untyped-call]
            self._model = None

    # ---- what the engine uses --------------------------------------------------------

    @property
    def batcher(self) -> LlamaSlots:
        assert self._slots is not None, "model is not loaded"
        return self._slots

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def chat_template(self) -> str | None:
        return self._template.source if self._template is not None else None

    def chat_prompt(self, task: Task) -> Prompt:
        template = self._template
        assert template is not None and task.messages is not None
        text, stop = template.render(task)
        # The template writes BOS itself when it has one; add it only when it did not.
        bos = self._require().token_bos()
        add_bos = bos >= 0 and not text.startswith(self._token_text(bos)) and self._require().add_bos_token()
        tokens = self.tokenize(text, add_special=add_bos, parse_special=True)
        return Prompt(tuple(tokens), text, stop, _opens_thinking(text))

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return list(self._require().tokenize(text.encode("utf-8"), add_special, parse_special))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def piece(self, token: int) -> bytes:
        # llama-cpp-python's token_to_piece returns the whole buffer, NULs included.
        n = L.llama_token_to_piece(self._require().vocab, token, self._buf, len(self._buf), 0, False)
        return self._buf.raw[:n] if n > 0 else b""

    def token_text(self, token: int) -> str:
        return self._token_text(token)

    def decoder(self) -> _PieceDecoder:
        return _PieceDecoder(self.piece)

    def is_end(self, token: int) -> bool:
        return bool(L.llama_vocab_is_eog(self._require().vocab, token))

    @property
    def vocab(self) -> Any:
        return self._require().vocab

    def special_tokens(self) -> dict[str, int]:
        """Tokens a request may refer to by text (fill-in-the-middle, BOS/EOS)."""
        m = self._require()
        out = {"bos": m.token_bos(), "eos": m.token_eos(), "fim_pre": m.token_prefix(),
               "fim_suf": m.token_suffix(), "fim_mid": m.token_middle(),
               "fim_sep": L.llama_vocab_fim_sep(m.vocab), "fim_rep": L.llama_vocab_fim_rep(m.vocab)}
        return {k: v for k, v in out.items() if v >= 0}

    def embed(self, inputs: Sequence[Sequence[int]], normalize: int) -> Embeddings:
        """One vector per input (mean pooling). `normalize`: 2 for L2 (OpenAI's and
        llama-server's default), -1 for none; llama-server's embd_normalize values."""
        ctx = self._embedding_context()
        n_embd = L.llama_model_n_embd(self._require().model)
        mem = L.llama_get_memory(ctx)
        vectors: list[list[float]] = []
        total = 0
        for tokens in inputs:
            L.llama_memory_clear(mem, True)
            if tokens:
                ids = (L.llama_token * len(tokens))(*tokens)  # held: the batch points into it
                batch = L.llama_batch_get_one(ids, len(tokens))
                if L.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed on an embedding input")
                ptr = L.llama_get_embeddings_seq(ctx, 0)
                vec = np.ctypeslib.as_array(ptr, shape=(n_embd,)).astype(np.float64)
            else:  # an empty input has no tokens to pool: its embedding is all zeros
                vec = np.zeros(n_embd)
            total += len(tokens)
            vectors.append(_normalized(vec, normalize).tolist())
        return Embeddings(vectors, total)

    def _embedding_context(self) -> Any:
        if self._embed_ctx is None:
            cp = L.llama_context_default_params()
            cp.n_ctx = cp.n_batch = cp.n_ubatch = self._n_ctx
            cp.n_threads = cp.n_threads_batch = self._ctx_params.n_threads
            cp.embeddings = True
            cp.pooling_type = L.LLAMA_POOLING_TYPE_MEAN
            cp.no_perf = True
            self._embed_ctx = L.llama_init_from_model(self._require().model, cp)
            if not self._embed_ctx:
                raise RuntimeError("llama.cpp could not create an embedding context")
        return self._embed_ctx

    def _token_text(self, token: int) -> str:
        n = L.llama_token_to_piece(self._require().vocab, token, self._buf, len(self._buf), 0, True)
        return self._buf.raw[:n].decode("utf-8", errors="replace") if n > 0 else ""

    def _require(self) -> LlamaModel:
        if self._model is None:
            raise RuntimeError("model is not loaded")
        return self._model


class _PieceDecoder:
    """Token pieces are bytes; UTF-8 characters may span several of them."""

    def __init__(self, piece: Callable[[int], bytes]) -> None:
        self._piece = piece
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        return str(self._utf8.decode(self._piece(token)))

    def flush(self) -> str:
        return str(self._utf8.decode(b"", final=True))


class _Template:
    """The model's chat template (its own Jinja template, or a named chat format)."""

    def __init__(self, source: str | None, formatter: Any, named: Any, from_model: bool) -> None:
        self.source = source
        self._formatter = formatter
        self._named = named
        self.from_model = from_model
        # Templates that print `arguments | tojson` want the arguments as an object.
        self._object_args = source is not None and "arguments|tojson" in source.replace(" ", "")

    @classmethod
    def of(cls, model: LlamaModel, chat_format: str | None) -> _Template:
        meta = _metadata(model)
        source = meta.get("tokenizer.chat_template")
        if chat_format:
            handler = chat_formats.get_chat_completion_handler(chat_format)
            return cls(None, None, handler, source is not None)
        if source is None:
            return cls(None, None, None, False)
        bos = _piece_text(model, model.token_bos())
        eos = _piece_text(model, model.token_eos())
        return cls(source, chat_formats.Jinja2ChatFormatter(source, eos, bos), None, True)

    def render(self, task: Task) -> tuple[str, tuple[str, ...]]:
        assert task.messages is not None
        messages = [self._message(m) for m in task.messages]
        tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                   "parameters": t.parameters}} for t in task.tools] or None
        if self._named is not None:
            return _render_named(self._named, messages, tools)
        if self._formatter is None:
            raise RequestInvalid("chat completions need a chat template and this model has none "
                                 "(GGUF metadata tokenizer.chat_template); use /v1/completions, or set "
                                 "chat_format for it in the config", kind=ErrorKind.UNSUPPORTED,
                                 param="messages")
        kwargs = dict(task.chat_template_kwargs)
        if task.reasoning.enabled is not None:
            kwargs.setdefault("enable_thinking", task.reasoning.enabled)
        self._formatter.add_generation_prompt = task.add_generation_prompt
        try:
            result = self._formatter(messages=messages, tools=tools, **kwargs)
        except (jinja2.TemplateError, ValueError) as exc:  # raise_exception(): roles that don't alternate
            raise RequestInvalid(f"the model's chat template rejected the messages: {exc}",
                                 param="messages") from exc
        return result.prompt, ()

    def _message(self, m: Message) -> dict[str, Any]:
        out: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.name, "arguments": self._arguments(c.arguments)}} for c in m.tool_calls]
        if m.tool_call_id is not None:
            out["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            out["name"] = m.name
        if m.reasoning_content:
            out["reasoning_content"] = m.reasoning_content
        return out

    def _arguments(self, text: str) -> Any:
        if not self._object_args:
            return text
        try:
            return json.loads(text)
        except ValueError:
            return text


class _Capture:
    """Stands in for `Llama` when calling a named chat format's handler, to learn the prompt
    text it builds: the handler renders, tokenizes, then calls create_completion."""

    verbose = False

    def __init__(self) -> None:
        self.text = ""
        self.stop: list[str] = []

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        self.text = text.decode("utf-8")
        return [0]

    def create_completion(self, prompt: Any = None, stop: Any = None, **_: Any) -> Any:
        self.stop = [stop] if isinstance(stop, str) else list(stop or [])
        return iter(())


def _render_named(handler: Any, messages: list[dict[str, Any]],
                  tools: list[dict[str, Any]] | None) -> tuple[str, tuple[str, ...]]:
    capture = _Capture()
    try:
        handler(llama=capture, messages=messages, tools=tools, stream=True)
    except (jinja2.TemplateError, ValueError) as exc:
        raise RequestInvalid(f"the chat format rejected the messages: {exc}", param="messages") from exc
    return capture.text, tuple(capture.stop)


def _opens_thinking(prompt: str) -> bool:
    """The template ended the prompt inside a thinking block (Qwen 3, DeepSeek-R1...)."""
    tail = prompt.rstrip()
    return tail.endswith("<think>")


def _normalized(vec: np.ndarray[Any, Any], mode: int) -> np.ndarray[Any, Any]:
    if mode < 0:
        return vec
    if mode == 0:  # llama-server: max absolute value scaled to int16's range
        peak = np.abs(vec).max()
        return vec / peak * 32760.0 if peak > 0 else vec
    norm = float((np.abs(vec) ** mode).sum() ** (1.0 / mode))  # 2: Euclidean, p: p-norm
    return vec / norm if norm > 0 else vec


def _metadata(model: LlamaModel) -> dict[str, str]:
    out: dict[str, str] = {}
    buf = ctypes.create_string_buffer(1 << 20)
    key = ctypes.create_string_buffer(1024)
    for i in range(L.llama_model_meta_count(model.model)):
        if L.llama_model_meta_key_by_index(model.model, i, key, len(key)) < 0:
            continue
        n = L.llama_model_meta_val_str_by_index(model.model, i, buf, len(buf))
        if n >= 0:
            out[key.value.decode("utf-8", errors="replace")] = buf.value.decode("utf-8", errors="replace")
    return out


def _piece_text(model: LlamaModel, token: int) -> str:
    if token < 0:
        return ""
    buf = ctypes.create_string_buffer(256)
    n = L.llama_token_to_piece(model.vocab, token, buf, len(buf), 0, True)
    return buf.raw[:n].decode("utf-8", errors="replace") if n > 0 else ""


def _device(n_gpu_layers: int) -> tuple[str, str | None]:
    """(device, why not the GPU asked for): a CPU-only build ignores n_gpu_layers."""
    if n_gpu_layers == 0:
        return "cpu", None
    if not L.llama_supports_gpu_offload():
        return "cpu", (f"n_gpu_layers={n_gpu_layers} asks for a GPU, but this llama-cpp-python "
                       "was built without GPU offload (CUDA or Metal); running on the CPU")
    return ("metal" if sys.platform == "darwin" else "cuda"), None


_LEVELS = {4: logging.ERROR, 3: logging.WARNING}  # GGML_LOG_LEVEL_ERROR, _WARN


@L.llama_log_callback  # type: ignore[untyped-decorator]
def _on_llama_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    message = text.decode("utf-8", errors="replace").rstrip()
    if message:
        llama_log.log(_LEVELS.get(level, logging.DEBUG), "%s", message)


def _route_llama_log() -> None:
    """llama.cpp's chatter (load details, per-context info) at debug, its warnings and
    errors at their own level, all through this process's logging."""
    L.llama_log_set(_on_llama_log, ctypes.c_void_p(0))
