from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from hypothesis import settings

from tests.daemon import Daemon
from tests.realmodels import smollm2_gguf  # noqa: F401  (a fixture: SmolLM2-135M-Instruct)
from tests.tinymodels import write_tiny_gguf, write_tiny_mlx

# A loaded CI machine must not turn a slow example into a failure.
settings.register_profile("modelherd", deadline=None, derandomize=True)
settings.load_profile("modelherd")

# Tests that run once against a GGUF model (llama.cpp) and once against an MLX folder (mlx-lm).
BACKENDS = pytest.mark.parametrize("model", ["tiny-a", "tiny-mlx"])


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models")
    write_tiny_gguf(d / "tiny-a.gguf", seed=1)
    write_tiny_gguf(d / "tiny-b.gguf", seed=2)
    write_tiny_mlx(d / "tiny-mlx", seed=3)  # discovered as an MLX model: a folder of safetensors
    return d


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short path: ipc:// socket paths must stay under ~107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="mh-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def isolated_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Keep the daemon's default dirs out of the real $HOME."""
    root = tmp_path_factory.mktemp("xdg")
    for sub in ("data", "cache"):
        (root / sub).mkdir()
    run = Path(tempfile.mkdtemp(prefix="mh-run-", dir="/tmp"))
    yield {"XDG_DATA_HOME": str(root / "data"), "XDG_CACHE_HOME": str(root / "cache"),
           "XDG_RUNTIME_DIR": str(run)}
    shutil.rmtree(run, ignore_errors=True)


def write_config(path: Path, models_dir: Path, extra: str = "") -> Path:
    path.write_text(f"""
[server]
models_dirs = ["{models_dir}"]

[defaults]
n_ctx = 1024

[models."org/tiny-long"]
source = "{models_dir / 'tiny-b.gguf'}"
aliases = ["long"]
n_ctx = 8192

[models."mlx-long"]
source = "{models_dir / 'tiny-mlx'}"
n_ctx = 8192
{extra}
""")
    return path


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path,
           isolated_env: dict[str, str]) -> Iterator[Daemon]:
    config = write_config(tmp_path_factory.mktemp("cfg") / "modelherd.toml", models_dir)
    with Daemon("--config", str(config), env=isolated_env) as d:
        yield d


@pytest.fixture
def client(daemon: Daemon) -> Iterator[openai.OpenAI]:
    """The official client on the session daemon."""
    with openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c
