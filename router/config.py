"""Settings: the TOML config file, built-in defaults, and command-line overrides.

Every key is optional. The file is validated strictly (unknown keys are errors)
so a typo is reported by name instead of being silently ignored.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from protocol.messages import OptionValue
from router.builtin import builtin_sources
from router.keys import (
    Key,
    KeyConfigError,
    KeySection,
    Role,
    digest,
    from_credentials,
    from_sections,
    read_key_file,
)

DEFAULT_PORT = 8080
DEFAULT_MAX_BODY = 16 * 1024 * 1024

Port = Annotated[int, Meta(ge=0, le=65535)]
# "auto" (or no key): a .gguf file is llama_cpp, a folder with config.json and *.safetensors
# is mlx. "scripted" is the fault-injection backend (slow/failing loads, crashes) of the tests.
Backend = Literal["auto", "llama_cpp", "mlx", "scripted"]


class ConfigError(Exception):
    """The configuration is invalid; the message names the key and the problem."""


class ServerSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # One address or several ("::" too); each is bound on `port`.
    host: Annotated[str, Meta(min_length=1)] | Annotated[list[Annotated[str, Meta(min_length=1)]],
                                                          Meta(min_length=1)] = "127.0.0.1"
    port: Port = DEFAULT_PORT
    api_keys: list[Annotated[str, Meta(min_length=1)]] = []  # admin keys (see also [[keys]])
    key_file: str = ""  # more keys, in [[keys]] tables (router.keys); relative to this file
    models_dirs: list[str] = []
    autoload: bool = True
    max_body_bytes: Annotated[int, Meta(ge=1024)] = DEFAULT_MAX_BODY
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    stop_timeout: Annotated[float, Meta(ge=0)] = 10.0
    load_timeout: Annotated[float, Meta(gt=0)] = 600.0
    # Models loading or loaded at once; 0 = no cap. The LRU idle one makes room.
    max_models: Annotated[int, Meta(ge=0)] = 4
    # Seconds a model may sit idle before it is unloaded; 0 = never (per model: `ttl`).
    idle_ttl: Annotated[float, Meta(ge=0)] = 0.0
    # The built-in models (router.builtin) beside this file's: offered by default only when
    # there is no config file; true keeps them, false (or --no-builtin-models) drops them.
    builtin_models: bool | None = None
    # Per model, requests queued or running before a 429 (per model: `max_queue`).
    max_queue: Annotated[int, Meta(ge=1)] = 32
    # Requests waiting for a model to load, over all models, before a 503.
    max_waiting: Annotated[int, Meta(ge=1)] = 256
    # Memory kept free when admitting a model: it loads only if its estimate fits in
    # what the system has available minus this.
    memory_margin_mb: Annotated[int, Meta(ge=0)] = 512
    # Resumable streams (X-Conversation-Id): bytes kept per stream (the oldest go first),
    # seconds a finished stream stays resumable, conversations tracked (LRU), and how long
    # a lookup or delete waits for each worker before answering without it.
    stream_buffer_bytes: Annotated[int, Meta(ge=1024)] = 4 * 1024 * 1024
    stream_memory_mb: Annotated[int, Meta(ge=1)] = 256  # per worker, kept by finished streams
    stream_retention: Annotated[float, Meta(ge=0)] = 300.0
    max_conversations: Annotated[int, Meta(ge=1)] = 100_000
    stream_fanout_timeout: Annotated[float, Meta(gt=0)] = 0.25
    # Flow control: body bytes of one request in flight between a worker and its client. A
    # client reading slower than its model writes slows its own request, no other; the
    # router never holds more than about this much of it.
    stream_window_bytes: Annotated[int, Meta(ge=4096)] = 256 * 1024
    # Workers are pinged this often; one silent for heartbeat_timeout seconds is hung: its
    # requests end with a 503, it is stopped, and the next request starts a fresh one.
    heartbeat_interval: Annotated[float, Meta(gt=0)] = 5.0
    heartbeat_timeout: Annotated[float, Meta(gt=0)] = 30.0
    # Seconds between the comment lines that keep an idle GET /models/sse connection open.
    sse_keepalive: Annotated[float, Meta(gt=0)] = 15.0
    # Where downloaded models go: --cache-dir, else systemd's CACHE_DIRECTORY, else
    # $XDG_CACHE_HOME/modelherd.
    cache_dir: str = ""
    # Plain http:// sources beyond loopback hosts (nothing checks what arrives but sha256).
    allow_insecure_http: bool = False
    # The model a request without `model` goes to; empty: the only model, when there is one.
    default_model: str = ""
    # A built web app (e.g. llama.cpp's tools/ui) served at / from this folder, its files
    # readable without an API key (as llama-server serves its UI); relative to the config file.
    ui_dir: str = ""
    # GET /metrics without an API key (for a Prometheus on a trusted network); else admin keys only.
    metrics_public: bool = False
    # Origins a browser app may call from (CORS). Empty: any http(s)://localhost or 127.0.0.1
    # origin; ["*"]: any origin.
    cors_origins: list[str] = []
    # Responses API answers kept for previous_response_id and GET /v1/responses/{id}.
    max_stored_responses: Annotated[int, Meta(ge=0)] = 10_000
    stored_responses_mb: Annotated[int, Meta(ge=0)] = 64
    # What a client connection may cost before its request reaches a route: a request head
    # (request line and headers) larger than max_header_bytes gets a 431; a connection that has
    # not sent a whole head within header_timeout seconds is closed (with a 408 if it sent part
    # of one). Past max_connections open connections, the one waiting longest for a request
    # head (or idle between requests) is closed to make room; when all are busy, a 503.
    max_header_bytes: Annotated[int, Meta(ge=1024)] = 64 * 1024
    header_timeout: Annotated[float, Meta(gt=0)] = 10.0
    max_connections: Annotated[int, Meta(ge=1)] = 1024


    @property
    def hosts(self) -> list[str]:
        return [self.host] if isinstance(self.host, str) else list(self.host)


class BackendOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Options that may be set in [defaults] and overridden per model."""

    n_ctx: Annotated[int, Meta(ge=0)] | None = None
    n_gpu_layers: int | None = None
    n_threads: Annotated[int, Meta(ge=0)] | None = None
    chat_format: str | None = None
    options: dict[str, OptionValue] = {}


class ModelSection(BackendOptions, forbid_unknown_fields=True, kw_only=True):
    source: Annotated[str, Meta(min_length=1)]  # a local path, hf://... or https://...
    sha256: Annotated[str, Meta(pattern="^[0-9a-fA-F]{64}$")] | None = None  # of a download
    backend: Backend | None = None
    aliases: list[Annotated[str, Meta(min_length=1)]] = []
    tags: list[str] = []  # shown in /models (llama-server's `tags`)
    mmproj: str | None = None
    ttl: Annotated[float, Meta(ge=0)] | None = None  # idle seconds before unload; 0 = never
    pinned: bool = False  # never evicted, never unloaded for idleness
    load_on_startup: bool = False
    max_queue: Annotated[int, Meta(ge=1)] | None = None


class FileConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server: ServerSection = msgspec.field(default_factory=ServerSection)
    defaults: BackendOptions = msgspec.field(default_factory=BackendOptions)
    models: dict[str, ModelSection] = {}
    keys: list[KeySection] = []  # [[keys]]: named keys with a role and, maybe, their models


class Settings(msgspec.Struct, kw_only=True):
    """The effective settings after file + flags; what the daemon runs on."""

    server: ServerSection
    defaults: BackendOptions
    models: dict[str, ModelSection]
    models_dirs: list[Path]
    default_models_dir: bool
    config_dir: Path
    cache_dir: Path
    # Offered without a config file (router.builtin); empty with one or --no-builtin-models.
    builtin_models: dict[str, ModelSection] = {}
    keys: list[Key] = []  # every accepted key, from all its sources
    config_path: Path | None = None  # what a reload reads again
    overrides: dict[str, Any] = {}  # the command line's, applied again on a reload


def default_models_dir(env: dict[str, str] | None = None) -> Path:
    """systemd's StateDirectory when set, else $XDG_DATA_HOME/modelherd/models."""
    env = dict(os.environ) if env is None else env
    state = env.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0]) / "models"
    data = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "modelherd" / "models"


def default_cache_dir(env: dict[str, str] | None = None) -> Path:
    """systemd's CacheDirectory when set, else $XDG_CACHE_HOME/modelherd."""
    env = dict(os.environ) if env is None else env
    cache = env.get("CACHE_DIRECTORY")
    if cache:
        return Path(cache.split(":")[0])
    return Path(env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")) / "modelherd"


def load_file(path: Path) -> FileConfig:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    # Models are checked one by one: msgspec's error path cannot name a dict key.
    models_raw = raw.pop("models", {})
    if not isinstance(models_raw, dict):
        raise ConfigError(f"config file {path}: key models: expected a table of [models.\"name\"]")
    try:
        config = msgspec.convert(raw, FileConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config file {path}: {_readable(str(exc))}") from exc
    models = {}
    for name, section in models_raw.items():
        try:
            models[name] = msgspec.convert(section, ModelSection)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"config file {path}: {_readable(str(exc), f'models.{name}')}") from exc
    return msgspec.structs.replace(config, models=models)


def _readable(message: str, prefix: str = "") -> str:
    # msgspec says "... - at `$.server.port`"; users think in TOML keys.
    text, sep, where = message.rpartition(" - at `$")
    if not sep:
        return f"key {prefix}: {message}" if prefix else message
    key = prefix + where.rstrip("`")
    return f"key {key.lstrip('.')}: {text}"


def build_settings(config_path: Path | None, overrides: dict[str, Any]) -> Settings:
    """Merge the file (if any) with flag overrides; flags win."""
    file = load_file(config_path) if config_path else FileConfig()
    paths_given = ("models_dirs", "cache_dir", "builtin_models", "ui_dir")  # not server keys: used below
    server = msgspec.structs.replace(file.server, **{k: v for k, v in overrides.items()
                                                     if v is not None and k not in paths_given})
    flag_dirs = overrides.get("models_dirs")
    config_dir = config_path.parent.resolve() if config_path else Path.cwd()
    # Paths in the file are relative to the file; paths given as flags, to where you are.
    if flag_dirs:
        paths = [_resolve(Path.cwd(), d) for d in flag_dirs]
    else:
        paths = [_resolve(config_dir, d) for d in server.models_dirs]
    uses_default = not paths
    if uses_default:
        paths = [default_models_dir()]
    try:
        server = msgspec.convert(msgspec.to_builtins(server), ServerSection)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid option: {_readable(str(exc))}") from exc
    if overrides.get("cache_dir"):
        cache_dir = _resolve(Path.cwd(), overrides["cache_dir"])
    elif server.cache_dir:
        cache_dir = _resolve(config_dir, server.cache_dir)
    else:
        cache_dir = default_cache_dir()
    if overrides.get("ui_dir"):
        server = msgspec.structs.replace(server, ui_dir=str(_resolve(Path.cwd(), overrides["ui_dir"])))
    elif server.ui_dir:
        server = msgspec.structs.replace(server, ui_dir=str(_resolve(config_dir, server.ui_dir)))
    builtin: dict[str, ModelSection] = {}
    wanted = overrides.get("builtin_models")
    if wanted is None:
        wanted = server.builtin_models if server.builtin_models is not None else config_path is None
    if wanted:
        builtin = {name: ModelSection(source=source) for name, source in builtin_sources().items()}
    try:
        keys = [Key(f"key-{i}", digest(k), Role.ADMIN, None) for i, k in enumerate(server.api_keys, 1)]
        keys += from_sections(file.keys, f"config file {config_path}")
        if server.key_file:
            keys += read_key_file(_resolve(config_dir, server.key_file))
        keys += from_credentials()
    except KeyConfigError as exc:
        raise ConfigError(str(exc)) from exc
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"config key keys: names must be unique ({', '.join(twice)} twice)")
    return Settings(server=server, defaults=file.defaults, models=file.models, models_dirs=paths,
                    default_models_dir=uses_default, config_dir=config_dir, cache_dir=cache_dir,
                    builtin_models=builtin, keys=keys, config_path=config_path, overrides=dict(overrides))


def _resolve(base: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p)
