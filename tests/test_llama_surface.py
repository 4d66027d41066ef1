"""llama-server's router surface and OpenAI's details, against the real daemon: /props,
tokenizer routes, un-prefixed OpenAI routes, CORS, timings, llama-server's error types,
the default model, normalised embeddings, native /completion, logprobs, n > 1, seeds."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.daemon import NO_EOS, Daemon

MSG = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, models_dir: Path,
           isolated_env: dict[str, str]) -> Iterator[Daemon]:
    """A daemon with exactly one model: requests without `model` go to it."""
    config = tmp_path_factory.mktemp("single") / "c.toml"
    config.write_text(f'[server]\nmodels_dirs = []\napi_keys = ["sk-test-key"]\n\n'
                      f'[models.only]\nsource = "{models_dir / "tiny-a.gguf"}"\nn_ctx = 256\n'
                      'options = { n_batch = 16 }\n')  # a prompt is read over several steps
    with Daemon("--config", str(config), env=isolated_env) as d:
        yield d


def auth(d: Daemon) -> httpx.Client:
    return httpx.Client(base_url=d.url, timeout=60, headers={"Authorization": "Bearer sk-test-key"})


def test_props_as_llama_servers_router_and_its_models(daemon: Daemon) -> None:
    with daemon.client() as c:
        router = c.get("/props").json()
        assert router["role"] == "router" and router["models_autoload"] is True
        assert router["max_instances"] == 4 and "default_generation_settings" in router
        # The web UI asks with autoload=false: a model not loaded is not loaded for it.
        c.post("/models/unload", json={"model": "tiny-b"})
        r = c.get("/props", params={"model": "tiny-b", "autoload": "false"})
        assert r.status_code == 400 and "not loaded" in r.json()["error"]["message"]
        props = c.get("/props", params={"model": "tiny-b", "autoload": "true"}).json()
    assert "role" not in props  # a model's own /props, as a llama-server child answers
    assert props["default_generation_settings"]["n_ctx"] == 1024
    assert props["total_slots"] >= 1 and props["model_alias"] == "tiny-b"
    assert props["modalities"] == {"vision": False, "video": False, "audio": False}
    assert "<|im_start|>" in props["chat_template"]


def test_tokenize_detokenize_and_apply_template(daemon: Daemon) -> None:
    with daemon.client() as c:
        tokens = c.post("/tokenize", json={"model": "tiny-a", "content": "hello world"}).json()["tokens"]
        assert tokens and all(isinstance(t, int) for t in tokens)
        pieces = c.post("/tokenize", json={"model": "tiny-a", "content": "hello world",
                                           "with_pieces": True}).json()["tokens"]
        assert [p["id"] for p in pieces] == tokens
        text = c.post("/detokenize", json={"model": "tiny-a", "tokens": tokens}).json()["content"]
        assert text == "hello world"
        prompt = c.post("/apply-template", json={"model": "tiny-a", "messages": MSG}).json()["prompt"]
        assert prompt.endswith("<|im_start|>assistant\n") and "Hello there" in prompt
        bad = c.post("/detokenize", json={"model": "tiny-a", "tokens": [10**9]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_openai_routes_without_v1_and_models_retrieve(daemon: Daemon, client: openai.OpenAI) -> None:
    with daemon.client() as c:
        r = c.post("/chat/completions", json={"model": "tiny-a", "messages": MSG, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["object"] == "chat.completion"
        assert c.get("/v1/health").json() == {"status": "ok"}
    model = client.models.retrieve("org/tiny-long")  # slashes in ids
    assert model.id == "org/tiny-long"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_timings_on_answers_and_on_the_last_stream_chunk(daemon: Daemon) -> None:
    body = {"model": "tiny-a", "messages": MSG, "max_tokens": 5}
    with daemon.client() as c:
        whole = c.post("/v1/chat/completions", json=body).json()
        t = whole["timings"]
        assert t["predicted_n"] == whole["usage"]["completion_tokens"]
        assert t["prompt_n"] + t["cache_n"] == whole["usage"]["prompt_tokens"]
        assert t["prompt_ms"] >= 0 and t["predicted_ms"] > 0 and whole["system_fingerprint"]
        lines = [ln for ln in c.post("/v1/chat/completions", json={**body, "stream": True}).text.split("\n")
                 if ln.startswith("data: {")]
    chunks = [json.loads(ln[6:]) for ln in lines]
    assert "timings" in chunks[-1] and all("timings" not in ch for ch in chunks[:-1])
    first = chunks[0]["choices"][0]["delta"]
    assert first == {"role": "assistant", "content": None}  # no empty content delta
    assert all(ch["choices"][0]["delta"].get("content") != "" for ch in chunks)


def test_a_prompt_over_the_context_is_llama_servers_exceed_context_size_error(daemon: Daemon) -> None:
    long = "hello world " * 2000
    with daemon.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "tiny-a", "messages": [{"role": "user",
                                                                                   "content": long}]})
    error = r.json()["error"]
    assert r.status_code == 400 and error["type"] == "exceed_context_size_error"
    assert error["n_ctx"] == 1024 and error["n_prompt_tokens"] > 1024


def test_a_request_without_model_goes_to_the_only_one_and_needs_one_when_there_are_more(
        single: Daemon, daemon: Daemon) -> None:
    with auth(single) as c:
        r = c.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "only"
        r = c.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "only"
    with daemon.client() as c:
        for path, body in [("/v1/chat/completions", {"messages": MSG, "max_tokens": 2}),
                           ("/v1/responses", {"input": "hi", "max_output_tokens": 2})]:
            r = c.post(path, json=body)
            assert r.status_code == 400 and "model name is missing" in r.json()["error"]["message"], path


def test_cors_preflight_needs_no_key_and_answers_carry_the_origin(single: Daemon) -> None:
    origin = "http://localhost:5173"
    with httpx.Client(base_url=single.url, timeout=30) as c:
        pre = c.options("/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert pre.status_code == 200 and pre.content == b""  # no key on a preflight: browsers send none
        assert pre.headers["access-control-allow-origin"] == origin
        assert pre.headers["access-control-allow-credentials"] == "true"
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert pre.headers["access-control-allow-headers"] == "authorization, content-type"
        denied = c.get("/v1/models", headers={"Origin": origin})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == origin
        foreign = c.options("/v1/models", headers={"Origin": "https://evil.example",
                                                    "Access-Control-Request-Method": "GET"})
        assert foreign.status_code == 200  # answered, as llama-server does, but not allowed:
        assert "access-control-allow-origin" not in foreign.headers  # not a local origin
    with auth(single) as c:
        ok = c.get("/v1/models", headers={"Origin": origin})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == origin


def test_disabled_features_answer_llama_servers_403(single: Daemon) -> None:
    with auth(single) as c:
        for method, path in [("GET", "/tools"), ("POST", "/tools"), ("GET", "/cors-proxy"),
                             ("POST", "/cors-proxy")]:
            r = c.request(method, path)
            assert r.status_code == 403 and r.json()["error"]["type"] == "feature_disabled", path


def test_logit_bias_as_llama_server_reads_it(daemon: Daemon) -> None:
    """Token ids or text (each of its tokens), as an object or [key, bias] pairs; false bans."""
    def tokens(bias: object) -> list[int]:
        with daemon.client() as c:
            r = c.post("/completion", json={"model": "tiny-a", "prompt": "hello", "n_predict": 6,
                                            "temperature": 0, "return_tokens": True, "logit_bias": bias})
        assert r.status_code == 200 and r.json()["tokens"], r.text
        return list(r.json()["tokens"])

    with daemon.client() as c:
        word = c.post("/tokenize", json={"model": "tiny-a", "content": " world"}).json()["tokens"]
    for forced in ({" world": 100}, [[" world", 100]], {str(word[0]): 100}, [[word[0], 100]]):
        assert set(tokens(forced)) <= set(word), forced
    plain = tokens(NO_EOS)
    banned = tokens({**NO_EOS, str(plain[0]): False})
    assert banned[0] != plain[0] and plain[0] not in banned


def progress_of(d: Daemon, path: str, body: dict[str, object]) -> tuple[list[dict[str, int]], list[Any]]:
    with auth(d) as c, c.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    return [e["prompt_progress"] for e in events if "prompt_progress" in e], events


def test_return_progress_reports_the_prompt_as_it_is_read(single: Daemon) -> None:
    """llama-server's return_progress, which its web UI asks for on every stream."""
    messages = [{"role": "user", "content": "Progress, reported batch by batch. " * 8}]
    body = {"messages": messages, "max_tokens": 4, "stream": True, "return_progress": True}
    first, events = progress_of(single, "/v1/chat/completions", body)
    assert len(first) >= 3, first  # at admission, then after each of several batches of 16
    assert first[0]["processed"] == first[0]["cache"]
    assert all(p["total"] == first[0]["total"] and p["cache"] == first[0]["cache"] for p in first)
    assert all(b["processed"] > a["processed"] for a, b in itertools.pairwise(first))
    assert first[-1]["processed"] == first[-1]["total"]
    shown = [e for e in events if "prompt_progress" in e]
    assert all(e["choices"][0]["delta"] == {"role": "assistant", "content": None} for e in shown)
    texts = [i for i, e in enumerate(events) if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert texts and max(events.index(e) for e in shown) < texts[0]  # all before the first text
    again, _ = progress_of(single, "/v1/chat/completions", body)  # the slot holds this prompt now
    assert again[0]["cache"] >= first[-1]["total"] - 1 and len(again) <= 2
    native, _ = progress_of(single, "/completion", {"prompt": "Read in batches. " * 10, "n_predict": 2,
                                                    "stream": True, "return_progress": True})
    assert len(native) >= 3 and native[-1]["processed"] == native[-1]["total"]
    quiet, _ = progress_of(single, "/v1/chat/completions", {**body, "return_progress": False})
    assert quiet == []


def test_timings_per_token_on_every_chunk(single: Daemon) -> None:
    """llama-server's timings_per_token, which its web UI asks for to show the speed live."""
    body = {"messages": [{"role": "user", "content": "Timed token by token. " * 6}], "max_tokens": 6,
            "stream": True, "timings_per_token": True, "return_progress": True, "logit_bias": NO_EOS,
            "temperature": 0}  # the same tokens every run: one text chunk per token
    _, events = progress_of(single, "/v1/chat/completions", body)
    shown = [e for e in events if "prompt_progress" in e]
    assert shown[0]["timings"]["prompt_n"] == 0 and shown[0]["timings"]["prompt_ms"] == 0.0
    assert [e["timings"]["prompt_n"] for e in shown] == [p["prompt_progress"]["processed"]
                                                         - p["prompt_progress"]["cache"] for p in shown]
    texts = [e for e in events if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert len(texts) == 6 and all("timings" in e for e in texts)
    roles = [e for e in events if e not in shown and e["choices"] and "role" in e["choices"][0]["delta"]]
    assert len(roles) == 1 and "timings" not in roles[0]  # llama-server's role chunk has none
    assert [e["timings"]["predicted_n"] for e in texts] == [1, 2, 3, 4, 5, 6]
    ms = [e["timings"]["predicted_ms"] for e in texts]
    assert ms == sorted(ms) and texts[-1]["timings"]["prompt_n"] == shown[-1]["timings"]["prompt_n"]
    _, native = progress_of(single, "/completion", {"prompt": "Timed.", "n_predict": 3, "stream": True,
                                                    "timings_per_token": True, "logit_bias": NO_EOS,
                                                    "temperature": 0})
    assert [e["timings"]["predicted_n"] for e in native if e.get("content")] == [1, 2, 3]
    _, plain = progress_of(single, "/v1/chat/completions", {**body, "timings_per_token": False,
                                                             "return_progress": False})
    assert sum("timings" in e for e in plain) == 1  # on the last chunk only


def test_embeddings_are_l2_normalised_unless_asked_otherwise(daemon: Daemon) -> None:
    with daemon.client() as c:
        unit = c.post("/v1/embeddings", json={"model": "tiny-a", "input": ["hello", ""]}).json()["data"]
        raw = c.post("/v1/embeddings", json={"model": "tiny-a", "input": "hello",
                                             "embd_normalize": -1}).json()["data"][0]["embedding"]
        native = c.post("/embedding", json={"model": "tiny-a", "input": "hello"})
    assert math.isclose(math.sqrt(sum(x * x for x in unit[0]["embedding"])), 1.0, rel_tol=1e-5)
    assert not any(unit[1]["embedding"])  # an empty input embeds to zeros, not a 500
    assert not math.isclose(math.sqrt(sum(x * x for x in raw)), 1.0, rel_tol=1e-3)
    assert native.status_code == 200


def test_native_completion_with_token_probabilities(daemon: Daemon) -> None:
    with daemon.client() as c:
        r = c.post("/completion", json={"model": "tiny-a", "prompt": "hello", "n_predict": 4, "n_probs": 3,
                                        "temperature": 0}).json()
    assert r["stop"] is True and r["tokens_predicted"] == len(r["completion_probabilities"])
    first = r["completion_probabilities"][0]
    assert len(first["top_logprobs"]) == 3 and first["logprob"] <= 0
    assert first["top_logprobs"][0]["logprob"] >= first["top_logprobs"][-1]["logprob"]
    assert set(r["timings"]) >= {"prompt_n", "prompt_ms", "predicted_n", "predicted_ms", "cache_n"}


def test_ignore_eos_and_the_generation_settings_of_a_native_completion(daemon: Daemon) -> None:
    with daemon.client() as c:
        body = {"model": "tiny-a", "prompt": "hello", "n_predict": 12, "temperature": 0, "stop": ["zz"]}
        banned = c.post("/completion", json={**body, "ignore_eos": True}).json()
        plain = c.post("/completion", json=body).json()
        chat = c.post("/v1/chat/completions", json={"model": "tiny-a", "messages": MSG, "max_tokens": 12,
                                                    "ignore_eos": True}).json()
    settings = banned["generation_settings"]
    assert settings["n_predict"] == 12 and settings["temperature"] == 0 and settings["ignore_eos"] is True
    assert settings["stop"] == ["zz"] and settings["stream"] is False
    assert settings["logit_bias"] and all(b["bias"] is None for b in settings["logit_bias"])  # -inf
    assert banned["tokens_predicted"] == 12 and banned["stop_type"] == "limit"
    assert plain["generation_settings"]["logit_bias"] == []
    assert plain["generation_settings"]["ignore_eos"] is False
    assert chat["usage"]["completion_tokens"] == 12 and chat["choices"][0]["finish_reason"] == "length"


def test_logprobs_and_several_choices_with_the_openai_client(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny-a", messages=MSG, max_tokens=6, logprobs=True,  # type: ignore[arg-type]
                                       top_logprobs=2, n=2, temperature=1.0, seed=5)
    assert [c.index for c in r.choices] == [0, 1]
    for choice in r.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        entry = choice.logprobs.content[0]
        assert len(entry.top_logprobs) == 2 and entry.logprob <= 0
    assert r.usage is not None and r.usage.completion_tokens == sum(
        len(c.logprobs.content) for c in r.choices if c.logprobs and c.logprobs.content)
    text = client.completions.create(model="tiny-a", prompt="hello", max_tokens=4, logprobs=2)
    assert text.choices[0].logprobs is not None and len(text.choices[0].logprobs.tokens or []) == 4


def test_a_seed_reproduces_whatever_the_cache_holds_with_cache_prompt_false(client: openai.OpenAI) -> None:
    def say() -> str:
        r = client.chat.completions.create(model="tiny-b", messages=MSG, max_tokens=12, temperature=1.0,  # type: ignore[arg-type]
                                           seed=1234, extra_body={"cache_prompt": False})
        return r.choices[0].message.content or ""

    first = say()
    client.chat.completions.create(model="tiny-b", messages=[{"role": "user", "content": "Something else"}],  # type: ignore[list-item]
                                   max_tokens=8)  # the cache now holds another conversation
    assert say() == first
