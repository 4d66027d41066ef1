"""The models a daemon with no config file offers, downloaded on first use: small
instruct models well known to run anywhere. A config file, or --no-builtin-models,
replaces them."""

from __future__ import annotations

import platform
import sys


def builtin_sources() -> dict[str, str]:
    """Each built-in model's name and source."""
    models = {
        # ~400 MB, the default in the README's first request.
        "qwen2.5-0.5b-instruct": "hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf",
        # ~1 GB: noticeably better answers, still fine on a CPU.
        "qwen2.5-1.5b-instruct": "hf://Qwen/Qwen2.5-1.5B-Instruct-GGUF/qwen2.5-1.5b-instruct-q4_k_m.gguf",
    }
    if sys.platform == "darwin" and platform.machine() == "arm64":
        # On Apple Silicon the MLX build of the default model runs on the GPU.
        models["qwen2.5-0.5b-instruct-mlx"] = "hf://mlx-community/Qwen2.5-0.5B-Instruct-4bit"
    return models
