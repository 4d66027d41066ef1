"""Resumable streams end to end: real daemon, real llama.cpp and mlx-lm workers, raw sockets, httpx.

The wire protocol is llama-server's: X-Conversation-Id on a streaming POST, then
GET /v1/stream?conv_id=&from=, POST /v1/streams/lookup, DELETE /v1/stream.
The scripted backend appears only as a model whose load takes a minute, so that
"while the owner loads" is a state the test can stand in, not a race.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.daemon import NO_EOS, Daemon, http_body, open_stream, read_to_end, send_raw, stream_request

DONE = b"data: [DONE]\n\n"
LONG = "org/tiny-long"  # a slash in the name, and n_ctx 8192 for long generations
MLX_LONG = "mlx-long"  # the same, served by mlx-lm
BACKENDS = pytest.mark.parametrize("model", [LONG, MLX_LONG])


def _config(path: Path, models_dir: Path, server: str = "") -> Path:
    (path.parent / "slowload.bin").write_bytes(b"scripted")
    path.write_text(f"""
[server]
models_dirs = []
stop_timeout = 1
{server}

[defaults]
n_ctx = 1024

[models.tiny-a]
source = "{models_dir / 'tiny-a.gguf'}"

[models."{LONG}"]
source = "{models_dir / 'tiny-b.gguf'}"
n_ctx = 8192

[models."{MLX_LONG}"]
source = "{models_dir / 'tiny-mlx'}"
n_ctx = 8192

[models.slowload]
source = "{path.parent / 'slowload.bin'}"
backend = "scripted"
options = {{ load_seconds = 60 }}

[models.slowish]
source = "{path.parent / 'slowload.bin'}"
backend = "scripted"
options = {{ load_seconds = 3 }}
""")
    return path


def _daemon(tmp: Path, models_dir: Path, env: dict[str, str], server: str = "") -> Daemon:
    return Daemon("--config", str(_config(tmp / "cfg.toml", models_dir, server)), env=env)


@pytest.fixture(scope="module")
def streams(tmp_path_factory: pytest.TempPathFactory, models_dir: Path,
            isolated_env: dict[str, str]) -> Iterator[Daemon]:
    with _daemon(tmp_path_factory.mktemp("streams"), models_dir, isolated_env) as d:
        yield d


def _body(model: str, max_tokens: int) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "go"}], "max_tokens": max_tokens,
            "stream": True, "logit_bias": NO_EOS}


def post(c: httpx.Client, conv: str | None, model: str = "tiny-a", max_tokens: int = 4,
         **headers: str) -> httpx.Response:
    """A streaming chat POST read to its end."""
    if conv is not None:
        headers["X-Conversation-Id"] = conv
    return c.post("/v1/chat/completions", json=_body(model, max_tokens), headers=headers)


def replay(c: httpx.Client, conv: str, offset: int | None = None, **headers: str) -> httpx.Response:
    params: dict[str, str | int] = {"conv_id": conv}
    if offset is not None:
        params["from"] = offset
    return c.get("/v1/stream", params=params, headers=headers)


def lookup(c: httpx.Client, *ids: str, **headers: str) -> list[dict[str, object]]:
    r = c.post("/v1/streams/lookup", json={"conversation_ids": list(ids)}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def conv_header(conv: str) -> bytes:
    return f"X-Conversation-Id: {conv}\r\n".encode()


# ---- resuming ----------------------------------------------------------------------------


@BACKENDS
def test_a_dropped_client_resumes_from_its_last_complete_line(streams: Daemon, model: str) -> None:
    mark = streams.mark()
    streams.load(model)
    sock, received = open_stream(streams.port, model, events=3, max_tokens=3000, headers=conv_header("drop"))
    sock.close()  # the phone lost Wi-Fi
    streams.wait_for_log(rf"\[{re.escape(model)}\] .*request \d+: its client left; generating on",
                         start=mark)
    before = http_body(received)
    offset = before.rfind(b"\n") + 1
    assert 0 < offset <= len(before)
    with streams.client() as c:
        resumed = replay(c, "drop", offset)
        assert resumed.status_code == 200, resumed.text
        assert resumed.headers["content-type"].startswith("text/event-stream")
        full = replay(c, "drop", 0)
        [state] = lookup(c, "drop")
    # The generation went on without its client, to max_tokens, and nothing was lost.
    assert before[:offset] + resumed.content == full.content
    assert full.content.endswith(DONE) and b'"finish_reason":"length"' in full.content
    assert state == {"conversation_id": "drop", "is_done": True, "total_bytes": len(full.content),
                     "started_at": state["started_at"], "completed_at": state["completed_at"]}
    assert 0 < state["started_at"] <= state["completed_at"]  # type: ignore[operator]
    assert not any("cancelled after" in line for line in streams.lines[mark:])


def test_a_reader_that_leaves_is_dropped_and_the_stream_goes_on(streams: Daemon) -> None:
    mark = streams.mark()
    pid = streams.load(LONG)["pid"]
    assert isinstance(pid, int)
    sock, received = open_stream(streams.port, LONG, events=3, max_tokens=8000,
                                 headers=conv_header("watched"))
    reader = send_raw(streams.port, b"GET /v1/stream?conv_id=watched HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reader.recv(65536).startswith(b"HTTP/1.1 200")  # attached, to a live stream
    os.kill(pid, signal.SIGSTOP)  # so the stream cannot end before the reader's leaving arrives
    try:
        reader.close()
    finally:
        os.kill(pid, signal.SIGCONT)
    streams.wait_for_log(r"request \d+: the stream's reader left at byte \d+", start=mark)
    rest = http_body(read_to_end(sock, received))  # the original client is unaffected
    sock.close()
    assert rest.endswith(DONE)


def test_a_client_gone_before_its_model_loaded_is_detached_once_it_runs(streams: Daemon) -> None:
    mark = streams.mark()
    sock = send_raw(streams.port, stream_request(streams.port, "slowish", 4, conv_header("went-early")))
    streams.wait_for_log(r"\[slowish\] scripted backend: loading", start=mark)
    sock.close()  # the load takes 3 s: the client is gone well before it ends
    streams.wait_for_log(r"\[slowish\] .*request \d+: its client left; generating on", start=mark)
    with streams.client() as c:
        streams.wait_until(lambda: lookup(c, "went-early")[0]["is_done"] is True, "the stream finished")
        assert replay(c, "went-early").content.endswith(DONE)
        assert c.post("/models/unload", json={"model": "slowish"}).status_code == 200


def test_replay_of_a_finished_stream(streams: Daemon) -> None:
    with streams.client() as c:
        original = post(c, "finished", max_tokens=12)
        assert original.status_code == 200 and original.content.endswith(DONE)
        assert replay(c, "finished").content == original.content
        assert replay(c, "finished", 17).content == original.content[17:]
        # Past the end of a finished stream: an empty stream, as llama-server answers.
        past = replay(c, "finished", len(original.content) + 100)
        assert past.status_code == 200 and past.content == b""


def test_path_form_with_a_slashed_id_on_a_slashed_model(streams: Daemon) -> None:
    conv = "user 7/chat::org/tiny-long"
    with streams.client() as c:
        original = post(c, conv, model=LONG, max_tokens=5)
        assert original.status_code == 200
        by_path = c.get(f"/v1/stream/{quote(conv, safe='')}", params={"from": 3})
        assert by_path.status_code == 200 and by_path.content == original.content[3:]
        head = c.head(f"/v1/stream/{quote(conv, safe='')}")
        assert head.status_code == 200 and head.content == b""
        assert c.head("/v1/stream/no-such-conversation").status_code == 404
        # The llama.cpp web UI looks streams up by the part before '::'.
        assert [s["conversation_id"] for s in lookup(c, "user 7/chat")] == [conv]
        assert c.delete(f"/v1/stream/{quote(conv, safe='')}").status_code == 204
        assert replay(c, conv).status_code == 404


def test_lookup_answers_only_for_known_ids(streams: Daemon) -> None:
    with streams.client() as c:
        for conv in ("known-1", "known-2"):
            assert post(c, conv).status_code == 200
        found = lookup(c, "known-2", "unknown", "known-1", "known-2")
        assert sorted(s["conversation_id"] for s in found) == ["known-1", "known-2"]  # type: ignore[type-var]
        assert all(s["is_done"] is True and s["total_bytes"] for s in found)
        assert lookup(c) == []
        for bad in (b"{", b"[]", b'{"conversation_ids": "known-1"}', b'{"conversation_ids": [1]}',
                    b'{"conversation_ids": [""]}'):
            r = c.post("/v1/streams/lookup", content=bad)
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["error"]["type"] == "invalid_request_error"


def test_delete_then_get_is_404_and_delete_is_idempotent(streams: Daemon) -> None:
    with streams.client() as c:
        assert post(c, "gone").status_code == 200
        assert replay(c, "gone").status_code == 200
        for _ in range(2):
            r = c.delete("/v1/stream", params={"conv_id": "gone"})
            assert r.status_code == 204 and r.content == b""
        r = replay(c, "gone")
        assert r.status_code == 404 and r.json()["error"]["message"] == "Stream not found or expired"
        assert lookup(c, "gone") == []
        assert c.delete("/v1/stream", params={"conv_id": "never-was"}).status_code == 204


@BACKENDS
def test_delete_stops_a_running_generation(streams: Daemon, model: str) -> None:
    mark = streams.mark()
    streams.load(model)
    sock, received = open_stream(streams.port, model, events=3, max_tokens=6000, headers=conv_header("stop"))
    with streams.client() as c:
        assert c.delete("/v1/stream", params={"conv_id": "stop"}).status_code == 204
    rest = http_body(read_to_end(sock, received))
    sock.close()
    assert b"request stopped: its conversation's stream was deleted" in rest and DONE not in rest
    streams.wait_for_log(r"request \d+ stopped after \d+ tokens: its conversation's stream was deleted",
                         start=mark)


def test_a_new_post_on_the_id_stops_the_stream_running_on_another_model(streams: Daemon) -> None:
    pid = streams.load(LONG)["pid"]
    assert isinstance(pid, int)
    sock, received = open_stream(streams.port, LONG, events=3, max_tokens=6000, headers=conv_header("swap"))
    # Frozen, the old worker cannot finish on its own or answer in time: only the stop
    # sent for the new POST can end its stream, whenever it runs again.
    os.kill(pid, signal.SIGSTOP)
    try:
        with streams.client() as c:
            newer = post(c, "swap", model=MLX_LONG, max_tokens=5)  # and on another backend
    finally:
        os.kill(pid, signal.SIGCONT)
    old = http_body(read_to_end(sock, received))
    sock.close()
    assert newer.status_code == 200 and newer.content.endswith(DONE)
    assert b"request stopped: a newer request took over this conversation" in old and DONE not in old
    with streams.client() as c:
        assert replay(c, "swap").content == newer.content
        assert b'"model":"mlx-long"' in newer.content


def test_a_stuck_worker_makes_its_ids_absent_without_holding_up_the_others(streams: Daemon) -> None:
    pid = streams.load(LONG)["pid"]
    assert isinstance(pid, int)
    with streams.client() as c:
        assert post(c, "on-long", model=LONG).status_code == 200
        assert post(c, "on-tiny", model="tiny-a").status_code == 200
        os.kill(pid, signal.SIGSTOP)
        try:
            assert [s["conversation_id"] for s in lookup(c, "on-long", "on-tiny")] == ["on-tiny"]
            assert c.delete("/v1/stream", params={"conv_id": "on-long"}).status_code == 204
        finally:
            os.kill(pid, signal.SIGCONT)
        # The router forgot the id at once, whether or not the worker answered in time.
        assert replay(c, "on-long").status_code == 404
        assert [s["conversation_id"] for s in lookup(c, "on-long", "on-tiny")] == ["on-tiny"]


# ---- while the owner loads ----------------------------------------------------------------


def _post_in_background(d: Daemon, conv: str,
                        model: str) -> tuple[threading.Thread, dict[str, httpx.Response]]:
    result: dict[str, httpx.Response] = {}

    def run() -> None:
        with d.client() as c:
            result["r"] = post(c, conv, model=model)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_get_while_the_owner_loads_is_503_and_delete_cancels_the_waiting_post(streams: Daemon) -> None:
    mark = streams.mark()
    thread, result = _post_in_background(streams, "early", "slowload")
    streams.wait_for_log(r"\[slowload\] scripted backend: loading", start=mark)
    with streams.client() as c:
        early = replay(c, "early")
        assert early.status_code == 503 and early.headers["retry-after"] == "2"
        assert early.json()["error"]["message"] == "Stream owner model is loading, retry later"
        # /models shows the load under way: its stage and how far it got.
        streams.wait_until(lambda: streams.models()["slowload"]["status"].get("stage") == "load",  # type: ignore[union-attr]
                           "the load stage shows in /models")
        assert 0 <= streams.models()["slowload"]["status"]["progress"] < 1  # type: ignore[index]
        [state] = lookup(c, "early")
        assert state["is_done"] is False and state["total_bytes"] == 0 and state["completed_at"] == 0
        assert c.delete("/v1/stream", params={"conv_id": "early"}).status_code == 204
        thread.join(30)
        r = result["r"]
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"] == "request cancelled by a stop while the model was loading"
        assert replay(c, "early").status_code == 404
        assert c.post("/models/unload", json={"model": "slowload"}).status_code == 200


def test_a_client_that_leaves_while_the_model_loads_still_gets_its_stream_recorded(streams: Daemon) -> None:
    mark = streams.mark()
    sock = send_raw(streams.port, stream_request(streams.port, "slowload", 4, conv_header("left-early")))
    streams.wait_for_log(r"\[slowload\] scripted backend: loading", start=mark)
    sock.close()
    with streams.client() as c:
        assert replay(c, "left-early").status_code == 503  # still waiting for its model, not gone
        assert [s["conversation_id"] for s in lookup(c, "left-early")] == ["left-early"]
        assert c.delete("/v1/stream", params={"conv_id": "left-early"}).status_code == 204
        assert c.post("/models/unload", json={"model": "slowload"}).status_code == 200


# ---- bad input ------------------------------------------------------------------------------


def test_bad_ids_and_offsets_are_400(streams: Daemon) -> None:
    with streams.client() as c:
        assert post(c, "x" * 129).status_code == 400
        assert post(c, "x" * 128).status_code == 200
        r = c.get("/v1/stream")
        assert r.status_code == 400 and "Missing conversation id" in r.json()["error"]["message"]
        for offset in ("-1", "abc", "1.5", "\uff11", "18446744073709551616", "9" * 5000):
            r = c.get("/v1/stream", params={"conv_id": "x" * 128, "from": offset})
            assert r.status_code == 400 and r.json()["error"]["message"] == "Invalid 'from' offset"
        assert c.delete("/v1/stream").status_code == 400
    # A byte outside printable ASCII in the header (httpx would refuse to send it).
    with send_raw(streams.port, stream_request(streams.port, "tiny-a", 2,
                                               b"X-Conversation-Id: caf\xe9\r\n")) as sock:
        answer = read_to_end(sock)
    assert answer.startswith(b"HTTP/1.1 400") and b"invalid conversation id" in answer


def test_a_rejected_resumable_request_leaves_nothing_behind(streams: Daemon) -> None:
    with streams.client() as c:
        assert post(c, "kept", max_tokens=3).status_code == 200
        bad = c.post("/v1/chat/completions", headers={"X-Conversation-Id": "rejected"},
                     json={**_body("tiny-a", 3), "logit_bias": {"999999": 1}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "logit_bias"
        assert lookup(c, "rejected") == []
        assert replay(c, "rejected").status_code == 404
        # A request for a model that does not exist does not take the id over.
        typo = post(c, "kept", model="tiny-aa")
        assert typo.status_code == 404 and typo.json()["error"]["param"] == "model"
        assert replay(c, "kept").status_code == 200


def test_without_the_header_or_without_stream_nothing_is_kept(streams: Daemon) -> None:
    with streams.client() as c:
        r = c.post("/v1/chat/completions", headers={"X-Conversation-Id": "plain"},
                   json={**_body("tiny-a", 3), "stream": False})
        assert r.status_code == 200 and r.json()["object"] == "chat.completion"
        assert post(c, None).status_code == 200
        assert lookup(c, "plain") == []


# ---- the buffer, the bound, retention, API keys ----------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, models_dir: Path,
          isolated_env: dict[str, str]) -> Iterator[Daemon]:
    with _daemon(tmp_path_factory.mktemp("small"), models_dir, isolated_env,
                 "stream_buffer_bytes = 2048\nmax_conversations = 3") as d:
        yield d


def test_an_offset_the_ring_dropped_is_lost(small: Daemon) -> None:
    with small.client() as c:
        original = post(c, "big", max_tokens=100)
        assert len(original.content) > 4 * 2048
        [state] = lookup(c, "big")
        assert state["total_bytes"] == len(original.content)
        lost = replay(c, "big", 0)
        assert lost.status_code == 400
        assert lost.json()["error"]["message"] == "Stream offset lost, please restart"
        tail = replay(c, "big", len(original.content) - 500)
        assert tail.status_code == 200 and tail.content == original.content[-500:]


def test_the_tracker_keeps_the_most_recent_conversations(small: Daemon) -> None:
    with small.client() as c:
        for i in range(5):
            assert post(c, f"lru-{i}", max_tokens=2).status_code == 200
        assert [replay(c, f"lru-{i}").status_code for i in range(5)] == [404, 404, 200, 200, 200]
        assert len(lookup(c, *(f"lru-{i}" for i in range(5)))) == 3


def test_a_running_stream_pushed_out_of_the_tracker_is_stopped(small: Daemon) -> None:
    pid = small.load(LONG)["pid"]
    assert isinstance(pid, int)
    sock, received = open_stream(small.port, LONG, events=3, max_tokens=6000, headers=conv_header("victim"))
    os.kill(pid, signal.SIGSTOP)  # it cannot finish by itself while three newer ids arrive
    try:
        with small.client() as c:
            for i in range(3):
                assert post(c, f"newer-{i}", max_tokens=2).status_code == 200
    finally:
        os.kill(pid, signal.SIGCONT)
    rest = http_body(read_to_end(sock, received))
    sock.close()
    assert b"request stopped: too many conversations are tracked (max_conversations)" in rest
    assert DONE not in rest


def test_finished_streams_expire_after_retention(tmp_path: Path, models_dir: Path,
                                                 isolated_env: dict[str, str]) -> None:
    with _daemon(tmp_path, models_dir, isolated_env, "stream_retention = 3") as d, d.client() as c:
        mark = d.mark()
        original = post(c, "brief", max_tokens=3)
        assert replay(c, "brief").content == original.content
        d.wait_for_log(r"\[tiny-a\] .*freed 1 finished stream\(s\) past their 3 s retention", start=mark)
        assert replay(c, "brief").status_code == 404
        assert lookup(c, "brief") == []


def test_a_conversation_belongs_to_the_key_that_started_it(tmp_path: Path, models_dir: Path,
                                                          isolated_env: dict[str, str]) -> None:
    one = {"Authorization": "Bearer key-one"}
    two = {"Authorization": "Bearer key-two"}
    with _daemon(tmp_path, models_dir, isolated_env, 'api_keys = ["key-one", "key-two"]') as d, \
            d.client() as c:
        mine = post(c, "mine", max_tokens=4, **one)
        assert mine.status_code == 200
        assert replay(c, "mine", **two).status_code == 404
        assert lookup(c, "mine", **two) == []
        assert c.delete("/v1/stream", params={"conv_id": "mine"}, headers=two).status_code == 204
        assert replay(c, "mine", **one).content == mine.content  # untouched by the other key
        # The other key may use the same id: it is a different conversation.
        theirs = post(c, "mine", max_tokens=6, **two)
        assert replay(c, "mine", **two).content == theirs.content
        assert replay(c, "mine", **one).content == mine.content
        assert replay(c, "mine").status_code == 401
        assert [s["total_bytes"] for s in lookup(c, "mine", **one)] == [len(mine.content)]
