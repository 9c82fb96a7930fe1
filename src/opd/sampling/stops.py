"""What ends a completion: any of several EOS ids, or a stop string."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def end_ids_tensor(eos_id: int | Sequence[int], device) -> torch.Tensor:
    """The ids that end a completion as a tensor for `torch.isin` (one id or several:
    Qwen's generation_config lists `<|im_end|>` and `<|endoftext|>`)."""
    ids = [eos_id] if isinstance(eos_id, int) else list(eos_id)
    if not ids:
        raise ValueError("at least one EOS id is needed to sample")
    return torch.tensor(ids, dtype=torch.long, device=device)


def mark_stop_strings(done, tokens, t: int, rows, stop: tuple[str, ...], tokenizer) -> None:
    """Mark done each row in `rows` whose text up to column `t` now ends in a stop string.

    Only the last few tokens are decoded: as many as the longest stop string has UTF-8
    bytes. Every token is at least one byte (byte-level BPE, byte fallback) but may be less
    than a character (a 3-byte character split over tokens), so counting characters could
    cut a stop string's first character in half. A window that starts mid-character
    decodes to a replacement character before the stop string, which does not hide it."""
    longest = max(len(s.encode("utf-8")) for s in stop)
    for i in rows:
        if not done[i]:
            tail = tokenizer.decode(tokens[i, max(0, t + 1 - longest) : t + 1].tolist())
            if any(s in tail for s in stop):
                done[i] = True
