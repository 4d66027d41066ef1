"""A client that reads slowly (or not at all) holds back only its own generation: the router
keeps at most a window of its bytes, the worker pauses that sequence (GET /slots shows it
paused), other requests on the same model go on, and once the client reads again the
stream resumes to its end with nothing lost."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import NO_EOS, Daemon, http_body, read_to_end

TOKENS = 4000


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory, models_dir: Path,
         isolated_env: dict[str, str]) -> Iterator[Daemon]:
    config = tmp_path_factory.mktemp("flow") / "c.toml"
    config.write_text(f'[server]\nmodels_dirs = []\nstream_window_bytes = 4096\n\n'
                      f'[models.long]\nsource = "{models_dir / "tiny-b.gguf"}"\nn_ctx = 8192\n')
    with Daemon("--config", str(config), env=isolated_env) as d:
        d.load("long")
        yield d


def slot_states(d: Daemon) -> list[dict[str, object]]:
    with d.client() as c:
        r = c.get("/slots", params={"model": "long"})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def paused_slot(d: Daemon) -> dict[str, object] | None:
    return next((s for s in slot_states(d) if s["is_processing"] and s.get("paused")), None)


def test_a_client_that_stops_reading_pauses_only_its_own_generation(flow: Daemon) -> None:
    body = json.dumps({"model": "long", "messages": [{"role": "user", "content": "go"}], "max_tokens": TOKENS,
                       "stream": True, "stream_options": {"include_usage": True}, "logit_bias": NO_EOS,
                       # ~2 KB per token: the answer (~6 MB) is far more than the kernel's
                       # socket buffers (which grow to a few MB) can take for the client.
                       "logprobs": True, "top_logprobs": 20}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window on the wire too
    sock.settimeout(60)
    try:
        sock.connect(("127.0.0.1", flow.port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = sock.recv(4096)
        assert received.startswith(b"HTTP/1.1 200"), received
        # The client reads nothing more: its generation must stop well short of its end. (The
        # first pauses are brief, while the kernel's socket buffers still grow and take bytes.)
        seen: list[object] = []

        def settled() -> bool:
            slot = paused_slot(flow)
            seen.append(slot["next_token"][0]["n_decoded"] if slot else None)  # type: ignore[index]
            return len(seen) > 1 and seen[-1] is not None and seen[-1] == seen[-2]

        flow.wait_until(settled, "the slow client's sequence paused for good", timeout=120)
        decoded = seen[-1]
        assert isinstance(decoded, int) and 0 < decoded < TOKENS, seen

        # Another request on the same model is served meanwhile.
        with flow.client() as c:
            r = c.post("/v1/chat/completions", json={"model": "long", "max_tokens": 16, "logit_bias": NO_EOS,
                                                     "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16, r.text
        slot = paused_slot(flow)
        assert slot is not None and slot["next_token"][0]["n_decoded"] == decoded  # type: ignore[index]

        raw = read_to_end(sock, received)  # reading again resumes it
    finally:
        sock.close()
    events = [ln[6:] for ln in http_body(raw).decode().splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["completion_tokens"] == TOKENS
    text_chunks = [json.loads(e) for e in events[:-2]]
    assert all("error" not in chunk for chunk in text_chunks)
    assert not any(s["is_processing"] for s in slot_states(flow))
