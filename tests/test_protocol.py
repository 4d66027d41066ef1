"""The wire protocol: every message round-trips; bad frames give typed errors."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.codec import (
    MalformedFrame,
    ProtocolError,
    RouterCodec,
    UnknownMessage,
    VersionMismatch,
    WorkerCodec,
    check_hello,
)
from protocol.errors import ErrorKind, error_body
from protocol.messages import (
    PROTOCOL_VERSION,
    BodyChunk,
    Cancel,
    Configure,
    Credit,
    Detach,
    DownloadProgress,
    Endpoint,
    Heartbeat,
    Hello,
    LoadFailed,
    LoadProgress,
    ModelInfo,
    Ready,
    Request,
    ResponseEnd,
    ResponseError,
    ResponseHead,
    ResponseStored,
    Shutdown,
    StoredTurn,
    StreamDelete,
    StreamLookup,
    StreamRead,
    StreamSettings,
    StreamState,
    StreamStates,
    WorkerConfig,
    WorkerStatus,
)

INFO = ModelInfo(backend="llama_cpp", device="cpu", n_ctx=512, n_ctx_train=2048, n_vocab=320,
                 n_params=115008, file_size=467552, chat_template=True)
DOWN = [
    (Configure(WorkerConfig(name="m", path="/x.gguf", n_ctx=256, options={"flash_attn": True,
                                                                          "n_batch": 64}),
               StreamSettings(2048, 1.5, 10)), None),
    (Request(7, Endpoint.CHAT), b'{"model": "m"}'),
    (Credit(7, 65536), None),
    (Request(9, Endpoint.COMPLETION, "owner/conv::m"), b'{"model": "m"}'),
    (Request(8, Endpoint.EMBEDDING), b""),
    (Cancel(7), None),
    (Detach(9), None),
    (StreamRead(10, "owner/conv", 123), None),
    (StreamLookup(11, ["/a", "/b"]), None),
    (StreamDelete(12, ["/a"]), None),
    (Shutdown("unload"), None),
    (Heartbeat(3), None),
]
UP = [
    (Hello(PROTOCOL_VERSION, 1234, "m/abc"), None),
    (LoadProgress("load", 0.5), None),
    (DownloadProgress("m.gguf", 10, 100, 5.0, 18.0, finished=False), None),
    (Ready(INFO), None),
    (LoadFailed(ErrorKind.LOAD_FAILED, "bad file"), None),
    (WorkerStatus(1, 2), None),
    (ResponseHead(7, 200, "text/event-stream"), None),
    (BodyChunk(7), b"data: {}\n\n"),
    (ResponseEnd(7), None),
    (ResponseStored(7, "resp_1", StoredTurn(b"{}", b"{\"id\": \"resp_1\"}")), None),
    (ResponseError(7, ErrorKind.CONTEXT_LENGTH_EXCEEDED, "too long", "messages"), None),
    (StreamStates(11, [StreamState("/a", True, 4096, 1.7e9, 1.7e9 + 3),
                       StreamState("/b", False, 0, 1.7e9, 0.0)]), None),
    (Heartbeat(3), None),
]


@pytest.mark.parametrize(("msg", "payload"), DOWN, ids=lambda v: type(v).__name__)
def test_downstream_round_trip(msg: object, payload: bytes | None) -> None:
    frames = RouterCodec().encode(msg, payload)  # type: ignore[arg-type]
    assert WorkerCodec().decode(frames) == (msg, payload)


@pytest.mark.parametrize(("msg", "payload"), UP, ids=lambda v: type(v).__name__)
def test_upstream_round_trip(msg: object, payload: bytes | None) -> None:
    frames = WorkerCodec().encode(msg, payload)  # type: ignore[arg-type]
    assert RouterCodec().decode(frames) == (msg, payload)


def test_every_message_type_is_covered() -> None:
    import typing

    from protocol import messages

    covered = {type(m) for m, _ in DOWN + UP}
    declared = set(typing.get_args(messages.Downstream)) | set(typing.get_args(messages.Upstream))
    assert declared == covered


def test_direction_is_enforced() -> None:
    # A worker->router message arriving at a worker is unknown there, not misread.
    frames = WorkerCodec().encode(ResponseEnd(1))
    with pytest.raises(UnknownMessage) as info:
        WorkerCodec().decode(frames)
    assert info.value.tag == "end"


def test_unknown_tag() -> None:
    frames = [msgspec.msgpack.encode({"t": "teleport", "req_id": 1})]
    with pytest.raises(UnknownMessage):
        RouterCodec().decode(frames)


@pytest.mark.parametrize("header", [b"", b"\xc1", b"\x92\x01", b"\x81\xa1t\xa4head",
                                    msgspec.msgpack.encode({"t": "head", "req_id": "x"}),
                                    msgspec.msgpack.encode([1, 2, 3])])
def test_malformed_headers(header: bytes) -> None:
    with pytest.raises(MalformedFrame):
        RouterCodec().decode([header])


def test_truncated_frame() -> None:
    frames = WorkerCodec().encode(Ready(INFO))
    for cut in range(len(frames[0])):
        with pytest.raises(ProtocolError):
            RouterCodec().decode([frames[0][:cut]])


def test_payload_presence_is_checked() -> None:
    with pytest.raises(MalformedFrame, match="missing its payload"):
        RouterCodec().decode(WorkerCodec().encode(BodyChunk(1)))
    with pytest.raises(MalformedFrame, match="unexpected payload"):
        RouterCodec().decode(WorkerCodec().encode(ResponseEnd(1), b"x"))
    with pytest.raises(MalformedFrame, match="frames"):
        RouterCodec().decode([])
    with pytest.raises(MalformedFrame, match="frames"):
        RouterCodec().decode([b"a", b"b", b"c"])


@given(st.lists(st.binary(max_size=64), min_size=0, max_size=3))
def test_decoder_never_raises_anything_but_protocol_errors(frames: list[bytes]) -> None:
    for codec in (RouterCodec(), WorkerCodec()):
        try:
            codec.decode(frames)
        except ProtocolError:
            pass


def test_version_mismatch_is_a_clear_error() -> None:
    check_hello(Hello(PROTOCOL_VERSION, 1, "w"))
    with pytest.raises(VersionMismatch, match="protocol version mismatch"):
        check_hello(Hello(PROTOCOL_VERSION + 1, 1, "w"))


def test_error_kinds_map_to_statuses_and_openai_body() -> None:
    expected = {ErrorKind.INVALID_REQUEST: 400, ErrorKind.AUTHENTICATION: 401, ErrorKind.NOT_FOUND: 404,
                ErrorKind.TOO_LARGE: 413, ErrorKind.RATE_LIMITED: 429, ErrorKind.WORKER_FAILED: 502,
                ErrorKind.UNAVAILABLE: 503, ErrorKind.CONTEXT_LENGTH_EXCEEDED: 400}
    for kind, status in expected.items():
        assert kind.status == status
    for kind in ErrorKind:
        body = msgspec.json.decode(error_body(kind, "msg"))
        assert body["error"]["message"] == "msg"
        assert body["error"]["code"] == kind.value
        assert body["error"]["type"].endswith("_error")
