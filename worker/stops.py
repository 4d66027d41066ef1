"""Where a generation stops: its end token, a stop string, its token limit or a cancel.
Backend-independent: each backend feeds token ids and says how to decode them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterable


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


def generate_text(tokens: Iterable[int], is_end: Callable[[int], bool], piece: Callable[[int], str],
                  flush: Callable[[], str], stops: list[str], limit: int,
                  cancel: threading.Event) -> Generator[str, None, tuple[str, int]]:
    """Yield the text of `tokens` until one of them ends the generation; return the finish
    reason ("stop" | "length") and how many tokens were generated (the end token not counted).

    `piece` decodes one token incrementally (UTF-8 may span tokens); `flush` returns what
    the decoder still holds at the end."""
    pending = ""
    count = 0
    reason = "length"
    hit = False
    for token in tokens:
        if is_end(token):
            reason = "stop"
            break
        count += 1
        text, pending, hit = split_at_stop(pending + piece(token), stops)
        if text:
            yield text
        if hit:
            reason = "stop"
            break
        # Checked after every token: a cancel stops generation before the next one.
        if count >= limit or cancel.is_set():
            break
    # After a stop string nothing more goes out, not even bytes the decoder still holds.
    if not hit and not cancel.is_set():
        tail = pending + flush()
        if tail:
            yield tail
    return reason, count
