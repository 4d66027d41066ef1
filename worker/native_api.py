"""llama-server's own routes, as its clients read them: /completion and /infill (native
output: `content`, `stop`, `completion_probabilities`, `timings`), /tokenize,
/detokenize, /apply-template, /props and /slots. Shapes follow llama.cpp's
tools/server (server-task.cpp, server-context.cpp) of the b11434 source."""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from protocol.errors import ErrorKind
from worker.openai_api import JSON, SSE, logprob_entry, progress_out, timings, timings_out
from worker.openai_wire import LogprobOut, PromptProgressOut, TimingsOut
from worker.outputs import Delta, Finish, PromptProgress, Text, Timings, TokenLogprob
from worker.task import Task

_json = msgspec.json.Encoder()


class _Partial(msgspec.Struct):
    content: str
    tokens: list[int]
    stop: bool
    index: int = 0
    id_slot: int = -1
    tokens_predicted: int = 0
    tokens_evaluated: int = 0
    completion_probabilities: list[LogprobOut] | UnsetType = UNSET
    prompt_progress: PromptProgressOut | UnsetType = UNSET
    timings: TimingsOut | UnsetType = UNSET


class _Final(msgspec.Struct):
    index: int
    content: str
    tokens: list[int]
    id_slot: int
    stop: bool
    model: str
    tokens_predicted: int
    tokens_evaluated: int
    prompt: str
    has_new_line: bool
    truncated: bool
    stop_type: str  # none | eos | word | limit
    stopping_word: str
    tokens_cached: int
    timings: TimingsOut
    completion_probabilities: list[LogprobOut] | UnsetType = UNSET
    generation_settings: RequestSettings | UnsetType = UNSET


class _ErrorDetail(msgspec.Struct):
    code: int
    message: str
    type: str


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail


_LLAMA_TYPE = {ErrorKind.CONTEXT_LENGTH_EXCEEDED: "exceed_context_size_error",
               ErrorKind.UNSUPPORTED: "not_supported_error", ErrorKind.UNAVAILABLE: "unavailable_error"}


class NativeRenderer:
    """/completion and /infill: one choice (or n), llama-server's native JSON."""

    def __init__(self, model: str, prompt_text: str, prompt_tokens: int, stream: bool, n_probs: int,
                 return_tokens: bool, n: int = 1, settings: RequestSettings | None = None) -> None:
        self._model = model
        self._settings = settings
        self._prompt = prompt_text
        self._n_prompt = prompt_tokens
        self._stream = stream
        self._probs = n_probs > 0
        self._return_tokens = return_tokens
        self.content_type = SSE if stream else JSON
        self._texts: list[list[str]] = [[] for _ in range(n)]
        self._logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self._tokens: list[list[int]] = [[] for _ in range(n)]
        self._finals: list[_Final | None] = [None] * n
        self._live: list[TimingsOut | None] = [None] * n

    def start(self, prompt_tokens: int, cached_tokens: int) -> bytes:
        return b""

    def progress(self, p: PromptProgress, t: Timings | None) -> bytes:
        part = _Partial("", [], False, tokens_evaluated=self._n_prompt, prompt_progress=progress_out(p))
        if t is not None:
            part.timings = timings_out(t)
        return b"data: " + _json.encode(part) + b"\n\n"

    def live(self, choice: int, t: Timings) -> None:
        self._live[choice] = timings_out(t)

    def delta(self, choice: int, d: Delta) -> bytes:
        if not isinstance(d, Text):
            return b""
        self._texts[choice].append(d.text)
        self._logprobs[choice].extend(d.logprobs)
        ids = [t.id for t in d.logprobs]
        self._tokens[choice].extend(ids)
        if not self._stream:
            return b""
        part = _Partial(d.text, ids if self._return_tokens else [], False, choice,
                        tokens_predicted=len(self._texts[choice]), tokens_evaluated=self._n_prompt)
        if self._probs:
            part.completion_probabilities = [logprob_entry(t, native=True) for t in d.logprobs]
        live = self._live[choice]
        if live is not None:
            part.timings = live
        return b"data: " + _json.encode(part) + b"\n\n"

    def finish(self, choice: int, f: Finish) -> bytes:
        text = "".join(self._texts[choice])
        stop_type = "limit" if f.reason == "length" else ("word" if f.stop_sequence else "eos")
        final = _Final(choice, "" if self._stream else text,
                       [] if self._stream or not self._return_tokens else self._tokens[choice], 0, True,
                       self._model, f.usage.completion_tokens, f.usage.prompt_tokens, self._prompt,
                       "\n" in text, False, stop_type, f.stop_sequence or "", f.usage.cached_tokens,
                       timings(f))
        if self._probs and not self._stream:
            final.completion_probabilities = [logprob_entry(t, native=True) for t in self._logprobs[choice]]
        if self._settings is not None:
            final.generation_settings = self._settings
        self._finals[choice] = final
        return b"data: " + _json.encode(final) + b"\n\n" if self._stream else b""

    def end(self) -> bytes:
        if self._stream:
            return b""  # llama-server's native stream has no [DONE]
        finals = [f for f in self._finals if f is not None]
        return _json.encode(finals[0] if len(finals) == 1 else finals)

    def fail(self, kind: ErrorKind, message: str) -> bytes:
        return b"data: " + error_body(kind, message) + b"\n\n"


def error_body(kind: ErrorKind, message: str, extra: dict[str, int] | None = None) -> bytes:
    """llama-server's error shape: {"error": {"code", "message", "type"}}."""
    body = _ErrorBody(_ErrorDetail(kind.status, message, _LLAMA_TYPE.get(kind, kind.openai_type)))
    return _json.encode(body)


# ---- tokenizer routes ---------------------------------------------------------------------


class Piece(msgspec.Struct):
    id: int
    piece: str | list[int]


class Tokens(msgspec.Struct):
    tokens: list[int] | list[Piece]


class Detokenized(msgspec.Struct):
    content: str


class Applied(msgspec.Struct):
    prompt: str


class InputTokens(msgspec.Struct):
    input_tokens: int
    object: str | UnsetType = UNSET


def tokens_body(tokens: list[int], pieces: list[bytes] | None) -> bytes:
    if pieces is None:
        return _json.encode(Tokens(tokens))
    out = []
    for token, raw in zip(tokens, pieces, strict=True):
        try:
            out.append(Piece(token, raw.decode("utf-8")))
        except UnicodeDecodeError:  # part of a character: the bytes, as llama-server gives them
            out.append(Piece(token, list(raw)))
    return _json.encode(Tokens(out))


def encode(value: Any) -> bytes:
    return _json.encode(value)


# ---- /props and /slots -----------------------------------------------------------------------


class Modalities(msgspec.Struct):
    vision: bool = False
    video: bool = False
    audio: bool = False


NO_SEED = 4294967295  # llama.cpp's LLAMA_DEFAULT_SEED: a random one


class SamplingParams(msgspec.Struct):
    """default_generation_settings.params: llama.cpp's sampling defaults, as /props shows them."""

    seed: int = NO_SEED
    temperature: float = 0.8
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    top_n_sigma: float = -1.0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    typical_p: float = 1.0
    repeat_last_n: int = 64
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 64
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    max_tokens: int = -1
    n_predict: int = -1
    n_keep: int = 0
    n_discard: int = 0
    ignore_eos: bool = False
    stream: bool = False
    n_probs: int = 0
    min_keep: int = 0
    reasoning_format: str = "auto"
    samplers: list[str] = msgspec.field(default_factory=lambda: [
        "penalties", "top_k", "top_p", "min_p", "temperature"])
    timings_per_token: bool = False
    post_sampling_probs: bool = False


class BiasOut(msgspec.Struct):
    bias: float  # -inf (a banned token) is written as null, as llama-server writes it
    token: int


class RequestSettings(SamplingParams, kw_only=True):
    """A request's generation_settings, in a native completion's final result."""

    logit_bias: list[BiasOut] = []
    stop: list[str] = []
    grammar: str = ""


def request_settings(task: Task, n_probs: int, ignore_eos: bool) -> RequestSettings:
    s = task.sampling
    limit = task.max_tokens if task.max_tokens is not None else -1
    return RequestSettings(
        seed=s.seed if s.seed is not None else NO_SEED, temperature=s.temperature,
        top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, repeat_penalty=s.repeat_penalty,
        presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty, max_tokens=limit,
        n_predict=limit, ignore_eos=ignore_eos, stream=task.stream, n_probs=n_probs,
        timings_per_token=task.timings_per_token, logit_bias=[BiasOut(b, t) for t, b in s.logit_bias],
        stop=list(task.stop), grammar=task.grammar or "")


class GenerationSettings(msgspec.Struct):
    n_ctx: int
    params: SamplingParams = msgspec.field(default_factory=SamplingParams)


class TemplateCaps(msgspec.Struct):
    supports_string_content: bool = True
    supports_typed_content: bool = False
    supports_tools: bool = False
    supports_tool_calls: bool = False
    supports_parallel_tool_calls: bool = False
    supports_system_role: bool = True
    supports_preserve_reasoning: bool = False
    supports_reasoning_effort: bool = False
    supports_object_arguments: bool = False


class Props(msgspec.Struct):
    """A model's /props, as a llama-server child answers it."""

    default_generation_settings: GenerationSettings
    total_slots: int
    model_alias: str
    model_path: str
    modalities: Modalities
    chat_template: str
    chat_template_caps: TemplateCaps
    bos_token: str
    eos_token: str
    build_info: str
    endpoint_slots: bool = True
    endpoint_props: bool = False
    endpoint_metrics: bool = True
    ui: bool = True  # llama-server's default: its web UI hides a model whose props say false
    ui_settings: dict[str, Any] = msgspec.field(default_factory=dict)
    media_marker: str = "<__media__>"
    is_sleeping: bool = False
    cors_proxy_enabled: bool = False


class NextToken(msgspec.Struct):
    has_next_token: bool
    has_new_line: bool = False
    n_remain: int = -1
    n_decoded: int = 0


class SlotBody(msgspec.Struct):
    id: int
    n_ctx: int
    speculative: bool
    is_processing: bool
    n_prompt_tokens: int
    next_token: list[NextToken]
    conversation: str | None = None  # modelherd: the conversation whose cache the slot holds
    n_cached_tokens: int = 0  # modelherd: tokens its KV cache holds
    paused: bool = False  # modelherd: generation held until its client reads (flow control)


def stream_or_json(stream: bool) -> str:
    return SSE if stream else JSON
