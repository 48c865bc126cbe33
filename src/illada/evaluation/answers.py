"""Answer extraction and comparison for generation tasks: GSM8K-style numbers and multiple-choice letters."""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A number as people write it: optional sign (ASCII or Unicode minus), digits with optional thousands separators,
# optional decimals; or a bare decimal like ".5".
_NUMBER = re.compile(r"(?<![\w.])[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])[-\u2212]?\.\d+")
# \frac{a}{b} (or \dfrac) and a/b
_FRACTION = re.compile(r"\\d?frac\s*\{\s*([-\u2212]?\d+)\s*\}\s*\{\s*(\d+)\s*\}"
                       r"|(?<![\w.])([-\u2212]?\d+)\s*/\s*(\d+)(?![\w.])")
_MARKER = re.compile(r"####\s*([^\n]*)")
_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*([^\n]*)", re.IGNORECASE)
_THINK_END = "</think>"


def normalize_number(text: str) -> str | None:
    """Canonical string of the first number in `text` ("$1,234.50" -> "1234.5", "−3" -> "-3", "7.0" -> "7",
    "3/4" and "\\frac{3}{4}" -> "0.75"), or None when there is none."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    fraction = _FRACTION.search(text)
    try:
        if fraction is not None and fraction.start() <= match.start() and int(fraction.group(2) or fraction.group(4)):
            top, bottom = (fraction.group(1), fraction.group(2)) if fraction.group(1) else fraction.group(3, 4)
            value = Decimal(top.replace("\u2212", "-")) / Decimal(bottom)
        else:
            value = Decimal(match.group(0).replace("\u2212", "-").replace(",", ""))
        if value == value.to_integral_value():
            # an integer of more digits than the decimal context holds is kept as written
            return str(value.quantize(Decimal(1))) if value.adjusted() < 28 else format(value, "f")
        return format(value.normalize(), "f")
    except InvalidOperation:
        return None


def last_number(text: str) -> str | None:
    """Canonical form of the last number in `text`."""
    matches = _NUMBER.findall(text)
    return normalize_number(matches[-1]) if matches else None


def _boxed_content(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, i = 1, starts[-1]
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[starts[-1]:i - 1] if depth == 0 else None


def strip_reasoning(text: str) -> str:
    """The part after the last `</think>` (an instruct model's answer), or the whole text."""
    return text.rsplit(_THINK_END, 1)[-1] if _THINK_END in text else text


def extract_gold(answer: str | int | float) -> str | None:
    """Reference answer of a GSM8K record: the number after the last `####` (the dataset has one), else the last
    number in the field."""
    if isinstance(answer, (int, float)):
        return normalize_number(str(answer))
    markers = _MARKER.findall(answer)
    if markers:
        return normalize_number(markers[-1])
    return last_number(answer)


def extract_answer(output: str) -> str | None:
    """The model's numeric answer: the first `#### N` (a model that runs on writes its own next question and
    answer after it), else the last \\boxed{...}, else "the answer is N", else the last number; reasoning inside
    <think>...</think> is ignored when an answer follows it."""
    text = strip_reasoning(output)
    for candidate in _MARKER.findall(text):
        number = normalize_number(candidate)
        if number is not None:
            return number
    boxed = _boxed_content(text)
    if boxed is not None and normalize_number(boxed) is not None:
        return normalize_number(boxed)
    said = _ANSWER_IS.findall(text)
    if said and normalize_number(said[-1]) is not None:
        return normalize_number(said[-1])
    return last_number(text)


def numbers_equal(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return a == b


def extract_letter(output: str, num_choices: int) -> str | None:
    """The choice letter of an answer: the first standalone capital A, B, ... ("B", "(C)", "Answer: D."), or a
    lone lower-case letter ("b)"); None when there is none."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:num_choices]
    text = strip_reasoning(output).strip()
    match = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text)
    if match:
        return match.group(1)
    match = re.fullmatch(rf"\(?([{letters.lower()}])[).:]?", text)
    return match.group(1).upper() if match else None
