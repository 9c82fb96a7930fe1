"""Stop strings: mark rows whose decoded completion now ends in one."""

from __future__ import annotations


def mark_stop_strings(done, tokens, t: int, rows, stop: tuple[str, ...], tokenizer) -> None:
    """Mark done each row in `rows` whose text up to column `t` now ends in a stop string.

    Only the last `len(longest stop)` tokens are decoded: every token is at least a
    character, so a stop string that just appeared lies within them."""
    longest = max(len(s) for s in stop)
    for i in rows:
        if not done[i]:
            tail = tokenizer.decode(tokens[i, max(0, t + 1 - longest) : t + 1].tolist())
            if any(s in tail for s in stop):
                done[i] = True
