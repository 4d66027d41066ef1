"""Which models exist: configured ones plus what the models dirs hold.

Discovery follows llama-server's router mode: every top-level `*.gguf` is a model
named after the file (without `.gguf`); every subfolder holding GGUF files is a
model named after the folder, using the first shard of a split model
(`-00001-of-0000N`) and an `mmproj*` file as the multimodal projector. A
subfolder holding `config.json` and `*.safetensors` is an MLX model, named after
the folder.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import msgspec

from protocol.messages import BACKEND_OPTIONS, Download, WorkerConfig
from protocol.sources import SourceError, cache_path, is_remote, parse
from router.config import BackendOptions, ConfigError, ModelSection, Settings

_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


@dataclass(frozen=True)
class Policy:
    """How the pool treats a model, beyond how to load it."""

    ttl: float = 0.0  # idle seconds before it is unloaded; 0 = never
    pinned: bool = False
    load_on_startup: bool = False
    max_queue: int = 32


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    backend: str
    aliases: tuple[str, ...]
    origin: str  # "config" | "models_dir" | "builtin"
    worker: WorkerConfig
    policy: Policy = Policy()
    tags: tuple[str, ...] = ()


class Catalog:
    def __init__(self, entries: list[ModelEntry]) -> None:
        self._entries: dict[str, ModelEntry] = {}
        self._by_alias: dict[str, str] = {}
        for entry in entries:
            self._entries[entry.name] = entry
        for entry in entries:
            for alias in entry.aliases:
                owner = self._by_alias.get(alias) or (alias if alias in self._entries else None)
                if owner is not None and owner != entry.name:
                    raise ConfigError(
                        f"config key models.{entry.name}.aliases: {alias!r} already names model {owner!r}")
                self._by_alias[alias] = entry.name

    def resolve(self, name: str) -> ModelEntry | None:
        entry = self._entries.get(name)
        if entry is None and name in self._by_alias:
            entry = self._entries[self._by_alias[name]]
        return entry

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


def build_catalog(settings: Settings) -> Catalog:
    any_backend = frozenset().union(*BACKEND_OPTIONS.values())
    unknown = sorted(set(settings.defaults.options) - any_backend)
    if unknown:
        raise ConfigError(f"config key defaults.options: unknown option(s) {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(any_backend))})")
    server = settings.server
    default_policy = Policy(ttl=server.idle_ttl, max_queue=server.max_queue)
    entries: dict[str, ModelEntry] = {}
    for directory in settings.models_dirs:
        for found in discover(directory):
            entries.setdefault(found.name, _entry(found.name, found.path, found.mmproj, "models_dir", (),
                                                  found.backend, settings.defaults, None, default_policy))
    for name, section in settings.builtin_models.items():
        if name not in entries:  # a local model of the same name wins
            entries[name] = _configured(name, section, settings, "builtin")
    for name, section in settings.models.items():
        entries[name] = _configured(name, section, settings, "config")
    _check_startup_set(list(entries.values()), server.max_models)
    return Catalog(list(entries.values()))


def _configured(name: str, section: ModelSection, settings: Settings, origin: str) -> ModelEntry:
    server = settings.server
    download, path, remote_backend = _download(name, section, settings)
    mmproj = Path(section.mmproj).expanduser() if section.mmproj else None
    if section.mmproj and is_remote(section.mmproj):
        if download is None:
            raise ConfigError(f"config key models.{name}.mmproj: a projector is downloaded with its "
                              "model; give a local path, or a remote source for the model too")
        mmproj = _remote_mmproj(name, section.mmproj, download, settings)
        download = msgspec.structs.replace(download, mmproj=section.mmproj)
    elif mmproj is not None and not mmproj.is_absolute():
        mmproj = settings.config_dir / mmproj
    policy = Policy(ttl=server.idle_ttl if section.ttl is None else section.ttl,
                    pinned=section.pinned, load_on_startup=section.load_on_startup,
                    max_queue=section.max_queue or server.max_queue)
    backend: str | None = section.backend
    if backend in (None, "auto"):
        backend = remote_backend if download is not None else detect_backend(path)
    if backend is None:
        raise ConfigError(f"config key models.{name}.backend: cannot tell which backend serves "
                          f"{path} (neither a .gguf file nor a folder with config.json and "
                          "*.safetensors); set backend = \"llama_cpp\" or \"mlx\"")
    entry = _entry(name, path, mmproj, origin, tuple(section.aliases), backend, settings.defaults, section,
                   policy, download)
    return replace(entry, tags=tuple(section.tags))


def _check_startup_set(entries: list[ModelEntry], max_models: int) -> None:
    """Pinned and load_on_startup models all hold a place at once: they must fit the cap."""
    held = sorted(e.name for e in entries if e.policy.pinned or e.policy.load_on_startup)
    if max_models and len(held) > max_models:
        raise ConfigError(f"config key server.max_models: {max_models} is fewer than the "
                          f"{len(held)} pinned or load_on_startup models ({', '.join(held)})")


@dataclass(frozen=True)
class Found:
    """A model discovered in a models dir."""

    name: str
    path: Path  # the GGUF file (its first shard), or the MLX folder
    mmproj: Path | None
    backend: str


def detect_backend(path: Path) -> str | None:
    """llama_cpp for a .gguf file, mlx for a model folder; None when it is neither.

    A source that is not there (yet) is a folder to come unless it is named .gguf: as
    with a missing GGUF file, its load fails and says so, and the daemon still starts."""
    if path.suffix.lower() == ".gguf":
        return "llama_cpp"
    if _is_mlx_folder(path) or not path.exists():
        return "mlx"
    return None


def _remote_mmproj(name: str, source: str, download: Download, settings: Settings) -> Path:
    """Where a projector's download lands (in the model's repo folder when from the same repo)."""
    try:
        remote = parse(source, settings.server.allow_insecure_http)
    except SourceError as exc:
        raise ConfigError(f"config key models.{name}.mmproj: {exc}") from None
    if remote.is_folder:
        raise ConfigError(f"config key models.{name}.mmproj: name the projector's file, not a repo")
    return Path(cache_path(download.cache_dir, remote))


def _download(name: str, section: ModelSection,
              settings: Settings) -> tuple[Download | None, Path, str | None]:
    """What to fetch, if the source is remote; where the model's files are (will be); and
    the backend a download's name implies (a repo folder is MLX, a *.gguf file llama_cpp)."""
    if not is_remote(section.source):
        if section.sha256 is not None:
            raise ConfigError(f"config key models.{name}.sha256: only checked on downloads; "
                              f"{section.source!r} is a local path")
        path = Path(section.source).expanduser()
        return None, path if path.is_absolute() else settings.config_dir / path, None
    try:
        remote = parse(section.source, settings.server.allow_insecure_http)
    except SourceError as exc:
        raise ConfigError(f"config key models.{name}.source: {exc}") from None
    if remote.is_folder:  # an MLX folder: many files, no one checksum
        if section.sha256 is not None:
            raise ConfigError(f"config key models.{name}.sha256: a whole repo has no one checksum")
        if section.backend not in (None, "auto", "mlx"):
            raise ConfigError(f"config key models.{name}.backend: {section.backend!r} cannot serve "
                              f"a repo folder ({remote.text}); name the .gguf file in it")
    sha256 = section.sha256.lower() if section.sha256 else None
    download = Download(section.source, str(settings.cache_dir), sha256, settings.server.allow_insecure_http)
    path = Path(cache_path(download.cache_dir, remote))
    backend = "mlx" if remote.is_folder else ("llama_cpp" if path.suffix.lower() == ".gguf" else None)
    return download, path, backend


def discover(directory: Path) -> list[Found]:
    """Each model in `directory`, sorted by name."""
    if not directory.is_dir():
        return []
    found: list[Found] = []
    for child in sorted(directory.iterdir()):
        if child.is_file() and child.suffix.lower() == ".gguf":
            if _is_projector(child) or _is_later_shard(child):
                continue
            found.append(Found(child.name[: -len(".gguf")], child, None, "llama_cpp"))
        elif child.is_dir():
            # GGUF files win over safetensors in the same folder, as before MLX was served
            # (Hugging Face repos often hold both).
            ggufs = sorted(p for p in child.iterdir() if p.is_file() and p.suffix.lower() == ".gguf")
            models = [p for p in ggufs if not _is_projector(p) and not _is_later_shard(p)]
            projectors = [p for p in ggufs if _is_projector(p)]
            if models:
                found.append(Found(child.name, models[0], projectors[0] if projectors else None,
                                   "llama_cpp"))
            elif _is_mlx_folder(child):
                found.append(Found(child.name, child, None, "mlx"))
    return found


def _is_mlx_folder(path: Path) -> bool:
    return (path.is_dir() and (path / "config.json").is_file()
            and any(p.is_file() for p in path.glob("*.safetensors")))


def _is_projector(path: Path) -> bool:
    return path.name.lower().startswith("mmproj")


def _is_later_shard(path: Path) -> bool:
    m = _SHARD.search(path.name)
    return m is not None and int(m.group(1)) != 1


def _entry(name: str, path: Path, mmproj: Path | None, origin: str, aliases: tuple[str, ...],
           backend: str, defaults: BackendOptions, own: ModelSection | None,
           policy: Policy, download: Download | None = None) -> ModelEntry:
    def pick(field: str) -> object:
        value = getattr(own, field, None) if own is not None else None
        return getattr(defaults, field) if value is None else value

    known = BACKEND_OPTIONS.get(backend, frozenset())
    # [defaults] options reach the models whose backend has them (GGUF and MLX models mix).
    options = {k: v for k, v in defaults.options.items() if k in known}
    if own is not None:
        unknown = sorted(set(own.options) - known)
        if unknown:
            raise ConfigError(f"config key models.{name}.options: unknown {backend} option(s) "
                              f"{', '.join(unknown)} (known: {', '.join(sorted(known))})")
        options.update(own.options)
        if backend == "mlx":
            # llama.cpp settings an MLX model would silently ignore.
            for key, why in (("chat_format", "it uses its tokenizer's chat template"),
                             ("mmproj", "it has no multimodal projector"),
                             ("n_gpu_layers", 'it runs on the GPU unless options.device = "cpu"')):
                if getattr(own, key) is not None:
                    raise ConfigError(f"config key models.{name}.{key}: a llama_cpp setting, "
                                      f"not for an mlx model ({why})")
    n_ctx = pick("n_ctx")
    llama = backend != "mlx"  # [defaults]' llama.cpp settings do not reach MLX models
    worker = WorkerConfig(
        name=name,
        path=str(path),
        backend=backend,
        n_ctx=int(n_ctx or 0),  # type: ignore[call-overload]
        n_gpu_layers=int(pick("n_gpu_layers") or 0) if llama else 0,  # type: ignore[call-overload]
        n_threads=int(pick("n_threads") or 0) if llama else 0,  # type: ignore[call-overload]
        chat_format=pick("chat_format") if llama else None,  # type: ignore[arg-type]
        mmproj=str(mmproj) if mmproj else None,
        options=options,
        download=download,
    )
    return ModelEntry(name, path, worker.backend, aliases, origin, worker, policy)
