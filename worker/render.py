"""Render OpenAI response bytes: the exact bytes the client will receive.

Per-token SSE chunks are built from a precomputed prefix and suffix around the
JSON-escaped text, so the hot path does one small string encode per token.
"""

from __future__ import annotations

import base64
import os
import struct
import time

import msgspec

from worker.backend import Embeddings, Finish

_json = msgspec.json.Encoder()
DONE = b"data: [DONE]\n\n"


def _new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def _usage(finish: Finish) -> dict[str, object]:
    return {
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
        # OpenAI's field for prompt caching: tokens whose KV cache was reused.
        "prompt_tokens_details": {"cached_tokens": finish.cached_tokens},
    }


class StreamRenderer:
    """SSE lines for one streaming chat or text completion."""

    def __init__(self, model: str, chat: bool, include_usage: bool) -> None:
        self.chat = chat
        self.include_usage = include_usage
        self._created = int(time.time())
        self._id = _new_id("chatcmpl-" if chat else "cmpl-")
        self._model = model
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": self._id, "object": obj, "created": self._created, "model": model}
        # Everything before the choices array, without its closing brace.
        self._head = _json.encode(head)[:-1]
        # OpenAI sends "usage": null on every chunk when usage was asked for.
        self._tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"
        if chat:
            self._piece_prefix = b"data: " + self._head + b',"choices":[{"index":0,"delta":{"content":'
            self._piece_suffix = b'},"logprobs":null,"finish_reason":null}]' + self._tail
        else:
            self._piece_prefix = b"data: " + self._head + b',"choices":[{"index":0,"text":'
            self._piece_suffix = b',"logprobs":null,"finish_reason":null}]' + self._tail

    def start(self) -> bytes:
        """The role-announcing first chunk of a chat stream (empty for completions)."""
        if not self.chat:
            return b""
        return (b"data: " + self._head
                + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
                + b'"logprobs":null,"finish_reason":null}]' + self._tail)

    def piece(self, text: str) -> bytes:
        return self._piece_prefix + _json.encode(text) + self._piece_suffix

    def finish(self, finish: Finish) -> bytes:
        reason = _json.encode(finish.reason)
        if self.chat:
            choice = b'{"index":0,"delta":{},"logprobs":null,"finish_reason":' + reason + b"}"
        else:
            choice = b'{"index":0,"text":"","logprobs":null,"finish_reason":' + reason + b"}"
        out = b"data: " + self._head + b',"choices":[' + choice + b"]" + self._tail
        if self.include_usage:
            out += (b"data: " + self._head + b',"choices":[],"usage":'
                    + _json.encode(_usage(finish)) + b"}\n\n")
        return out + DONE


def chat_response(model: str, text: str, finish: Finish) -> bytes:
    return _json.encode({
        "id": _new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish.reason,
        }],
        "usage": _usage(finish),
    })


def completion_response(model: str, text: str, finish: Finish) -> bytes:
    return _json.encode({
        "id": _new_id("cmpl-"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish.reason}],
        "usage": _usage(finish),
    })


def embeddings_response(model: str, result: Embeddings, encoding: str) -> bytes:
    data = []
    for i, vec in enumerate(result.vectors):
        emb: list[float] | str
        if encoding == "base64":
            emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
        else:
            emb = vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return _json.encode({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    })
