"""Every kind of bad input gets an OpenAI-shaped error with the right status, and the
daemon keeps serving afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.daemon import Daemon

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


def assert_error(r: httpx.Response, status: int, *needles: str, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert {"message", "type", "code"} <= set(err)
    assert all(isinstance(err[k], str) and err[k] for k in ("message", "type", "code"))
    for needle in needles:
        assert needle.lower() in err["message"].lower(), err["message"]
    if param is not None:
        assert err.get("param") == param, err


@pytest.fixture(scope="module")
def http(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.client() as c:
        yield c


@pytest.mark.parametrize("path", [CHAT, "/v1/completions", "/v1/embeddings"])
def test_malformed_json(http: httpx.Client, path: str) -> None:
    r = http.post(path, content=b'{"model": "tiny-a", "messages": [',
                  headers={"content-type": "application/json"})
    assert_error(r, 400, "malformed JSON")


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"42", b"null"])
def test_body_not_an_object(http: httpx.Client, body: bytes) -> None:
    assert_error(http.post(CHAT, content=body), 400, "must be a JSON object")


def test_missing_model(http: httpx.Client) -> None:
    assert_error(http.post(CHAT, json={"messages": MSG}), 400, "model", param="model")


def test_model_wrong_type(http: httpx.Client) -> None:
    assert_error(http.post(CHAT, json={"model": 3, "messages": MSG}), 400, "model", param="model")


def test_unknown_model(http: httpx.Client) -> None:
    r = http.post(CHAT, json={"model": "no-such-model", "messages": MSG})
    assert_error(r, 404, "no-such-model", param="model")
    assert r.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", "hot"), ("temperature", 5.0), ("temperature", -1),
    ("top_p", 1.5), ("top_k", -3), ("min_p", 2), ("max_tokens", 0), ("max_tokens", "ten"),
    ("presence_penalty", 3), ("frequency_penalty", -9), ("stop", 12), ("seed", "x"),
    ("messages", "hello"), ("stream", "yes"), ("logit_bias", {"5": True}), ("logit_bias", {"5": 500}),
    ("logit_bias", {str(10**7): 1}), ("logit_bias", [[5]]),
    ("n", 0), ("n", 9),  # 9: more choices than the model has slots
])
def test_wrong_type_or_range_names_the_field(http: httpx.Client, field: str, value: Any) -> None:
    body = {"model": "tiny-a", "messages": MSG, field: value}
    assert_error(http.post(CHAT, json=body), 400, field, param=field)


def test_bad_message_role(http: httpx.Client) -> None:
    r = http.post(CHAT, json={"model": "tiny-a", "messages": [{"role": "wizard", "content": "x"}]})
    assert_error(r, 400, "messages", param="messages")


def test_empty_messages(http: httpx.Client) -> None:
    assert_error(http.post(CHAT, json={"model": "tiny-a", "messages": []}), 400, "messages",
                 param="messages")


def test_prompt_longer_than_context(http: httpx.Client) -> None:
    long = "hello world " * 2000  # far more than the 1024-token context
    r = http.post(CHAT, json={"model": "tiny-a", "messages": [{"role": "user", "content": long}]})
    assert_error(r, 400, "context", param="messages")
    r = http.post("/v1/completions", json={"model": "tiny-a", "prompt": long, "stream": True})
    assert_error(r, 400, "context", param="prompt")
    r = http.post("/v1/embeddings", json={"model": "tiny-a", "input": ["ok", long]})
    assert_error(r, 400, "context", param="input")


def test_bad_grammar_and_schema(http: httpx.Client) -> None:
    r = http.post(CHAT, json={"model": "tiny-a", "messages": MSG, "grammar": "root ::= (("})
    assert_error(r, 400, "grammar", param="grammar")
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    r = http.post(CHAT, json={"model": "tiny-a", "messages": MSG, "response_format": bad_schema})
    assert_error(r, 400, "response_format", param="response_format")
    r = http.post(CHAT, json={"model": "tiny-a", "messages": MSG, "stream": True,
                              "response_format": {"type": "json_schema"}})
    assert_error(r, 400, "schema", param="response_format")


def test_unknown_route_and_method(http: httpx.Client) -> None:
    assert_error(http.get("/v1/nothing-here"), 404, "not found")
    r = http.get(CHAT)
    assert_error(r, 405, "method")
    assert r.headers["allow"] == "POST"


def test_daemon_still_serves_after_bad_input(http: httpx.Client) -> None:
    r = http.post(CHAT, json={"model": "tiny-a", "messages": MSG, "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_body_over_limit(tmp_path: Path, models_dir: Path, isolated_env: dict[str, str]) -> None:
    with Daemon("--models-dir", str(models_dir), "--max-body-bytes", "4096", env=isolated_env) as d, \
            d.client() as c:
        big = {"model": "tiny-a", "messages": [{"role": "user", "content": "x" * 5000}]}
        assert_error(c.post(CHAT, json=big), 413, "limit")

        def chunks() -> Iterator[bytes]:  # no content-length: the limit must hold while reading
            yield b'{"model": "tiny-a", "messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}]}'
        assert_error(c.post(CHAT, content=chunks()), 413, "limit")
        small = {"model": "tiny-a", "messages": MSG, "max_tokens": 1}
        assert c.post(CHAT, json=small).status_code == 200


@pytest.mark.parametrize("depth", [1_000, 100_000])
@pytest.mark.parametrize(("path", "key"), [(CHAT, "messages"), ("/v1/completions", "prompt"),
                                           ("/v1/embeddings", "input"), ("/models/load", "model"),
                                           ("/models/unload", "model"), ("/models/pull", "model"),
                                           ("/v1/streams/lookup", "conversation_ids")])
def test_deeply_nested_json_is_a_400(http: httpx.Client, path: str, key: str, depth: int) -> None:
    body = f'{{"model": "tiny-a", "{key}": ' + "[" * depth + "]" * depth + "}"
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code in (400, 413), r.text  # 413: the management routes' smaller body limit
    assert_error(r, r.status_code)
