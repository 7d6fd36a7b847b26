"""Stop strings that test "the earliest match wins": two stops found where one token ends, the later-listed
one starting earlier in the text (shared by the engine and server tests)."""

from __future__ import annotations


def stops_completing_together(tokenizer, text: str, ids: list[int]) -> tuple[str, str] | None:
    """``(a, b)``, both first found where one token ends: ``b`` spans that token's start (two tokens' text) and
    so starts before ``a``, the rest of the token. None when the text has no such token."""
    pos = 0
    for first, second in zip(ids, ids[1:]):
        left, right = tokenizer.decode([first]), tokenizer.decode([second])
        pos += len(left)  # where ``second``'s text starts
        if text[pos - len(left):pos + len(right)] != left + right or len(right) < 2:
            continue  # part of a UTF-8 character, or too short to split
        a, b = right[1:], left[-1] + right[0]
        if text.find(a) == pos + 1 and text.find(b) == pos - 1:
            return a, b
    return None
