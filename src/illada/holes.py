r"""Text with holes: the `<|mask:N|>` placeholder syntax of `illada infill`, `DiffusionLM.infill` and the server.

    The capital of France is <|mask:3|>, a city known for <|mask:8|>.

`<|mask:N|>` is a hole of exactly N tokens (N a positive decimal integer). Escapes:

- `\<|mask:3|>` is the literal text `<|mask:3|>` (one backslash before `<|mask:` makes it text);
- `\\<|mask:3|>` is a literal backslash followed by a 3-token hole (a run of k backslashes before `<|mask:`
  gives k // 2 backslashes, and the placeholder is literal when k is odd);
- backslashes anywhere else are plain text.

Errors (one line each, `IlladaError`): an unclosed placeholder (`<|mask:3` without `|>`), a length that is not an
integer, zero or negative, and text without any placeholder.
"""
from __future__ import annotations

import re
from typing import Sequence, Union

from illada.errors import IlladaError

OPEN, CLOSE = "<|mask:", "|>"
Piece = Union[str, int]  # literal text, or a hole of that many tokens
_LENGTH = re.compile(r"[+-]?\d+")


def parse_holes(text: str) -> list[Piece]:
    """`text` as alternating literal pieces (unescaped) and hole lengths; raises IlladaError on bad syntax."""
    pieces: list[Piece] = []
    literal: list[str] = []
    i = 0
    while True:
        j = text.find(OPEN, i)
        if j < 0:
            literal.append(text[i:])
            break
        k = j
        while k > i and text[k - 1] == "\\":
            k -= 1
        slashes = j - k
        literal.append(text[i:k] + "\\" * (slashes // 2))
        if slashes % 2:  # escaped: the placeholder is text
            literal.append(OPEN)
            i = j + len(OPEN)
            continue
        end = text.find(CLOSE, j + len(OPEN))
        if end < 0:
            raise IlladaError(f"unclosed placeholder at character {j}: {OPEN}N{CLOSE} needs its closing {CLOSE!r}")
        body = text[j + len(OPEN):end]
        if not _LENGTH.fullmatch(body.strip()):
            raise IlladaError(f"placeholder at character {j}: the length {body!r} is not an integer "
                              f"(write {OPEN}N{CLOSE}, e.g. {OPEN}5{CLOSE})")
        length = int(body)
        if length < 1:
            raise IlladaError(f"placeholder at character {j}: the length must be a positive number of tokens, "
                              f"got {length}")
        pieces.append("".join(literal))
        pieces.append(length)
        literal = []
        i = end + len(CLOSE)
    pieces.append("".join(literal))
    if not any(isinstance(p, int) for p in pieces):
        raise IlladaError(f"no hole in the text: mark each one as {OPEN}N{CLOSE} (N tokens), e.g. "
                          f"'The capital of France is {OPEN}3{CLOSE}.'")
    return [p for p in pieces if p != ""]


def escape(text: str) -> str:
    r"""`text` with every `<|mask:` made literal: `parse_holes` gives `text` back for it (a placeholder written
    right after it is escaped too if `text` ends in a backslash)."""
    return re.sub(r"(\\*)" + re.escape(OPEN), lambda m: m.group(1) * 2 + "\\" + OPEN, text)


def edit_pieces(text: str, spans: Sequence[Sequence[int]], token_count, lengths: Sequence[int] | None = None
                ) -> list[Piece]:
    """Pieces for regenerating the character `spans` [(start, end), ...] of `text`: the text between them kept,
    each span a hole of `lengths[i]` tokens or, by default, as many tokens as `token_count(span text)`."""
    if isinstance(spans, (str, bytes)) or not isinstance(spans, Sequence) or not spans:
        raise IlladaError("edit: spans must be a non-empty list of (start, end) character offsets")
    pairs = []
    for span in spans:
        if (not isinstance(span, Sequence) or len(span) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)):
            raise IlladaError(f"edit: each span must be a (start, end) pair of integers, got {span!r}")
        pairs.append((span[0], span[1]))
    if lengths is not None and (len(lengths) != len(pairs) or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths)):
        raise IlladaError(f"edit: lengths must be one positive integer per span, got {list(lengths)}")
    order = sorted(range(len(pairs)), key=lambda i: pairs[i])
    pieces: list[Piece] = []
    at = 0
    for i in order:
        start, end = pairs[i]
        if not 0 <= start < end <= len(text):
            raise IlladaError(f"edit: span ({start}, {end}) is empty or outside the text (0..{len(text)})")
        if start < at:
            raise IlladaError(f"edit: span ({start}, {end}) overlaps the span before it")
        length = lengths[i] if lengths is not None else max(1, token_count(text[start:end]))
        pieces += [text[at:start], length]
        at = end
    pieces.append(text[at:])
    return [p for p in pieces if p != ""]
