"""A bounded schemathesis pass over the OpenAI routes, from OpenAI's own OpenAPI spec
(tests/data/openapi/openai-subset.yaml, a trimmed copy: its header says where it came from),
against the real daemon with the tiny generated models.

For each operation, requests that fit the spec (positive) and requests that do not
(negative): none may get a 5xx, and every 4xx must be the OpenAI error body in JSON. The
spec's `model` is any string, which the router would answer with a 404 before any worker
saw the request; so most generated requests name a loaded model instead (a GGUF one and
an MLX one), and reach the worker's own validation. Generation is bounded (examples per
operation and mode, derandomized, no deadline) and so are the requests' costs: large
`max_tokens` and `n` are cut down, as a random model generates until its limit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core import NotSet
from schemathesis.core.transport import Response

from tests.daemon import Daemon

SPEC = Path(__file__).parent / "data" / "openapi" / "openai-subset.yaml"
SCHEMA = schemathesis.openapi.from_path(SPEC)
OPERATIONS = [("POST", "/chat/completions"), ("POST", "/completions"), ("POST", "/embeddings"),
              ("GET", "/models/{model}"), ("GET", "/models")]
EXAMPLES = 25  # per operation and mode: all of this file's tests take about a minute
MODELS = ["tiny-a", "tiny-mlx", None]  # None: the generated name, which no model has
CAPS = {"max_tokens": 8, "max_completion_tokens": 8, "n": 2, "top_logprobs": 3}


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory: pytest.TempPathFactory, models_dir: Path,
                isolated_env: dict[str, str]) -> Iterator[Daemon]:
    config = tmp_path_factory.mktemp("fuzz") / "c.toml"
    config.write_text(f'[server]\nmodels_dirs = ["{models_dir}"]\n\n[defaults]\nn_ctx = 256\n')
    with Daemon("--config", str(config), env=isolated_env) as d:
        for model in MODELS[:-1]:
            d.load(model)  # loaded before the clock of any example starts
        yield d


def bounded(body: Any, model: str | None) -> Any:
    """The generated body, naming `model` and with what it costs to answer capped."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    if model is not None:
        body["model"] = model
    for key, cap in CAPS.items():
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            body[key] = cap
    return body


def check_error_body(response: Response) -> None:
    content_type = response.headers.get("content-type", [""])[0]  # a list per header name
    assert content_type.startswith("application/json"), response.headers
    body = json.loads(response.content)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert all(isinstance(error.get(k), str) and error[k] for k in ("message", "type", "code")), error


# Negative cases need an input that can be wrong: a GET here takes only a path segment, which
# any string fits, so GETs are fuzzed with positive cases only.
CASES = [(m, p, mode) for m, p in OPERATIONS for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if not (m == "GET" and mode is GenerationMode.NEGATIVE)]


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p}-{mode}" for m, p, mode in CASES])
def test_no_5xx_and_every_4xx_is_an_openai_error(fuzz_daemon: Daemon, method: str, path: str,
                                                 mode: GenerationMode) -> None:
    operation = SCHEMA[path][method]
    session = requests.Session()

    @given(case=operation.as_strategy(generation_mode=mode), model=st.sampled_from(MODELS))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])
    def one(case: Any, model: str | None) -> None:
        if not isinstance(case.body, NotSet):
            case.body = bounded(case.body, model)
        if "model" in (case.path_parameters or {}) and model is not None:
            case.path_parameters["model"] = model
        response = case.call(base_url=fuzz_daemon.url + "/v1", session=session, timeout=60)
        sent = f"{case.method} {case.formatted_path} {json.dumps(case.body, default=repr)[:2000]}"
        answer = response.content[:2000].decode(errors="replace")
        assert response.status_code < 500, f"{sent}\n-> {response.status_code} {answer}"
        if response.status_code >= 400:
            check_error_body(response)

    try:
        one()
    finally:
        session.close()


# Found by this pass with more examples (200 per operation and mode): a token-id prompt with
# `suffix` reached the backend's detokenizer before the ids were checked, and llama.cpp
# aborted the worker (a 502).
def test_a_token_prompt_with_a_suffix_is_a_400_not_a_dead_worker(fuzz_daemon: Daemon) -> None:
    with fuzz_daemon.client() as c:
        for prompt in ([-1], [999999]):
            r = c.post("/v1/completions", json={"model": "tiny-a", "prompt": prompt, "suffix": "0"})
            assert r.status_code == 400, r.text
            assert "not a token id" in r.json()["error"]["message"]
        r = c.post("/completion", json={"model": "tiny-a", "prompt": [5, 999999]})
        assert r.status_code == 400, r.text
