"""The quick start on a machine with no route to a model hub: the daemon started with no
config file and no models dir answers with the model the install brought (the `starter`
extra: SmolLM2-135M-Instruct from the package index), and nothing deletes that file."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from router.builtin import SMOLLM2
from tests.daemon import Daemon


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def fresh(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    home = tmp_path_factory.mktemp("fresh-home")
    env = {"HOME": str(home), "XDG_DATA_HOME": str(home / "data"), "XDG_CACHE_HOME": str(home / "cache"),
           "XDG_CONFIG_HOME": str(home / "config"), "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    with Daemon(env=env) as d:  # no --config, no --models-dir: the built-in defaults
        yield d


def test_the_first_request_is_answered_by_the_embedded_model(fresh: Daemon) -> None:
    with openai.OpenAI(base_url=fresh.url + "/v1", api_key="none", max_retries=0, timeout=120) as client:
        ask = "What is the capital of France? Answer in one word."
        r = client.chat.completions.create(model=SMOLLM2.name, max_tokens=24, temperature=0,
                                           messages=[{"role": "user", "content": ask}])
    text = r.choices[0].message.content or ""
    assert "Paris" in text, text


def test_models_says_the_embedded_model_comes_from_its_package(fresh: Daemon) -> None:
    listed = fresh.models()
    assert listed[SMOLLM2.name]["source"] == f"package {SMOLLM2.distribution}"
    # The hub's built-ins are listed too: they download on first use (and fail offline).
    assert "qwen2.5-0.5b-instruct" in listed


def test_delete_and_prune_never_touch_the_embedded_file(fresh: Daemon) -> None:
    path = SMOLLM2.path()
    assert path is not None
    size = path.stat().st_size
    with fresh.client() as c:
        c.post("/models/unload", json={"model": SMOLLM2.name})
        r = c.request("DELETE", "/models", params={"model": SMOLLM2.name})
        assert r.status_code == 400, r.text
        assert "local path" in r.json()["error"]["message"]
        assert c.post("/models/prune").status_code == 200
    assert path.is_file() and path.stat().st_size == size


def test_an_offline_hub_model_fails_with_words_not_a_traceback(fresh: Daemon) -> None:
    with openai.OpenAI(base_url=fresh.url + "/v1", api_key="none", max_retries=0, timeout=120) as client:
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="qwen2.5-0.5b-instruct", max_tokens=4,
                                           messages=[{"role": "user", "content": "hi"}])
    message = err.value.message
    assert "cannot reach" in message and "gaierror" not in message and "URLError" not in message, message
