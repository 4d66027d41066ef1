"""Stop strings over a stream of text pieces, backend-independent."""

from __future__ import annotations


def split_at_stop(text: str, stops: list[str]) -> tuple[str, str, bool]:
    """(text to emit now, text to hold back, whether a stop string was hit).

    Text that could be the start of a stop string is held back until the next
    piece decides it, so a stop string never reaches the client, even in part.
    """
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], "", True
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return text[: len(text) - hold], text[len(text) - hold:], False
