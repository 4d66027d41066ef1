from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from worker.choice import split_at_stop


def feed(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    out, pending = "", ""
    for piece in pieces:
        text, pending, hit = split_at_stop(pending + piece, tuple(stops))
        out += text
        if hit:
            return out, True
    return out + pending, False


def test_stop_across_pieces_is_never_emitted() -> None:
    assert feed(["Hel", "lo <", "|e", "nd|> tail"], ["<|end|>"]) == ("Hello ", True)
    assert feed(["a<", "b"], ["<|end|>"]) == ("a<b", False)


@given(st.lists(st.text(alphabet="ab<>|", max_size=5), max_size=12),
       st.lists(st.text(alphabet="ab<>|", min_size=1, max_size=4), max_size=3))
def test_output_is_the_text_before_the_first_stop(pieces: list[str], stops: list[str]) -> None:
    full = "".join(pieces)
    out, hit = feed(pieces, stops)
    cuts = [full.find(s) for s in stops if s in full]
    if hit:
        # The earliest stop string that completes first; the output never contains a stop.
        assert not any(s in out for s in stops)
        assert full.startswith(out)
    else:
        assert not cuts and out == full
