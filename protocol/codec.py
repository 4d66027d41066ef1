"""Frame encoding and decoding, one encoder and one decoder per direction.

A message is one or two frames: ``[header]`` or ``[header, payload]``. The
router's ROUTER socket adds the peer identity in front; that is not the
codec's business. Decoding never raises anything but `ProtocolError`, so a
reader loop can log and drop a bad frame and carry on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

import msgspec

from protocol.messages import (
    PROTOCOL_VERSION,
    WITH_PAYLOAD,
    Downstream,
    Hello,
    Upstream,
)


class ProtocolError(Exception):
    """Base of every decoding failure."""


class MalformedFrame(ProtocolError):
    """The frames are not a message: bad msgpack, wrong shape, wrong frame count."""


class UnknownMessage(ProtocolError):
    """A well-formed frame whose tag this side does not know."""

    def __init__(self, tag: str) -> None:
        super().__init__(f"unknown message tag {tag!r}")
        self.tag = tag


class VersionMismatch(ProtocolError):
    def __init__(self, ours: int, theirs: int) -> None:
        super().__init__(
            f"protocol version mismatch: router speaks {ours}, worker speaks {theirs}; "
            "reinstall modelherd so both come from the same release"
        )
        self.ours = ours
        self.theirs = theirs


class _TagOnly(msgspec.Struct):
    t: str


Frames = list[bytes]
Out = TypeVar("Out")
In = TypeVar("In")


class _Codec(Generic[Out, In]):
    def __init__(self, outgoing: type[Out], incoming: type[In]) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder: msgspec.msgpack.Decoder[In] = msgspec.msgpack.Decoder(incoming)
        self._tag_decoder = msgspec.msgpack.Decoder(_TagOnly)
        self._outgoing = outgoing

    def encode(self, msg: Out, payload: bytes | memoryview | None = None) -> Frames:
        header = self._encoder.encode(msg)
        if payload is None:
            return [header]
        return [header, bytes(payload)]

    def decode(self, frames: Sequence[bytes | memoryview]) -> tuple[In, bytes | None]:
        if not 1 <= len(frames) <= 2:
            raise MalformedFrame(f"expected 1 or 2 frames, got {len(frames)}")
        try:
            msg = self._decoder.decode(frames[0])
        except msgspec.ValidationError as exc:
            raise self._classify(frames[0], exc) from exc
        except msgspec.DecodeError as exc:
            raise MalformedFrame(f"undecodable header: {exc}") from exc
        payload = bytes(frames[1]) if len(frames) == 2 else None
        wants_payload = isinstance(msg, WITH_PAYLOAD)
        if wants_payload and payload is None:
            raise MalformedFrame(f"{type(msg).__name__} is missing its payload frame")
        if not wants_payload and payload is not None:
            raise MalformedFrame(f"{type(msg).__name__} carries an unexpected payload frame")
        return msg, payload

    def _classify(self, header: bytes | memoryview, exc: msgspec.ValidationError) -> ProtocolError:
        try:
            tag = self._tag_decoder.decode(header).t
        except (msgspec.ValidationError, msgspec.DecodeError):
            return MalformedFrame(f"invalid header: {exc}")
        if "`$.t`" in str(exc) and "Invalid value" in str(exc):
            return UnknownMessage(tag)
        return MalformedFrame(f"invalid {tag!r} message: {exc}")


class RouterCodec(_Codec[Downstream, Upstream]):
    """The router's side: encodes router -> worker, decodes worker -> router."""

    def __init__(self) -> None:
        super().__init__(Downstream, Upstream)  # type: ignore[arg-type]


class WorkerCodec(_Codec[Upstream, Downstream]):
    """The worker's side: encodes worker -> router, decodes router -> worker."""

    def __init__(self) -> None:
        super().__init__(Upstream, Downstream)  # type: ignore[arg-type]


def check_hello(hello: Hello) -> None:
    """Raise VersionMismatch unless the worker speaks our protocol version."""
    if hello.protocol_version != PROTOCOL_VERSION:
        raise VersionMismatch(PROTOCOL_VERSION, hello.protocol_version)
