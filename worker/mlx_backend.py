"""mlx-lm backend: MLX model folders (config.json + *.safetensors + tokenizer files).

mlx-lm builds the model and the tokenizer (its chat template too); its BatchGenerator
decodes `parallel` sequences together behind our slots (worker.mlx_slots), so stop
strings, token counts, cancellation and the rendered bytes are the engine's, the same
for both backends. Grammars (constrained decoding) and embeddings are llama.cpp's only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jinja2
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer, _byte_decoder
from mlx_lm.utils import get_total_parameters, load_model, load_tokenizer

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
from worker.mlx_slots import MlxSlots
from worker.schema import RequestInvalid
from worker.task import Message, Task

log = logging.getLogger("modelherd.worker.mlx")

_OPTION_KEYS = BACKEND_OPTIONS["mlx"]
DEFAULT_PREFILL_STEP = 2048
MIB = 1024 * 1024
# Weights are materialised in groups of about this many bytes, one progress report each.
_PROGRESS_STEP = 32 * 1024 * 1024
# Each load stage's part of the overall progress.
_STAGES = {"config": (0.0, 0.05), "weights": (0.05, 0.95), "tokenizer": (0.95, 1.0)}


class MlxBackend:
    supports_grammar = False  # the engine refuses grammars before a slot is taken

    def __init__(self) -> None:
        self._model: Any = None
        self._tok: Any = None
        self._slots: MlxSlots | None = None
        self._n_ctx = 0
        self._eos: frozenset[int] = frozenset()
        self._pieces: list[bytes] | None = None

    # ---- loading -----------------------------------------------------------

    def load(self, config: WorkerConfig, progress: ProgressFn) -> ModelInfo:
        opts = dict(config.options)
        unknown = set(opts) - _OPTION_KEYS
        if unknown:
            raise ValueError(f"unknown mlx options: {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(sorted(_OPTION_KEYS))})")
        if "prompt_cache_slots" in opts:
            log.warning("mlx option prompt_cache_slots is no longer used: the prompt cache is bounded "
                        "in memory by cache_ram_mb (default %d)", DEFAULT_CACHE_RAM_MB)
        parallel = int(opts.get("parallel", DEFAULT_PARALLEL))
        if parallel < 1:
            raise ValueError(f"option parallel must be at least 1, not {parallel}")
        folder = Path(config.path)
        # mlx-lm treats a path that does not exist as a Hugging Face repo id and
        # downloads it: never let a typo reach the network.
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not an MLX model folder (no config.json)")
        device, device_name, fallback = _pick_device(str(opts.get("device", "gpu")))
        mx.set_default_device(device)
        # Per thread: the engine thread, which decodes, gets its own.
        stream = mx.new_thread_local_stream(device)
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
        self._eos = frozenset(int(t) for t in tok.eos_token_ids)

        trained = int(model_config.get("max_position_embeddings") or 0)
        self._n_ctx = config.n_ctx or (min(AUTO_N_CTX_CAP, trained) if trained else AUTO_N_CTX_CAP)
        self._slots = MlxSlots(model, parallel=parallel, n_ctx=self._n_ctx,
                               prefill_step=int(opts.get("prefill_step_size", DEFAULT_PREFILL_STEP)),
                               cache_ram_bytes=int(opts.get("cache_ram_mb", DEFAULT_CACHE_RAM_MB)) * MIB,
                               stream=stream)
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

    def warm_up(self) -> None:
        pass  # mlx compiles lazily and has no thread-bound pool to claim

    def close(self) -> None:
        if self._slots is not None:
            self._slots.close()
            self._slots = None
        self._model = self._tok = None
        mx.clear_cache()

    # ---- what the engine uses --------------------------------------------------------

    @property
    def batcher(self) -> MlxSlots:
        assert self._slots is not None, "model is not loaded"
        return self._slots

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def chat_template(self) -> str | None:
        """The template's source, from which the tool-call format is recognised."""
        source = getattr(self._tok, "chat_template", None) if self._tok is not None else None
        return source if isinstance(source, str) else None

    def chat_prompt(self, task: Task) -> Prompt:
        tok = self._require()
        assert task.messages is not None
        if not tok.has_chat_template:
            raise RequestInvalid("chat completions need a chat template and this model has none "
                                 "(tokenizer_config.json: chat_template); use /v1/completions",
                                 kind=ErrorKind.UNSUPPORTED, param="messages")
        tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                   "parameters": t.parameters}} for t in task.tools] or None
        kwargs = dict(task.chat_template_kwargs)
        if task.reasoning.enabled is not None:
            kwargs.setdefault("enable_thinking", task.reasoning.enabled)
        try:
            text = tok.apply_chat_template([_message(m) for m in task.messages], tools=tools,
                                           add_generation_prompt=task.add_generation_prompt, tokenize=False,
                                           **kwargs)
        except (jinja2.TemplateError, ValueError, TypeError) as exc:  # raise_exception(): roles out of turn
            raise RequestInvalid(f"the model's chat template rejected the messages: {exc}",
                                 param="messages") from exc
        # The template writes any BOS itself (as Hugging Face's apply_chat_template assumes).
        tokens = tok.encode(text, add_special_tokens=False)
        return Prompt(tuple(int(t) for t in tokens), text, (), text.rstrip().endswith("<think>"))

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        tok = self._require()
        bos = tok.bos_token
        add = add_special and (bos is None or not text.startswith(bos))  # not a second BOS
        tokens = tok.encode(text, add_special_tokens=add, split_special_tokens=not parse_special)
        return [int(t) for t in tokens]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return str(self._require().decode(list(tokens)))

    def piece(self, token: int) -> bytes:
        """The token's own bytes (part of a character, maybe)."""
        pieces = self._pieces if self._pieces is not None else self._piece_table()
        return pieces[token] if 0 <= token < len(pieces) else self.token_text(token).encode()

    def token_text(self, token: int) -> str:
        return str(self._require().decode([token]))

    def decoder(self) -> _Detokenizer:
        return _Detokenizer(self._require().detokenizer)  # a fresh one per choice

    def special_tokens(self) -> dict[str, int]:
        tok = self._require()
        out = {"bos": tok.bos_token_id, "eos": tok.eos_token_id if tok.eos_token_id is not None
               else min(self._eos, default=None)}
        return {k: int(v) for k, v in out.items() if v is not None}

    def is_end(self, token: int) -> bool:
        return token in self._eos

    def embed(self, inputs: Sequence[Sequence[int]], normalize: int) -> Embeddings:
        raise RequestInvalid("embeddings are not supported by the mlx backend: mlx-lm models "
                             "generate text only", kind=ErrorKind.UNSUPPORTED, param="model")

    def _piece_table(self) -> list[bytes]:
        """Each token's bytes, from the vocabulary as the streaming detokenizer reads it."""
        tok = self._require()
        detok = tok.detokenizer
        if isinstance(detok, SPMStreamingDetokenizer):  # ▁ is a space; <0xNN> tokens are bytes
            table = [p.replace(SPMStreamingDetokenizer._sep, b" ") for p in detok.tokenmap]
        elif hasattr(detok, "tokenmap"):  # byte-level BPE: each character stands for a byte
            decoder = _byte_decoder()
            table = [b"".join(bytes([decoder[c]]) if c in decoder else c.encode() for c in piece)
                     for piece in detok.tokenmap]
        else:
            table = [str(tok.decode([t])).encode() for t in range(len(tok))]
        self._pieces = table
        return table

    def _require(self) -> Any:
        if self._tok is None:
            raise RuntimeError("model is not loaded")
        return self._tok


class _Detokenizer:
    """mlx-lm's streaming detokenizer as a TokenDecoder: text as it becomes whole."""

    def __init__(self, detok: Any) -> None:
        self._detok = detok

    def add(self, token: int) -> str:
        self._detok.add_token(token)
        return str(self._detok.last_segment)

    def flush(self) -> str:
        self._detok.finalize()
        return str(self._detok.last_segment)


def _message(m: Message) -> dict[str, Any]:
    """A message as chat templates read it: tool calls' arguments as objects, as Hugging
    Face's templates expect (`arguments | tojson`)."""
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.name, "arguments": _arguments(c.arguments)}} for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    if m.reasoning_content:
        out["reasoning_content"] = m.reasoning_content
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


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
