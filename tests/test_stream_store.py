"""The worker's stream buffers and replay pump, without processes or sockets."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import ErrorKind
from protocol.messages import BodyChunk, ResponseEnd, ResponseError, ResponseHead, StreamSettings
from worker.streams import NOT_FOUND, OFFSET_LOST, Buffer, StreamStore


@given(st.integers(1, 64), st.lists(st.binary(max_size=40), max_size=60), st.data())
def test_buffer_keeps_the_newest_bytes_at_their_absolute_offsets(
        capacity: int, appends: list[bytes], data: st.DataObject) -> None:
    buf = Buffer(capacity)
    for a in appends:
        buf.append(a)
    everything = b"".join(appends)
    assert buf.total == len(everything)
    assert buf.base == max(0, buf.total - capacity)  # exactly the newest `capacity` bytes
    offset = data.draw(st.integers(buf.base, buf.total))
    limit = data.draw(st.integers(1, 100))
    got = b"".join(buf.read(offset, limit))
    assert len(got) >= min(limit, buf.total - offset)
    assert got == everything[offset:offset + len(got)]


def test_buffer_keeps_its_capacity_after_a_big_chunk() -> None:
    buf = Buffer(2048)
    buf.append(b"x" * 2000)
    buf.append(b"y" * 300)
    assert buf.base == 2300 - 2048
    assert b"".join(buf.read(buf.base, 4096)) == b"x" * 1748 + b"y" * 300


def test_buffer_drops_whole_chunks_and_compacts() -> None:
    buf = Buffer(1000)
    for i in range(5000):
        buf.append(b"%04d|" % i)
    assert buf.total == 25000 and buf.base == 24000
    assert b"".join(buf.read(24000, 10))[:10] == b"4800|4801|"
    assert len(buf._chunks) < 1000  # dropped chunks do not pile up


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _store(buffer_bytes: int = 1 << 20, retention: float = 300.0, max_streams: int = 100) -> tuple[
        StreamStore, Clock]:
    clock = Clock()
    return StreamStore(StreamSettings(buffer_bytes, retention, max_streams), wall=lambda: 1.7e9,
                       clock=clock), clock


class Stops:
    """Records why each generation was asked to stop."""

    def __init__(self) -> None:
        self.reasons: dict[int, str] = {}

    def of(self, req_id: int) -> Callable[[str], None]:
        return lambda why: self.reasons.__setitem__(req_id, why)


def test_lookup_delete_and_replacement() -> None:
    store, clock = _store()
    stops = Stops()
    a = store.open("/a", 1, stops.of(1))
    store.append(a, b"data: x\n\n")
    assert [(s.key, s.is_done, s.total_bytes, s.completed_at) for s in store.lookup(["/a", "/zz"])] == [
        ("/a", False, 9, 0.0)]
    # A newer request for the key stops the running one and starts from zero.
    a2 = store.open("/a", 2, stops.of(2))
    assert stops.reasons == {1: "a newer request took over this conversation"}
    assert store.lookup(["/a"])[0].total_bytes == 0
    store.finish(a)  # the replaced one ending does not bring it back, nor expire its successor
    assert len(store) == 1
    clock.now += 10_000
    assert [s.key for s in store.lookup(["/a"])] == ["/a"]
    # Delete stops a running generation, frees it, and is idempotent.
    assert [s.key for s in store.delete(["/a", "/a", "/zz"], "deleted!")] == ["/a"]
    assert stops.reasons[2] == "deleted!"
    assert store.delete(["/a"], "again") == []
    assert store.lookup(["/a"]) == []
    store.finish(a2)
    assert len(store) == 0


def test_finished_streams_expire_after_retention_and_beyond_the_bound() -> None:
    store, clock = _store(retention=300, max_streams=3)
    for i in range(5):
        s = store.open(f"/c{i}", i, lambda why: None)
        store.finish(s)
        clock.now += 1
    running = store.open("/run", 9, lambda why: None)
    assert [s.key for s in store.lookup([f"/c{i}" for i in range(5)])] == ["/c2", "/c3", "/c4"]
    clock.now += 298.5  # c2 finished at 1002 and expires at 1302; now 1303.5
    assert [s.key for s in store.lookup(["/c2", "/c3", "/c4", "/run"])] == ["/c4", "/run"]
    clock.now += 10_000  # a running stream never expires
    assert [s.key for s in store.lookup(["/c4", "/run"])] == ["/run"]
    store.finish(running)


def test_finished_streams_fit_the_byte_budget_oldest_freed_first() -> None:
    clock = Clock()
    store = StreamStore(StreamSettings(1000, 300, 100, max_bytes=2500), clock=clock)
    for i in range(4):
        s = store.open(f"/c{i}", i, lambda why: None)
        store.append(s, b"x" * 900)
        store.finish(s)
    assert [s.key for s in store.lookup([f"/c{i}" for i in range(4)])] == ["/c2", "/c3"]
    store.delete(["/c2"], "bye")
    s = store.open("/c4", 4, lambda why: None)
    store.append(s, b"x" * 900)
    store.finish(s)  # 1800 bytes kept, within the budget: nothing else goes
    assert [s.key for s in store.lookup(["/c3", "/c4"])] == ["/c3", "/c4"]
    alone = StreamStore(StreamSettings(1000, 300, 100, max_bytes=10), clock=clock)
    big = alone.open("/big", 1, lambda why: None)
    alone.append(big, b"x" * 900)
    alone.finish(big)  # over the budget alone, but the newest is kept
    assert len(alone) == 1


def test_a_failed_request_leaves_nothing_to_resume() -> None:
    store, _ = _store()
    s = store.open("/a", 1, lambda why: None)
    store.discard(s)
    assert store.lookup(["/a"]) == []
    assert store.attach(5, "/a", 0) == (ErrorKind.NOT_FOUND, NOT_FOUND)


class Sent:
    """What the pump sent, with a condition to wait on (the pump runs in its own thread)."""

    def __init__(self) -> None:
        self.frames: list[tuple[object, bytes | None]] = []
        self._cond = threading.Condition()
        # Set `release` to make the pump stop in its next head's send (outside the store's
        # lock) until the test sets it; `headed` tells the test it got there.
        self.release: threading.Event | None = None
        self.headed = threading.Event()

    def __call__(self, msg: object, payload: bytes | None = None) -> None:
        with self._cond:
            self.frames.append((msg, payload))
            self._cond.notify_all()
        if self.release is not None and isinstance(msg, ResponseHead):
            self.headed.set()
            assert self.release.wait(10)

    def wait_end(self, req_id: int, timeout: float = 10) -> None:
        def ended() -> bool:
            return any(isinstance(m, ResponseEnd | ResponseError) and m.req_id == req_id
                       for m, _ in self.frames)
        with self._cond:
            assert self._cond.wait_for(ended, timeout), self.frames

    def wait_for(self, predicate: Callable[[list[tuple[object, bytes | None]]], bool],
                 timeout: float = 10) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: predicate(self.frames), timeout), self.frames

    def replayed(self, req_id: int) -> tuple[list[type], bytes]:
        with self._cond:
            mine = [(m, p) for m, p in self.frames if getattr(m, "req_id", None) == req_id]
        return [type(m) for m, _ in mine], b"".join(p or b"" for m, p in mine if isinstance(m, BodyChunk))


@contextmanager
def pumping(store: StreamStore) -> Iterator[Sent]:
    sent = Sent()
    thread = threading.Thread(target=store.pump, args=(sent,))
    thread.start()
    try:
        yield sent
    finally:
        store.close()
        thread.join(10)
        assert not thread.is_alive()


def test_replay_then_follow_live_then_end() -> None:
    store, _ = _store()
    s = store.open("/a", 1, lambda why: None)
    store.append(s, b"data: 1\n\n")
    with pumping(store) as sent:
        assert store.attach(7, "/a", 6) is None
        store.append(s, b"data: 2\n\n")
        store.append(s, b"data: [DONE]\n\n")
        store.finish(s)
        sent.wait_end(7)
        # Past the end of a finished stream: an empty, complete answer.
        assert store.attach(8, "/a", 10_000) is None
        sent.wait_end(8)
    kinds, data = sent.replayed(7)
    assert kinds[0] is ResponseHead and kinds[-1] is ResponseEnd
    assert data == b"1\n\ndata: 2\n\ndata: [DONE]\n\n"
    assert sent.replayed(8) == ([ResponseHead, ResponseEnd], b"")


def test_an_offset_the_buffer_dropped_is_refused() -> None:
    store, _ = _store(buffer_bytes=1024)
    s = store.open("/a", 1, lambda why: None)
    for i in range(100):
        store.append(s, b"data: %03d\n\n" % i)
    store.finish(s)
    assert store.attach(3, "/a", 0) == (ErrorKind.INVALID_REQUEST, OFFSET_LOST)
    base = s.buffer.base
    with pumping(store) as sent:
        assert store.attach(4, "/a", base) is None
        sent.wait_end(4)
    assert sent.replayed(4)[1] == b"".join(b"data: %03d\n\n" % i for i in range(100))[base:]


def test_a_reader_that_leaves_is_dropped_and_the_stream_goes_on() -> None:
    store, _ = _store()
    s = store.open("/a", 1, lambda why: None)
    with pumping(store) as sent:
        assert store.attach(7, "/a", 0) is None
        store.detach(7)
        store.append(s, b"data: 1\n\n")
        store.finish(s)
        assert store.attach(8, "/a", 0) is None
        sent.wait_end(8)
    assert sent.replayed(8)[1] == b"data: 1\n\n"
    assert sent.replayed(7)[0] == []
    assert s.readers == 0


def test_a_reader_that_caught_up_gets_its_end_when_the_stream_finishes() -> None:
    store, _ = _store()
    s = store.open("/a", 1, lambda why: None)
    store.append(s, b"data: 1\n\n")
    with pumping(store) as sent:
        assert store.attach(7, "/a", 0) is None
        sent.wait_for(lambda frames: any(isinstance(m, BodyChunk) for m, _ in frames))
        store.finish(s)  # nothing appended: only the end is news
        sent.wait_end(7)
    assert sent.replayed(7) == ([ResponseHead, BodyChunk, ResponseEnd], b"data: 1\n\n")


def test_a_reader_left_behind_by_the_buffer_gets_an_error_event_not_a_gap() -> None:
    store, _ = _store(buffer_bytes=1024)
    s = store.open("/a", 1, lambda why: None)
    store.append(s, b"a" * 100)
    with pumping(store) as sent:
        sent.release = release = threading.Event()
        try:
            assert store.attach(7, "/a", 0) is None
            assert sent.headed.wait(10)
            for _ in range(30):  # meanwhile the stream runs 3 KB ahead: the first turn's bytes are gone
                store.append(s, b"b" * 100)
        finally:
            release.set()
        sent.wait_end(7)
    kinds, data = sent.replayed(7)
    assert kinds[0] is ResponseHead and kinds[-1] is ResponseEnd
    assert data.startswith(b"a" * 100) and data.endswith(b"Stream offset lost, please restart"
                                                         b'","type":"invalid_request_error",'
                                                         b'"code":"invalid_request","param":null}}\n\n')
