"""Every message that crosses the router <-> worker boundary.

Messages are tagged msgspec Structs encoded as msgpack. Bulk bytes (an HTTP
request body, rendered response bytes) never go inside a struct: they travel as
a separate payload frame so neither side re-encodes them.

Conversation:  worker Hello -> router Configure -> worker LoadProgress* ->
worker Ready | LoadFailed. Then Request/Cancel down, ResponseHead, BodyChunk*,
ResponseEnd | ResponseError up. Heartbeat both ways; Shutdown down.

Resumable streams: a Request may name a stream key; the worker then keeps the
SSE bytes it sends. StreamRead is answered like a Request (head, chunks, end);
StreamLookup and StreamDelete are answered with one StreamStates.
"""

from __future__ import annotations

import enum

import msgspec

from protocol.errors import ErrorKind

PROTOCOL_VERSION = 5

_TAG = "t"


class Endpoint(enum.Enum):
    """What a proxied request asks of its model's worker (which API it came through)."""

    CHAT = "chat"  # OpenAI chat completions
    CHAT_INPUT_TOKENS = "chat_input_tokens"
    COMPLETION = "completion"  # OpenAI text completions
    EMBEDDING = "embedding"
    RESPONSES = "responses"  # OpenAI Responses API
    RESPONSES_INPUT_TOKENS = "responses_input_tokens"
    MESSAGES = "messages"  # Anthropic Messages API
    MESSAGES_COUNT_TOKENS = "messages_count_tokens"
    NATIVE_COMPLETION = "native_completion"  # llama-server's /completion
    INFILL = "infill"
    NATIVE_EMBEDDING = "native_embedding"  # llama-server's /embedding
    TOKENIZE = "tokenize"
    DETOKENIZE = "detokenize"
    APPLY_TEMPLATE = "apply_template"
    PROPS = "props"
    SLOTS = "slots"


# Option values a model may pass to its backend; kept scalar so the wire stays typed.
OptionValue = str | int | float | bool

# WorkerConfig.n_ctx = 0 means the trained context capped at this: a 128k model must not
# reserve 128k of KV cache. The router estimates memory with the same rule.
AUTO_N_CTX_CAP = 4096

# A model's slots (sequences decoded together) and the bound of its host-RAM cache of idle
# conversations, when its options do not say; the router counts both in its memory estimate.
DEFAULT_PARALLEL = 4
DEFAULT_CACHE_RAM_MB = 1024

# The `options` each backend accepts: part of the Configure contract, so the router
# rejects a typo at config time instead of the worker failing the load later.
BACKEND_OPTIONS: dict[str, frozenset[str]] = {
    # parallel: slots (sequences decoded together); cache_ram_mb: host-RAM cache of idle
    # conversations' KV state.
    "llama_cpp": frozenset({
        "n_batch", "n_ubatch", "flash_attn", "use_mmap", "use_mlock", "rope_freq_base",
        "rope_freq_scale", "type_k", "type_v", "offload_kqv", "parallel", "cache_ram_mb",
    }),
    # device: "gpu" (the default: Metal, or CUDA with mlx[cuda]) or "cpu"; prompt_cache_slots:
    # accepted for old configs and ignored (cache_ram_mb bounds the prompt cache now).
    "mlx": frozenset({"device", "prefill_step_size", "parallel", "cache_ram_mb", "prompt_cache_slots"}),
    "scripted": frozenset({"load_seconds", "fail_load", "token_seconds", "crash_after_tokens", "parallel"}),
}


class Download(msgspec.Struct, frozen=True):
    """Where a worker fetches its model from before loading it (protocol.sources)."""

    source: str  # hf://... or https://...
    cache_dir: str
    sha256: str | None = None
    allow_insecure_http: bool = False
    mmproj: str | None = None  # a projector's source, fetched after the model (the same way)


class WorkerConfig(msgspec.Struct, frozen=True):
    """What a worker needs to load one model. Built by the router's catalog. With
    `download`, `path` is where the download lands in the cache."""

    name: str
    path: str
    backend: str = "llama_cpp"
    n_ctx: int = 0
    n_gpu_layers: int = 0
    n_threads: int = 0
    chat_format: str | None = None
    mmproj: str | None = None
    options: dict[str, OptionValue] = {}
    download: Download | None = None


# What a client still attached to a stream is told when someone else stops it.
STREAM_DELETED = "its conversation's stream was deleted"
STREAM_REPLACED = "a newer request took over this conversation"


class StreamSettings(msgspec.Struct, frozen=True):
    """How a worker keeps resumable streams (server-wide, not per model)."""

    buffer_bytes: int = 4 * 1024 * 1024  # per stream; the oldest bytes go first
    retention_s: float = 300.0  # a finished stream is kept this long
    max_streams: int = 100_000  # finished ones beyond this are freed, oldest first
    max_bytes: int = 256 * 1024 * 1024  # and beyond this many bytes kept by finished ones


class StreamState(msgspec.Struct, frozen=True):
    key: str
    is_done: bool
    total_bytes: int  # every byte ever written, including those dropped from the buffer
    started_at: float  # Unix seconds
    completed_at: float  # Unix seconds; 0 while running


class ModelInfo(msgspec.Struct, frozen=True):
    """What a worker learned by loading its model, reported in Ready."""

    backend: str
    device: str
    n_ctx: int
    n_ctx_train: int
    n_vocab: int
    n_params: int
    file_size: int
    chat_template: bool
    # Why the model runs on `device` and not on the one it preferred (no GPU build, no
    # Metal...); None when it got what it asked for.
    fallback: str | None = None
    memory_bytes: int = 0  # what the backend reports holding for weights and buffers


# ---- router -> worker ------------------------------------------------------


class Configure(msgspec.Struct, tag="configure", tag_field=_TAG, frozen=True):
    model: WorkerConfig
    streams: StreamSettings = StreamSettings()


class StoredTurn(msgspec.Struct, frozen=True):
    """An earlier Responses API exchange, as the router keeps it for previous_response_id."""

    request: bytes  # the request body
    response: bytes  # the Response object


class Request(msgspec.Struct, tag="request", tag_field=_TAG, frozen=True):
    """Payload frame: the client's HTTP body, unparsed by the router.

    With `stream_key`, a streaming answer is kept for resuming and survives the
    client: the router sends Detach instead of Cancel when the client leaves.
    `history`: the stored turns a Responses request continues, oldest first."""

    req_id: int
    endpoint: Endpoint
    stream_key: str | None = None
    history: list[StoredTurn] = []
    window: int = 0  # body bytes the worker may send before it waits for Credit; 0: no limit


class Cancel(msgspec.Struct, tag="cancel", tag_field=_TAG, frozen=True):
    """Stop a request (its generation, or a StreamRead's replay)."""

    req_id: int


class Detach(msgspec.Struct, tag="detach", tag_field=_TAG, frozen=True):
    """The client of a resumable request left: keep generating, stop sending chunks,
    still send ResponseEnd when the generation is over."""

    req_id: int


class StreamRead(msgspec.Struct, tag="stream_read", tag_field=_TAG, frozen=True):
    """Replay a kept stream from absolute byte `offset`, then follow it live."""

    req_id: int
    key: str
    offset: int
    window: int = 0  # as Request.window


class Credit(msgspec.Struct, tag="credit", tag_field=_TAG, frozen=True):
    """The router wrote `bytes` more of the request's body to its client: the worker may
    send that many more. Flow control: a slow client slows its own request, and the
    router never holds more than the window of it."""

    req_id: int
    bytes: int


class StreamLookup(msgspec.Struct, tag="stream_lookup", tag_field=_TAG, frozen=True):
    req_id: int
    keys: list[str]


class StreamDelete(msgspec.Struct, tag="stream_delete", tag_field=_TAG, frozen=True):
    """Stop the streams' generations and free their buffers; answered with what was removed.
    `reason` is what a client still attached to one of them is told."""

    req_id: int
    keys: list[str]
    reason: str = STREAM_DELETED


class Shutdown(msgspec.Struct, tag="shutdown", tag_field=_TAG, frozen=True):
    reason: str = ""


class Heartbeat(msgspec.Struct, tag="heartbeat", tag_field=_TAG, frozen=True):
    seq: int = 0


# ---- worker -> router ------------------------------------------------------


class Hello(msgspec.Struct, tag="hello", tag_field=_TAG, frozen=True):
    protocol_version: int
    pid: int
    worker_id: str


class LoadProgress(msgspec.Struct, tag="load_progress", tag_field=_TAG, frozen=True):
    stage: str
    value: float


class DownloadProgress(msgspec.Struct, tag="download_progress", tag_field=_TAG, frozen=True):
    """Progress of the file being downloaded; `finished` on the last one of the model."""

    file: str
    downloaded: int
    total: int  # 0 while unknown
    bytes_per_s: float
    eta_s: float | None
    finished: bool = False


class Ready(msgspec.Struct, tag="ready", tag_field=_TAG, frozen=True):
    info: ModelInfo


class LoadFailed(msgspec.Struct, tag="load_failed", tag_field=_TAG, frozen=True):
    kind: ErrorKind
    message: str


class WorkerStatus(msgspec.Struct, tag="status", tag_field=_TAG, frozen=True):
    """Sent with every Heartbeat answer: what the worker is doing, and its counters so far."""

    active: int  # requests holding slots
    queued: int  # requests waiting for a slot
    slots_busy: int = 0
    slots_total: int = 0
    cache_entries: int = 0  # the host-RAM prompt cache of idle conversations
    cache_bytes: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    prompt_tokens: int = 0  # evaluated, since the worker started
    cached_tokens: int = 0  # taken from a cache instead
    generated_tokens: int = 0
    requests: int = 0  # finished


class ResponseHead(msgspec.Struct, tag="head", tag_field=_TAG, frozen=True):
    req_id: int
    status: int
    content_type: str


class BodyChunk(msgspec.Struct, tag="chunk", tag_field=_TAG, frozen=True):
    """Payload frame: response bytes exactly as the client will receive them."""

    req_id: int


class ResponseEnd(msgspec.Struct, tag="end", tag_field=_TAG, frozen=True):
    req_id: int
    prompt_tokens: int = 0  # what the request cost, for the router's access log and metrics
    completion_tokens: int = 0
    first_token_ms: float = 0.0  # from the worker receiving the request to its first token
    predicted_ms: float = 0.0  # from the first token to the last (the first choice's)


class ResponseStored(msgspec.Struct, tag="stored", tag_field=_TAG, frozen=True):
    """A Responses API answer to keep (the request asked `store`): sent before its end."""

    req_id: int
    response_id: str
    turn: StoredTurn


class StreamStates(msgspec.Struct, tag="stream_states", tag_field=_TAG, frozen=True):
    """The answer to StreamLookup (the keys known) or StreamDelete (the keys removed)."""

    req_id: int
    states: list[StreamState]


class ResponseError(msgspec.Struct, tag="error", tag_field=_TAG, frozen=True):
    """A request failed before its head was sent; the router renders the HTTP error."""

    req_id: int
    kind: ErrorKind
    message: str
    param: str | None = None
    sizes: tuple[int, int] | None = None  # a prompt over the context: (its tokens, n_ctx)


Downstream = (
    Configure | Request | Cancel | Detach | Credit | StreamRead | StreamLookup | StreamDelete | Shutdown
    | Heartbeat
)
Upstream = (
    Hello
    | LoadProgress
    | DownloadProgress
    | Ready
    | LoadFailed
    | WorkerStatus
    | ResponseHead
    | BodyChunk
    | ResponseEnd
    | ResponseError
    | ResponseStored
    | StreamStates
    | Heartbeat
)

# Messages that must (and only these may) carry a payload frame.
WITH_PAYLOAD: tuple[type, ...] = (Request, BodyChunk)
