"""Memory estimates from GGUF headers and MLX configs, and free memory as the cgroup limits it."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import gguf
import psutil
import pytest

from protocol.messages import DEFAULT_CACHE_RAM_MB, DEFAULT_PARALLEL, WorkerConfig
from router.admission import MIB
from router.footprint import WORKER_OVERHEAD, SystemMemory, estimate, read_gguf_numbers
from tests.tinymodels import TinyShape

SHAPE = TinyShape()
HEAD_DIM = SHAPE.n_embd // SHAPE.n_head


def test_header_reader_agrees_with_the_gguf_package(models_dir: Path) -> None:
    path = models_dir / "tiny-a.gguf"
    ours = read_gguf_numbers(path)
    reader = gguf.GGUFReader(path)
    for key in ("llama.block_count", "llama.context_length", "llama.embedding_length",
                "llama.attention.head_count", "llama.attention.head_count_kv"):
        field = reader.fields[key]
        assert ours[key] == int(field.parts[field.data[0]][0]), key
    assert ours["general.architecture"] == "llama"


def test_estimate_is_weights_plus_kv_cache_plus_process(models_dir: Path) -> None:
    path = models_dir / "tiny-a.gguf"
    one_slot = {"parallel": 1}
    est = estimate(WorkerConfig("a", str(path), n_ctx=1024, options=one_slot))
    kv_f16 = SHAPE.n_layer * 1024 * SHAPE.n_head_kv * 2 * HEAD_DIM * 2
    assert (est.weights, est.kv_cache, est.overhead, est.prompt_cache) == (
        path.stat().st_size, kv_f16, WORKER_OVERHEAD["llama_cpp"], DEFAULT_CACHE_RAM_MB * MIB)
    # Every slot has its n_ctx of KV cache; the RAM cache's bound counts as configured.
    four = estimate(WorkerConfig("a", str(path), n_ctx=1024, options={"parallel": 4, "cache_ram_mb": 10}))
    assert (four.kv_cache, four.prompt_cache) == (4 * kv_f16, 10 * MIB)
    assert four.total == four.weights + four.kv_cache + four.overhead + four.prompt_cache
    # n_ctx 0 is the trained context (capped), as the worker loads it.
    auto = estimate(WorkerConfig("a", str(path), options=one_slot))
    assert auto.kv_cache == kv_f16 * SHAPE.n_ctx_train // 1024
    # A q8_0 cache (ggml type 8) takes 34 bytes per 32 elements instead of 64.
    q8 = estimate(WorkerConfig("a", str(path), n_ctx=1024, options={"type_k": 8, "type_v": 8, **one_slot}))
    assert q8.kv_cache == kv_f16 * 34 // 64


def test_split_models_and_projectors_count_every_file(models_dir: Path, tmp_path: Path) -> None:
    src = models_dir / "tiny-a.gguf"
    for i in (1, 2, 3):
        shutil.copy(src, tmp_path / f"m-{i:05d}-of-00003.gguf")
    (tmp_path / "mmproj.gguf").write_bytes(b"x" * 1000)
    est = estimate(WorkerConfig("m", str(tmp_path / "m-00001-of-00003.gguf"),
                                mmproj=str(tmp_path / "mmproj.gguf")))
    assert est.weights == 3 * src.stat().st_size + 1000


def test_an_mlx_folder_counts_its_safetensors_and_a_kv_cache_per_slot(models_dir: Path) -> None:
    folder = models_dir / "tiny-mlx"
    est = estimate(WorkerConfig("m", str(folder), backend="mlx", n_ctx=1024))
    kv_f32 = SHAPE.n_layer * 1024 * SHAPE.n_head_kv * HEAD_DIM * 2 * 4  # the tiny folder is float32
    assert (est.weights, est.kv_cache, est.overhead, est.prompt_cache) == (
        (folder / "model.safetensors").stat().st_size, DEFAULT_PARALLEL * kv_f32, WORKER_OVERHEAD["mlx"],
        DEFAULT_CACHE_RAM_MB * MIB)
    fewer = estimate(WorkerConfig("m", str(folder), backend="mlx", n_ctx=1024, options={"parallel": 1}))
    assert fewer.kv_cache == kv_f32


@pytest.mark.parametrize(("text", "nested", "per_token"), [
    # per token: layers x KV heads x head size x (K and V) x element size
    ({"num_hidden_layers": 4, "num_attention_heads": 8, "hidden_size": 256}, False, 4 * 8 * 32 * 2 * 2),
    ({"num_hidden_layers": 4, "num_attention_heads": 8, "hidden_size": 256, "num_key_value_heads": 2,
      "head_dim": 64, "dtype": "float32"}, False, 4 * 2 * 64 * 2 * 4),
    # A multimodal config nests the language model's.
    ({"num_hidden_layers": 3, "num_attention_heads": 4, "hidden_size": 64, "torch_dtype": "bfloat16"},
     True, 3 * 4 * 16 * 2 * 2),
])
def test_the_mlx_estimate_reads_what_config_json_says(tmp_path: Path, text: dict[str, object], nested: bool,
                                                      per_token: int) -> None:
    def estimate_with(n_ctx: int, **more: object) -> int:
        fields = {**text, **more}
        (tmp_path / "config.json").write_text(json.dumps({"text_config": fields} if nested else fields))
        two_slots = {"parallel": 2}
        config = WorkerConfig("m", str(tmp_path), backend="mlx", n_ctx=n_ctx, options=two_slots)
        return estimate(config).kv_cache

    assert estimate_with(100) == 2 * 100 * per_token
    # n_ctx 0: the trained context, capped as the worker caps it.
    assert estimate_with(0, max_position_embeddings=1000) == 2 * 1000 * per_token
    assert estimate_with(0, max_position_embeddings=100_000) == 2 * 4096 * per_token


def test_a_file_that_is_not_gguf_still_gets_an_estimate(tmp_path: Path) -> None:
    (tmp_path / "bad.gguf").write_bytes(b"nonsense" * 10)
    est = estimate(WorkerConfig("bad", str(tmp_path / "bad.gguf")))
    assert (est.weights, est.kv_cache) == (80, 0)


def test_the_cgroup_limit_caps_available_memory(tmp_path: Path) -> None:
    group = tmp_path / "system.slice" / "modelherd.service"
    group.mkdir(parents=True)
    own = tmp_path / "cgroup"
    own.write_text("0::/system.slice/modelherd.service\n")
    (group / "memory.max").write_text("1073741824\n")
    (group / "memory.current").write_text("268435456\n")
    assert SystemMemory(tmp_path, own).available() == 768 * 1024 * 1024
    (group / "memory.max").write_text("max\n")  # no limit: the system's figure stands
    system = psutil.virtual_memory().available
    assert abs(SystemMemory(tmp_path, own).available() - system) < 256 * 1024 * 1024


def test_an_absurd_header_is_refused_without_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "evil.gguf"
    # One key whose name claims to be 2**62 bytes long.
    path.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**62) + b"x" * 64)
    with pytest.raises(ValueError, match="not a sane header"):
        read_gguf_numbers(path)
    assert estimate(WorkerConfig("evil", str(path))).kv_cache == 0
