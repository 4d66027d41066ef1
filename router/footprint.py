"""How much memory a model will take, and how much the machine has free.

The estimate is read from the files before any worker starts: the weights are the
file sizes (every shard, plus a projector), the KV cache follows from the GGUF
header (layers x context x KV heads x head size x element size), and each worker
process carries a fixed overhead (Python, llama.cpp, ZeroMQ). Free memory is what
psutil reports available, capped by the cgroup's limit when systemd set one.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import BinaryIO

import psutil

from protocol.messages import AUTO_N_CTX_CAP, DEFAULT_CACHE_RAM_MB, DEFAULT_PARALLEL, WorkerConfig
from router.admission import MIB, Estimate

# Measured: a llama.cpp worker serving a 0.5 MB model with n_ctx 512 has an RSS of
# 51 MiB (llama-cpp-python 0.3.36, CPython 3.11, x86-64); rounded up for compute buffers.
# An mlx-lm worker, which imports transformers for the tokenizer: 84 MiB (mlx 0.32.4).
WORKER_OVERHEAD = {"llama_cpp": 64 * MIB, "mlx": 96 * MIB}
DEFAULT_OVERHEAD = 64 * MIB
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

# Bytes per element of the KV cache by ggml type id (llama-cpp-python's type_k/type_v).
_KV_TYPE_BYTES = {0: 4.0, 1: 2.0, 2: 18 / 32, 3: 20 / 32, 6: 22 / 32, 7: 24 / 32, 8: 34 / 32, 30: 2.0}
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


def estimate(config: WorkerConfig) -> Estimate:
    """Blocking (reads a file header): call it off the event loop."""
    path = Path(config.path)
    overhead = WORKER_OVERHEAD.get(config.backend, DEFAULT_OVERHEAD)
    parallel = max(1, _int_option(config, "parallel", DEFAULT_PARALLEL))
    cache = max(0, _int_option(config, "cache_ram_mb", DEFAULT_CACHE_RAM_MB)) * MIB
    if config.backend == "mlx":
        return Estimate(sum(_size(p) for p in path.glob("*.safetensors")),
                        parallel * _mlx_kv_bytes(path, config), overhead, cache)
    weights = sum(_size(p) for p in model_files(path))
    if config.mmproj:
        weights += _size(Path(config.mmproj))
    kv = 0
    if path.suffix.lower() == ".gguf":
        try:
            kv = parallel * _kv_bytes(read_gguf_numbers(path), config)
        except (OSError, ValueError, OverflowError, MemoryError, struct.error):
            kv = 0  # unreadable header: the worker's load will say why
    return Estimate(weights, kv, overhead, cache if config.backend == "llama_cpp" else 0)


def model_files(path: Path) -> list[Path]:
    """The file itself, or every shard of a split GGUF given its first shard."""
    m = _SHARD.search(path.name)
    if not m:
        return [path]
    stem = path.name[: m.start()]
    return [path.with_name(f"{stem}-{i:05d}-of-{m.group(2)}.gguf") for i in range(1, int(m.group(2)) + 1)]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _kv_bytes(meta: dict[str, int | str | list[int]], config: WorkerConfig) -> int:
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        return 0

    def num(key: str, default: int = 0) -> int:
        value = meta.get(f"{arch}.{key}", default)
        if isinstance(value, list):  # per-layer counts (some architectures): the largest
            return max(value, default=default)
        return value if isinstance(value, int) else default

    layers, heads, embd = num("block_count"), num("attention.head_count"), num("embedding_length")
    if not (layers and heads and embd):
        return 0
    heads_kv = num("attention.head_count_kv", heads)
    key_len = num("attention.key_length", embd // heads)
    value_len = num("attention.value_length", embd // heads)
    trained = num("context_length")
    n_ctx = config.n_ctx or (min(AUTO_N_CTX_CAP, trained) if trained else AUTO_N_CTX_CAP)
    k_bytes = _KV_TYPE_BYTES.get(_int_option(config, "type_k", 1), 2.0)
    v_bytes = _KV_TYPE_BYTES.get(_int_option(config, "type_v", 1), 2.0)
    return int(layers * n_ctx * heads_kv * (key_len * k_bytes + value_len * v_bytes))


def _mlx_kv_bytes(folder: Path, config: WorkerConfig) -> int:
    """From config.json; the KV cache grows as needed, up to n_ctx in each of its caches."""
    try:
        meta = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return 0  # the worker's load will say what is wrong
    if not isinstance(meta, dict):
        return 0
    meta = meta.get("text_config", meta)  # multimodal configs nest the language model's
    try:
        layers, heads = int(meta["num_hidden_layers"]), int(meta["num_attention_heads"])
        head_dim = int(meta.get("head_dim") or int(meta["hidden_size"]) // heads)
        heads_kv = int(meta.get("num_key_value_heads") or heads)
        trained = int(meta.get("max_position_embeddings") or 0)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 0
    n_ctx = config.n_ctx or (min(AUTO_N_CTX_CAP, trained) if trained else AUTO_N_CTX_CAP)
    elem = _DTYPE_BYTES.get(str(meta.get("torch_dtype") or meta.get("dtype") or ""), 2)
    return layers * n_ctx * heads_kv * head_dim * 2 * elem  # one slot's


def _int_option(config: WorkerConfig, name: str, default: int) -> int:
    value = config.options.get(name, default)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


# ---- GGUF header ------------------------------------------------------------------

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_gguf_numbers(path: Path) -> dict[str, int | str | list[int]]:
    """The header's integer and string keys (integer arrays too); other values skipped."""
    with path.open("rb") as f:
        magic, version = struct.unpack("<4sI", f.read(8))
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"{path.name} is not a GGUF v2+ file")
        _tensors, count = struct.unpack("<QQ", f.read(16))
        out: dict[str, int | str | list[int]] = {}
        for _ in range(count):
            key = _string(f)
            kind = struct.unpack("<I", f.read(4))[0]
            value = _value(f, kind)
            if value is not None:
                out[key] = value
        return out


_MAX_STRING = 1 << 24  # a chat template is the longest string a header holds: far below this
_MAX_ITEMS = 1 << 24


def _string(f: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", f.read(8))
    if length > _MAX_STRING:
        raise ValueError(f"GGUF string of {length} bytes: not a sane header")
    return f.read(length).decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int) -> int | str | list[int] | None:
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        item, count = struct.unpack("<IQ", f.read(12))
        if count > _MAX_ITEMS:
            raise ValueError(f"GGUF array of {count} items: not a sane header")
        if item == _STRING:
            for _ in range(count):  # a vocabulary: skip it string by string
                f.seek(struct.unpack("<Q", f.read(8))[0], os.SEEK_CUR)
            return None
        if item not in _SCALARS:
            raise ValueError(f"unsupported GGUF array of type {item}")
        fmt = _SCALARS[item]
        if fmt in "fd?":
            f.seek(struct.calcsize(fmt) * count, os.SEEK_CUR)
            return None
        return list(struct.unpack(f"<{count}{fmt}", f.read(struct.calcsize(fmt) * count)))
    if kind not in _SCALARS:
        raise ValueError(f"unsupported GGUF value type {kind}")
    fmt = _SCALARS[kind]
    (value,) = struct.unpack(f"<{fmt}", f.read(struct.calcsize(fmt)))
    return int(value) if fmt not in "fd" else None


# ---- the machine ------------------------------------------------------------------


class SystemMemory:
    """Free memory and process sizes as psutil (and the cgroup) see them."""

    def __init__(self, cgroup_root: Path = Path("/sys/fs/cgroup"),
                 own_cgroup: Path = Path("/proc/self/cgroup")) -> None:
        self._limit_files = _cgroup_files(cgroup_root, own_cgroup)

    def available(self) -> int:
        free = int(psutil.virtual_memory().available)
        if self._limit_files is not None:
            limit, current = (_read_int(p) for p in self._limit_files)
            if limit is not None and current is not None:
                free = min(free, max(0, limit - current))
        return free

    def rss(self, pid: int) -> int | None:
        try:
            return int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            return None


def _cgroup_files(root: Path, own_cgroup: Path) -> tuple[Path, Path] | None:
    """cgroup v2 memory.max / memory.current for this process (systemd's MemoryMax=)."""
    try:
        line = next(ln for ln in own_cgroup.read_text().splitlines() if ln.startswith("0::"))
    except (OSError, StopIteration):
        return None
    group = root / line[3:].lstrip("/")
    files = (group / "memory.max", group / "memory.current")
    return files if all(p.is_file() for p in files) else None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" means no limit
