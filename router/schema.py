"""The JSON bodies the router itself reads and writes, as msgspec structs.

Everything a worker renders (completions, embeddings) passes through as bytes; what
the router answers on its own (model lists, management answers, the event feed,
stream lookups) is typed here. `UNSET` fields are left out of the JSON.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from router.cachefiles import CacheInfo

# ---- request bodies ----------------------------------------------------------------


class Routed(msgspec.Struct):
    """The only fields the router reads of a proxied body; the rest is the worker's."""

    model: str = ""
    stream: bool | None = None
    previous_response_id: str | None = None  # the Responses API: a stored turn to continue


class ModelRef(msgspec.Struct):
    """POST /models/load, /models/unload, /models/pull."""

    model: str
    wait: bool = False


class LookupBody(msgspec.Struct):
    conversation_ids: list[str]


# ---- /models and /v1/models --------------------------------------------------------


class DownloadState(msgspec.Struct):
    file: str
    downloaded: int
    total: int
    bytes_per_s: int
    eta_s: float | None


class LoadStages(msgspec.Struct):
    """llama-server's load progress: its stages, the current one, and how far it got."""

    value: float
    current: str = "text_model"
    stages: list[str] = msgspec.field(default_factory=lambda: ["text_model"])


class Architecture(msgspec.Struct):
    input_modalities: list[str] = msgspec.field(default_factory=lambda: ["text"])
    output_modalities: list[str] = msgspec.field(default_factory=lambda: ["text"])


class ModelStatusBody(msgspec.Struct):
    value: str
    failed: bool
    args: list[str] = msgspec.field(default_factory=list)  # llama-server: its child's argv
    progress: float | UnsetType = UNSET
    stage: str | UnsetType = UNSET
    download: DownloadState | UnsetType = UNSET
    queued: str | UnsetType = UNSET
    exit_code: int | UnsetType | None = UNSET
    message: str | UnsetType = UNSET
    log_tail: list[str] | UnsetType = UNSET
    load_failures: int | UnsetType = UNSET
    retry_in: float | UnsetType = UNSET


class MemoryBody(msgspec.Struct):
    estimate: int | None
    rss: int | None
    backend: int | UnsetType = UNSET


class SlotsBody(msgspec.Struct):
    """A loaded model's slots (sequences decoded together), as its last heartbeat said."""

    busy: int
    total: int
    queued: int


class PromptCacheBody(msgspec.Struct):
    """Its host-RAM cache of idle conversations' KV state."""

    entries: int
    bytes: int
    hits: int
    misses: int


class ModelBody(msgspec.Struct):
    id: str
    object: str
    created: int
    owned_by: str
    aliases: list[str]
    tags: list[str]
    architecture: Architecture
    backend: str
    source: str
    path: str
    origin: str
    mmproj: str | None
    status: ModelStatusBody
    pid: int | None
    in_flight: int
    waiting: int
    pinned: bool
    ttl: float
    max_queue: int
    memory: MemoryBody
    cache: CacheInfo | None
    device: str | None
    device_fallback: str | None
    slots: SlotsBody | None = None
    prompt_cache: PromptCacheBody | None = None
    meta: dict[str, Any] | UnsetType = UNSET
    size: int | None = None  # bytes of its files on disk (a download's: as far as it got)
    idle_s: float | None = None  # loaded with nothing in flight: seconds since its last request


class ModelList(msgspec.Struct):
    data: list[ModelBody]
    object: str = "list"


# ---- management answers -----------------------------------------------------------


class LoadAnswer(msgspec.Struct):
    model: ModelBody
    success: bool = True


class Done(msgspec.Struct):
    success: bool = True


class PullAnswer(msgspec.Struct):
    model: str
    pulling: bool
    cache: CacheInfo | None
    success: bool = True


class RemoveAnswer(msgspec.Struct):
    removed: list[str]
    bytes: int
    success: bool = True


class Health(msgspec.Struct):
    status: str = "ok"


class Caller(msgspec.Struct):
    """GET /whoami: the key a request came with (its name, never the key) and its role."""

    key: str | None  # None when keys are off
    role: str  # "admin" | "user"; with keys off everyone may do everything: "admin"
    keys_required: bool


class RouterSettings(msgspec.Struct):
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    n_ctx: int = 0


class RouterProps(msgspec.Struct):
    """GET /props without a model: the router itself, as llama-server's router answers."""

    max_instances: int
    models_autoload: bool
    build_info: str
    role: str = "router"
    model_alias: str = "modelherd"
    model_path: str = "none"
    default_generation_settings: RouterSettings = msgspec.field(default_factory=RouterSettings)
    ui_settings: dict[str, Any] = msgspec.field(default_factory=dict)
    cors_proxy_enabled: bool = False


class Disabled(msgspec.Struct):
    message: str = "this feature is disabled"
    type: str = "feature_disabled"


class FeatureDisabled(msgspec.Struct):
    """llama-server's answer on a route whose feature is off (its /tools)."""

    error: Disabled = msgspec.field(default_factory=Disabled)


class Reloaded(msgspec.Struct):
    models: list[str]
    success: bool = True


class Deleted(msgspec.Struct):
    id: str
    object: str = "response"
    deleted: bool = True


# ---- the event feed (GET /models/sse) -----------------------------------------------


class FeedState(msgspec.Struct):
    """A model's state in a status_change event, and in a snapshot."""

    status: str
    id: str | UnsetType = UNSET  # in a snapshot
    progress: LoadStages | UnsetType = UNSET  # while loading, as llama-server reports it
    exit_code: int | UnsetType | None = UNSET
    message: str | UnsetType = UNSET
    stage: str | UnsetType = UNSET
    value: float | UnsetType = UNSET
    file: str | UnsetType = UNSET
    downloaded: int | UnsetType = UNSET
    total: int | UnsetType = UNSET
    bytes_per_s: int | UnsetType = UNSET
    eta_s: float | UnsetType | None = UNSET


class Snapshot(msgspec.Struct):
    models: list[FeedState]


class DoneTotal(msgspec.Struct):
    done: int
    total: int


class DownloadEvent(msgspec.Struct):
    """download_progress: llama-server's `progress` keyed by file, and modelherd's figures."""

    progress: dict[str, DoneTotal]
    file: str
    downloaded: int
    total: int
    bytes_per_s: int
    eta_s: float | None


class FileDone(msgspec.Struct):
    file: str | UnsetType = UNSET


class Failed(msgspec.Struct):
    message: str


class Removed(msgspec.Struct):
    files: int
    bytes: int


FeedData = FeedState | Snapshot | DownloadEvent | DownloadState | FileDone | Failed | Removed


class FeedEvent(msgspec.Struct):
    """llama-server's envelope: one per SSE data line."""

    model: str | None
    event: str
    data: FeedData | UnsetType = UNSET  # llama-server leaves it out when there is none


# ---- resumable streams -----------------------------------------------------------------


class LookupEntry(msgspec.Struct):
    conversation_id: str
    is_done: bool
    total_bytes: int
    started_at: int
    completed_at: int
