"""Verifiers: is a sampled answer right? Picked by registry name in a recipe.

A verifier is built from its parameters and called as ``verify(response, reference)``
→ :class:`Verdict`. ``reference`` is the dataset's answer field as it stands (for GSM8K
the whole worked solution ending in ``#### N``; the verifier extracts what it needs).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation

from ..errors import DKError
from ..registry import Registry

VERIFIERS = Registry("verifier")


@dataclass(frozen=True)
class Verdict:
    correct: bool
    predicted: str | None  # the extracted answer (None: none found)
    expected: str | None

    def to_dict(self) -> dict:
        return asdict(self)


Verifier = Callable[[str, str], Verdict]

_FINAL = re.compile(r"####\s*([^\n]*)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_number(text: str | None) -> str | None:
    """``"$1,234.50."`` → ``"1234.5"``; None when ``text`` holds no number."""
    if text is None:
        return None
    m = _NUMBER.search(text.replace("$", ""))
    if not m:
        return None
    try:
        d = Decimal(m.group(0).replace(",", ""))
    except InvalidOperation:
        return None
    d = d.normalize()
    s = format(d, "f")
    return "0" if s in ("-0", "") else s


def final_answer(text: str) -> str | None:
    """The number after the last ``####`` (GSM8K's answer marker), normalized."""
    hits = _FINAL.findall(text)
    return normalize_number(hits[-1]) if hits else None


@VERIFIERS.register("gsm8k")
def gsm8k(fallback_last_number: bool = False) -> Verifier:
    """Final numeric answer after ``#### `` equals the reference's (numbers compared
    after removing ``$``, commas and trailing zeros). With ``fallback_last_number``, an
    answer without ``####`` is judged by its last number."""

    def verify(response: str, reference: str) -> Verdict:
        expected = final_answer(reference)
        if expected is None:
            expected = normalize_number(reference)
        pred = final_answer(response)
        if pred is None and fallback_last_number:
            nums = _NUMBER.findall(response.replace("$", ""))
            pred = normalize_number(nums[-1]) if nums else None
        return Verdict(pred is not None and pred == expected, pred, expected)

    return verify


@VERIFIERS.register("exact")
def exact(strip: bool = True, case_sensitive: bool = True) -> Verifier:
    """The whole response equals the reference."""

    def norm(s: str) -> str:
        s = s.strip() if strip else s
        return s if case_sensitive else s.lower()

    def verify(response: str, reference: str) -> Verdict:
        p, e = norm(response), norm(reference)
        return Verdict(p == e, p, e)

    return verify


@VERIFIERS.register("regex")
def regex(
    pattern: str, group: int = 1, numeric: bool = False, reference_pattern: str | None = None
) -> Verifier:
    """The last match of ``pattern`` in the response (capture ``group``) equals the
    reference (or the last match of ``reference_pattern`` in it); ``numeric`` compares
    as numbers."""
    try:
        rx = re.compile(pattern)
        ref_rx = re.compile(reference_pattern) if reference_pattern else None
    except re.error as e:
        raise DKError(f"verifier.params.pattern: not a valid regular expression ({e})") from None
    if group > rx.groups:
        raise DKError(f"verifier.params.group: the pattern has {rx.groups} group(s), not {group}")

    def pick(r: re.Pattern, text: str, g: int) -> str | None:
        ms = list(r.finditer(text))
        if not ms:
            return None
        v = ms[-1].group(g).strip()
        return normalize_number(v) if numeric else v

    def verify(response: str, reference: str) -> Verdict:
        e = pick(ref_rx, reference, min(group, ref_rx.groups)) if ref_rx else reference.strip()
        if numeric and not ref_rx:
            e = normalize_number(e)
        p = pick(rx, response, group)
        return Verdict(p is not None and p == e, p, e)

    return verify


def build_verifier(name: str, params: dict | None = None) -> Verifier:
    factory = VERIFIERS.get(name)
    try:
        return factory(**(params or {}))
    except TypeError as e:
        raise DKError(f"verifier {name!r}: bad params ({e})") from None
