"""The pure admission decision: who is evicted, who waits, what can never fit."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from router.admission import MIB, Admit, Holder, Refuse, Wait, plan


def h(name: str, last_used: float, evictable: bool = True, pinned: bool = False,
      mib: int = 100) -> Holder:
    return Holder(name, evictable and not pinned, pinned, last_used, mib * MIB)


def test_room_left_admits_without_victims() -> None:
    assert plan(100 * MIB, [h("a", 1)], max_models=2, available=None) == Admit(())


def test_full_pool_evicts_the_least_recently_used_idle_model() -> None:
    holders = [h("a", 3), h("b", 1), h("c", 2)]
    assert plan(MIB, holders, max_models=3, available=None) == Admit(("b",))


def test_busy_models_are_never_victims_so_the_newcomer_waits() -> None:
    holders = [h("a", 1, evictable=False), h("b", 2, evictable=False)]
    decision = plan(MIB, holders, max_models=2, available=None)
    assert isinstance(decision, Wait) and "a, b" in decision.reason


def test_pinned_models_filling_the_cap_refuse() -> None:
    decision = plan(MIB, [h("p", 1, pinned=True)], max_models=1, available=None)
    assert isinstance(decision, Refuse) and not decision.memory


def test_memory_evicts_in_lru_order_until_it_fits() -> None:
    holders = [h("a", 1, mib=50), h("b", 2, mib=300), h("c", 3, mib=300)]
    assert plan(400 * MIB, holders, max_models=0, available=100 * MIB) == Admit(("a", "b"))


def test_memory_that_can_never_suffice_refuses_with_numbers() -> None:
    decision = plan(1000 * MIB, [h("a", 1, mib=100)], max_models=0, available=200 * MIB)
    assert isinstance(decision, Refuse) and decision.memory
    assert "1000 MiB" in decision.reason and "300 MiB" in decision.reason


def test_memory_held_by_a_busy_model_means_wait() -> None:
    decision = plan(250 * MIB, [h("a", 1, evictable=False)], max_models=0, available=200 * MIB)
    assert isinstance(decision, Wait) and "memory is short" in decision.reason


def test_no_cap_and_no_memory_check_always_admits() -> None:
    assert plan(10**15, [h(str(i), i, evictable=False) for i in range(50)], 0, None) == Admit(())


holder_lists = st.lists(
    st.builds(h, name=st.text("abcdefgh", min_size=1, max_size=3), last_used=st.floats(0, 100),
              evictable=st.booleans(), pinned=st.booleans(), mib=st.integers(0, 1000)),
    max_size=8, unique_by=lambda x: x.name)


@given(holder_lists, st.integers(0, 2000), st.integers(0, 6), st.one_of(st.none(), st.integers(-500, 3000)))
def test_decisions_are_consistent(holders: list[Holder], need_mib: int, max_models: int,
                                  available_mib: int | None) -> None:
    need = need_mib * MIB
    available = None if available_mib is None else available_mib * MIB
    decision = plan(need, holders, max_models, available)
    by_name = {x.name: x for x in holders}
    if isinstance(decision, Admit):
        victims = [by_name[v] for v in decision.victims]
        assert all(v.evictable and not v.pinned for v in victims)
        # Victims are the least recently used idle models, in that order.
        idle = sorted((x for x in holders if x.evictable), key=lambda x: (x.last_used, x.name))
        assert victims == idle[: len(victims)]
        # After the evictions the newcomer fits.
        if max_models:
            assert len(holders) - len(victims) + 1 <= max_models
        if available is not None:
            assert need <= available + sum(v.footprint for v in victims)
        # And no eviction was needless: without the last victim it would not fit.
        if victims:
            fewer = victims[:-1]
            fits_slots = not max_models or len(holders) - len(fewer) + 1 <= max_models
            fits_bytes = available is None or need <= available + sum(v.footprint for v in fewer)
            assert not (fits_slots and fits_bytes)
    elif isinstance(decision, Refuse):
        # Even with every unpinned model gone it would not fit.
        movable = [x for x in holders if not x.pinned]
        fits_slots = not max_models or len(holders) - len(movable) + 1 <= max_models
        fits_bytes = available is None or need <= available + sum(x.footprint for x in movable)
        assert not (fits_slots and fits_bytes)
    else:
        assert isinstance(decision, Wait)
        assert any(not x.evictable and not x.pinned for x in holders)
