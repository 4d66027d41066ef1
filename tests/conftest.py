from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import Daemon
from tests.tinymodels import write_tiny_gguf

# Token ids 0 and 2 are <|endoftext|> and <|im_end|> in the tiny vocabulary: biasing
# them away makes a random model generate exactly max_tokens.
NO_EOS = {"0": -100, "2": -100}


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models")
    write_tiny_gguf(d / "tiny-a.gguf", seed=1)
    write_tiny_gguf(d / "tiny-b.gguf", seed=2)
    return d


@pytest.fixture(scope="session")
def isolated_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Keep the daemon's default dirs out of the real $HOME."""
    root = tmp_path_factory.mktemp("xdg")
    for sub in ("data", "cache", "run"):
        (root / sub).mkdir()
    return {"XDG_DATA_HOME": str(root / "data"), "XDG_CACHE_HOME": str(root / "cache"),
            "XDG_RUNTIME_DIR": str(root / "run")}


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
{extra}
""")
    return path


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path,
           isolated_env: dict[str, str]) -> Iterator[Daemon]:
    config = write_config(tmp_path_factory.mktemp("cfg") / "modelherd.toml", models_dir)
    with Daemon("--config", str(config), env=isolated_env) as d:
        yield d
