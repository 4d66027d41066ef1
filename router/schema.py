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
    stream: bool = False


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


class ModelStatusBody(msgspec.Struct):
    value: str
    failed: bool
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


class ModelBody(msgspec.Struct):
    id: str
    object: str
    created: int
    owned_by: str
    aliases: list[str]
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
    meta: dict[str, Any] | UnsetType = UNSET


class ModelList(msgspec.Struct):
    data: list[ModelBody]
    object: str = "list"


class OpenAIStatus(msgspec.Struct):
    value: str


class OpenAIModel(msgspec.Struct):
    id: str
    created: int
    status: OpenAIStatus
    object: str = "model"
    owned_by: str = "modelherd"


class OpenAIModelList(msgspec.Struct):
    data: list[OpenAIModel]
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


# ---- the event feed (GET /models/sse) -----------------------------------------------


class FeedState(msgspec.Struct):
    """A model's state in a status_change event, and in a snapshot."""

    status: str
    id: str | UnsetType = UNSET  # in a snapshot
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


class LoadStage(msgspec.Struct):
    stage: str
    value: float


class FileDone(msgspec.Struct):
    file: str | UnsetType = UNSET


class Failed(msgspec.Struct):
    message: str


class Removed(msgspec.Struct):
    files: int
    bytes: int


FeedData = FeedState | Snapshot | LoadStage | DownloadState | FileDone | Failed | Removed


class FeedEvent(msgspec.Struct):
    """llama-server's envelope: one per SSE data line."""

    model: str | None
    event: str
    data: FeedData


# ---- resumable streams -----------------------------------------------------------------


class LookupEntry(msgspec.Struct):
    conversation_id: str
    is_done: bool
    total_bytes: int
    started_at: int
    completed_at: int
