"""End to end through the real daemon, real workers and the official openai client."""

from __future__ import annotations

import base64
import json
import os
import signal
import struct
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest

from tests.conftest import BACKENDS
from tests.daemon import NO_EOS, Daemon


@BACKENDS
def test_chat_non_stream(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello!"}],
        max_tokens=12, logit_bias=NO_EOS, seed=7)
    assert r.model == model
    assert r.object == "chat.completion"
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    assert r.usage is not None
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


@BACKENDS
def test_chat_stream_with_usage(client: openai.OpenAI, model: str) -> None:
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Count to three."}],
        max_tokens=9, stream=True, stream_options={"include_usage": True}, logit_bias=NO_EOS)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.completion_tokens == 9
    assert len({c.id for c in chunks}) == 1


@BACKENDS
def test_stream_wire_format_and_headers(daemon: Daemon, model: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5, "stream": True, "logit_bias": NO_EOS}
    with daemon.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        raw = b"".join(r.iter_bytes())
    events = [e for e in raw.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in events)
    assert events[-1] == b"data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in payloads[0]  # only present when stream_options.include_usage is set


@BACKENDS
def test_stream_and_non_stream_give_the_same_text(client: openai.OpenAI, model: str) -> None:
    # 400 fast tokens: the worker batches them into fewer frames; nothing may be lost.
    kwargs = dict(model=model, messages=[{"role": "user", "content": "same"}], max_tokens=400,
                  seed=5, temperature=0.7, logit_bias=NO_EOS)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content  # type: ignore[call-overload]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))  # type: ignore[call-overload]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == whole
    assert chunks[-1].choices[0].finish_reason == "length"


@BACKENDS
def test_stop_string_is_honoured(client: openai.OpenAI, model: str) -> None:
    # Find a piece of what the model says, then ask it to stop there: the same seed
    # reproduces the text, which must end right before the stop string.
    kwargs = dict(model=model, prompt="Once upon a time", max_tokens=30, seed=11,
                  temperature=0.0, logit_bias=NO_EOS)
    full = client.completions.create(**kwargs).choices[0].text  # type: ignore[call-overload]
    stop = full[10:13]
    assert len(stop) == 3
    cut = client.completions.create(stop=[stop], **kwargs)  # type: ignore[call-overload]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.index(stop)]


@BACKENDS
def test_completions_stream_and_not(client: openai.OpenAI, model: str) -> None:
    r = client.completions.create(model=model, prompt="The quick brown", max_tokens=7,
                                  logit_bias=NO_EOS)
    assert r.object == "text_completion"
    assert r.usage is not None and r.usage.completion_tokens == 7
    pieces = list(client.completions.create(model=model, prompt="The quick brown", max_tokens=7,
                                            stream=True, logit_bias=NO_EOS))
    assert "".join(p.choices[0].text for p in pieces)
    assert pieces[-1].choices[0].finish_reason == "length"


@BACKENDS
def test_seed_makes_sampling_reproducible(client: openai.OpenAI, model: str) -> None:
    def once() -> str | None:
        return client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "x"}], max_tokens=15,
            seed=1234, temperature=1.0, logit_bias=NO_EOS).choices[0].message.content
    assert once() == once()


@BACKENDS
def test_one_clients_seed_does_not_fix_the_next_clients_sampling(client: openai.OpenAI, model: str) -> None:
    def ask(**kw: object) -> str | None:
        return client.chat.completions.create(  # type: ignore[call-overload, no-any-return]
            model=model, messages=[{"role": "user", "content": "x"}], max_tokens=30,
            temperature=1.0, logit_bias=NO_EOS, **kw).choices[0].message.content
    # Were an unseeded request to go on from the seeded one's state, both would say the same.
    ask(seed=7)
    after_first = ask()
    ask(seed=7)
    assert ask() != after_first


def test_embeddings_float_and_base64(client: openai.OpenAI, daemon: Daemon) -> None:
    r = client.embeddings.create(model="tiny-a", input=["hello", "a longer sentence here"])
    assert [d.index for d in r.data] == [0, 1]
    assert all(len(d.embedding) == 64 for d in r.data)  # the tiny model's n_embd
    assert r.data[0].embedding != r.data[1].embedding
    assert r.usage.prompt_tokens > 0
    with daemon.client() as c:
        raw = c.post("/v1/embeddings", json={"model": "tiny-a", "input": "hello",
                                             "encoding_format": "base64"}).json()
    vec = struct.unpack("<64f", base64.b64decode(raw["data"][0]["embedding"]))
    assert vec == pytest.approx(r.data[0].embedding, rel=1e-5)


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    r = client.chat.completions.create(
        model="tiny-a", messages=[{"role": "user", "content": "give n"}], max_tokens=40, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    content = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop", content
    assert isinstance(json.loads(content or ""), dict)
    assert isinstance(json.loads(content or "")["n"], int)


def test_alias_and_slash_name_route_to_the_same_model(client: openai.OpenAI, daemon: Daemon) -> None:
    a = client.completions.create(model="long", prompt="x", max_tokens=3, logit_bias=NO_EOS)
    b = client.completions.create(model="org/tiny-long", prompt="x", max_tokens=3, logit_bias=NO_EOS)
    assert a.model == b.model == "org/tiny-long"
    entry = daemon.models()["org/tiny-long"]
    assert entry["aliases"] == ["long"]
    assert entry["meta"]["n_ctx"] == 8192  # type: ignore[index]


def test_two_models_run_in_two_processes_in_parallel(client: openai.OpenAI, daemon: Daemon) -> None:
    daemon.load("tiny-a")
    daemon.load("tiny-b")
    models = daemon.models()
    pids = {models[m]["pid"] for m in ("tiny-a", "tiny-b")}
    assert len(pids) == 2 and None not in pids
    assert all(psutil.pid_exists(p) for p in pids)  # type: ignore[arg-type]
    daemon_pid = daemon.proc.pid  # type: ignore[union-attr]
    assert all(psutil.Process(p).ppid() == daemon_pid for p in pids)  # type: ignore[arg-type]

    # Overlap: a generation on one model is frozen mid-stream (SIGSTOP on its worker),
    # and the other model still answers in full: they do not share a process or a lock.
    long_pid = daemon.load("org/tiny-long")["pid"]
    assert isinstance(long_pid, int) and long_pid not in pids
    mark = daemon.mark()
    long = client.chat.completions.create(
        model="org/tiny-long", messages=[{"role": "user", "content": "go"}], max_tokens=8000,
        stream=True, logit_bias=NO_EOS)
    assert next(iter(long)).choices[0].delta.role == "assistant"
    os.kill(long_pid, signal.SIGSTOP)
    try:
        other = client.completions.create(model="tiny-b", prompt="x", max_tokens=5, logit_bias=NO_EOS)
        assert other.usage is not None and other.usage.completion_tokens == 5
        long.close()
    finally:
        os.kill(long_pid, signal.SIGCONT)
    m = daemon.wait_for_log(r"request \d+ cancelled after (\d+) tokens", start=mark)
    assert int(m.group(1)) < 8000

    def run(model: str) -> int:
        chunks = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "go"}], max_tokens=200,
            stream=True, logit_bias=NO_EOS)
        return sum(1 for c in chunks if c.choices and c.choices[0].delta.content)

    with ThreadPoolExecutor(4) as pool:
        counts = list(pool.map(run, ["tiny-a", "tiny-b", "tiny-a", "tiny-b"]))
    assert all(n > 0 for n in counts)


def test_models_listing(daemon: Daemon) -> None:
    with daemon.client() as c:
        v1 = c.get("/v1/models").json()
    assert v1["object"] == "list"
    ids = {m["id"] for m in v1["data"]}
    assert {"tiny-a", "tiny-b", "org/tiny-long"} <= ids
    daemon.load("tiny-a")
    entry = daemon.models()["tiny-a"]
    assert entry["status"] == {"value": "loaded", "failed": False, "args": []}  # llama-server's keys
    assert entry["aliases"] == [] and entry["tags"] == []
    assert entry["backend"] == "llama_cpp"
    assert str(entry["source"]).endswith("tiny-a.gguf")
    meta = entry["meta"]
    assert meta["n_ctx"] == 1024 and meta["n_vocab"] > 256 and meta["chat_template"] is True  # type: ignore[index]
    assert meta["device"] == "cpu"  # type: ignore[index]


def test_health(daemon: Daemon) -> None:
    assert httpx.get(daemon.url + "/health").json() == {"status": "ok"}
