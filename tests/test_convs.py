"""The conversation tracker, without a daemon: bound, expiry, owners, '::' lookups."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from router.convs import Conversation, Tracker, conversation_id, stream_key
from router.errors import HTTPError


class Worker:
    def __init__(self, identity: bytes) -> None:
        self.identity = identity


class Post:
    """What the tracker holds of an exchange: its stream key and, once it runs, its worker."""

    def __init__(self, key: str) -> None:
        self.stream_key = key
        self.worker: Worker | None = None


def begin(t: Tracker, owner: str, conv_id: str, model: str) -> tuple[Conversation, Conversation | None]:
    return t.begin(conv_id, model, Post(stream_key(owner, conv_id)))  # type: ignore[arg-type]


def assign(conv: Conversation, identity: bytes) -> None:
    conv.exchange.worker = Worker(identity)  # type: ignore[assignment]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_new_post_replaces_the_entry_and_returns_the_old_one() -> None:
    t = Tracker(10, 300)
    first, old = begin(t, "", "c", "m1")
    assert old is None
    assign(first, b"m1/w")
    second, old = begin(t, "", "c", "m2")
    assert old is first and t.get("", "c") is second
    t.remove(first)  # the replaced POST finishing late must not drop its successor
    t.finish(first)
    assert t.get("", "c") is second and len(t) == 1


def test_owners_never_see_each_other() -> None:
    t = Tracker(10, 300)
    a, _ = begin(t, "k1", "shared", "m")
    b, old = begin(t, "k2", "shared", "m")
    assert old is None and a.key != b.key
    assert t.get("k1", "shared") is a and t.get("k2", "shared") is b
    assert t.get("", "shared") is None
    assert t.find("k2", ["shared"]) == [b]


def test_lookup_finds_the_id_and_the_ids_it_prefixes_with_double_colon() -> None:
    t = Tracker(10, 300)
    plain, _ = begin(t, "", "conv", "m")
    on_a, _ = begin(t, "", "conv::model-a", "a")
    on_b, _ = begin(t, "", "conv::org/model-b", "b")
    begin(t, "", "conversation", "m")  # a longer id, not a '::' suffix
    other, _ = begin(t, "k", "conv::x", "m")
    assert set(t.find("", ["conv"])) == {plain, on_a, on_b}
    assert t.find("", ["conv::model-a", "conv::model-a"]) == [on_a]
    t.remove(on_a)
    assert set(t.find("", ["conv"])) == {plain, on_b}
    assert t.find("k", ["conv"]) == [other]


def test_finished_entries_expire_after_retention_running_ones_never() -> None:
    clock = Clock()
    t = Tracker(10, 300, clock=clock)
    done, _ = begin(t, "", "done", "m")
    running, _ = begin(t, "", "running", "m")
    t.finish(done)
    clock.now = 299.9
    assert t.get("", "done") is done
    clock.now = 300.0
    assert t.get("", "done") is None
    clock.now = 1e9
    assert t.get("", "running") is running


def test_the_bound_evicts_the_least_recently_used_and_says_so() -> None:
    evicted: list[str] = []
    t = Tracker(3, 300, on_evict=lambda conv: evicted.append(conv.conv_id))
    for c in "abc":
        begin(t, "", c, "m")
    t.get("", "a")  # used: now b is the least recent
    begin(t, "", "d", "m")
    assert [c.conv_id for c in t] == ["c", "a", "d"]
    assert evicted == ["b"]
    begin(t, "", "d", "m")  # a replacement is not an eviction
    t.remove(t.get("", "c"))  # type: ignore[arg-type]
    assert evicted == ["b"]


def test_memory_stays_flat_under_ten_thousand_conversations() -> None:
    bound = 1000
    t = Tracker(bound, 300)

    def churn(start: int, count: int) -> None:
        for i in range(start, start + count):
            conv, _ = begin(t, "0123456789abcdef", f"conversation-{i:08d}::model/{i % 7}", "org/model")
            assign(conv, b"org/model/abcd1234")
            if i % 2:
                t.finish(conv)

    tracemalloc.start()
    try:
        churn(0, 2 * bound)  # fill, and settle every internal table at its steady size
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        churn(2 * bound, 10_000)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(t) == bound
    assert len(t._prefixed) <= bound and len(t._finished) <= bound
    # 10,000 more conversations through a full tracker: what it holds is replaced, not
    # added to. (One entry costs ~1 KB, so growth with the count would be megabytes.)
    assert grown < 64 * 1024, f"tracker grew by {grown} bytes"


@pytest.mark.parametrize("bad", ["", "x" * 129, "tab\there", "é", "new\nline"])
def test_conversation_ids_are_printable_ascii_up_to_128(bad: str) -> None:
    with pytest.raises(HTTPError) as err:
        conversation_id(bad)
    assert err.value.kind.status == 400


def test_a_valid_id_may_hold_spaces_slashes_and_colons() -> None:
    assert conversation_id("user 42/chat::org/model") == "user 42/chat::org/model"
    assert conversation_id("x" * 128) == "x" * 128
