"""Slots through the daemon, on a real model (SmolLM2-135M-Instruct, 4 slots): four
requests hold four slots at once (GET /slots in llama-server's shape says so), a client
leaving frees its slot at once, /models shows the slots and the prompt cache, and
interleaved conversations, more than there are slots, come back with their history
cached whether it stayed in a slot or waited in host RAM."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.daemon import NO_EOS, Daemon, open_stream

MODEL = "smol"
QUESTIONS = ["What is the capital of France?", "Name three colors.", "Write a haiku about the sea.",
             "What is 2+2?", "Who wrote Hamlet?", "What is the boiling point of water?"]


@pytest.fixture(scope="module")
def slotted(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path,
            isolated_env: dict[str, str]) -> Iterator[Daemon]:
    config = tmp_path_factory.mktemp("slots") / "c.toml"
    config.write_text(f'[server]\nmodels_dirs = []\nstream_window_bytes = 4096\n\n'
                      f'[models.{MODEL}]\nsource = "{smollm2_gguf}"\nn_ctx = 2048\n'
                      f'options = {{ parallel = 4, cache_ram_mb = 256 }}\n')
    with Daemon("--config", str(config), env=isolated_env) as d:
        d.load(MODEL)
        yield d


def slots(d: Daemon) -> list[dict[str, object]]:
    with d.client() as c:
        r = c.get("/slots", params={"model": MODEL})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body, list)
    return body


def busy(d: Daemon) -> int:
    return sum(1 for s in slots(d) if s["is_processing"])


def test_slots_in_llama_servers_shape(slotted: Daemon) -> None:
    listed = slots(slotted)
    assert [s["id"] for s in listed] == [0, 1, 2, 3]
    for s in listed:
        assert s["n_ctx"] == 2048 and s["is_processing"] is False
        assert {"speculative", "n_prompt_tokens", "next_token"} <= set(s)


def test_four_requests_hold_four_slots_and_a_leaving_client_frees_its_own(slotted: Daemon) -> None:
    d = slotted
    socks: list[socket.socket] = []
    try:
        for _ in range(4):
            # Long generations whose clients stop reading after three events: flow control
            # pauses them, so they hold their slots until the test lets go.
            sock, _ = open_stream(d.port, MODEL, max_tokens=1800)
            socks.append(sock)
        d.wait_until(lambda: busy(d) == 4, "four slots busy at once")
        # /models shows what the worker's last heartbeat said (every heartbeat_interval).
        d.wait_until(lambda: d.models()[MODEL]["slots"] == {"busy": 4, "total": 4, "queued": 0},
                     "/models showing four busy slots of four")
        socks.pop().close()
        d.wait_until(lambda: busy(d) == 3, "the slot of the client that left freed")
    finally:
        for sock in socks:
            sock.close()
    d.wait_until(lambda: busy(d) == 0, "every slot free once every client left")


def test_more_conversations_than_slots_come_back_cached(slotted: Daemon) -> None:
    with openai.OpenAI(base_url=slotted.url + "/v1", api_key="none", max_retries=0, timeout=120) as c:
        first = []
        for q in QUESTIONS:  # six conversations on four slots: two go to the RAM cache
            r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                          max_tokens=24, temperature=0, logit_bias=NO_EOS)
            assert r.usage is not None
            first.append((q, r.choices[0].message.content or "", r.usage.prompt_tokens,
                          r.usage.completion_tokens))
        for q, reply, prompt_tokens, completion_tokens in first:
            messages = [{"role": "user", "content": q}, {"role": "assistant", "content": reply},
                        {"role": "user", "content": "Tell me more."}]
            r = c.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                          max_tokens=4, temperature=0)
            assert r.usage is not None and r.usage.prompt_tokens_details is not None
            cached = r.usage.prompt_tokens_details.cached_tokens or 0
            # All of turn 1's prompt and nearly all of its reply (the reply's last token and
            # the template's end-of-turn tokens may be read again).
            assert cached >= prompt_tokens + completion_tokens - 3, (q, cached, prompt_tokens)
    # Two conversations came back from host RAM; /models has it by the next heartbeat.
    def cache_used() -> bool:
        cache = slotted.models()[MODEL]["prompt_cache"]
        return isinstance(cache, dict) and cache["hits"] >= 2 and cache["bytes"] > 0

    slotted.wait_until(cache_used, "/models showing the prompt cache's hits")
