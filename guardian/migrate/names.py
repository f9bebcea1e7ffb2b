"""How much two module names say they are the same thing — and how sure we may be.

Names are compared segment by segment, aligned from the leaf (the most specific
part: ``attn.q`` vs ``attention.query``), and each segment word by word, where a
word may be an abbreviation of the other (``q``/``query``, ``attn``/``attention``,
``ln``/``layernorm``) and digits count less than words.

Confidence is *contrastive*: to prefer target ``b`` over an alternative ``b2`` for
source ``a``, only the segments where ``b`` and ``b2`` differ can be evidence —
what they share says nothing about which one is right. So ``blocks.{}.attn.q``
prefers ``layers.{}.attention.query`` over ``….key`` by ``q``/``query`` against
``q``/``key`` alone, and that margin is large; a shared ``layers.{}.attention``
would otherwise dilute it into a guess-like number.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[0-9]+")
DIGIT_WEIGHT = 0.3
ABBREVIATION = 0.9


def segments(template: str) -> list[str]:
    return [s for s in template.split(".") if s]


def words(segment: str) -> list[str]:
    """``attn_out2`` → ``['attn', 'out', '2']``; index placeholders carry no words."""
    return [w.lower() for w in _WORD.findall(segment.replace("{}", " "))]


def _is_abbreviation(short: str, long: str) -> bool:
    """``q``→``query``, ``attn``→``attention``, ``ln``→``layernorm``: same first letter and
    the short word's letters appear in order in the long one."""
    if not short or short[0] != long[0] or short.isdigit() or long.isdigit():
        return False
    if long.startswith(short):
        return True
    it = iter(long)
    return len(short) >= 2 and all(c in it for c in short)


def word_sim(a: str, b: str) -> float:
    if a == b:
        return 1.0
    short, long = sorted((a, b), key=len)
    return ABBREVIATION if len(short) < len(long) and _is_abbreviation(short, long) else 0.0


def _weight(w: str) -> float:
    return DIGIT_WEIGHT if w.isdigit() else 1.0


def segment_sim(a: str, b: str) -> float:
    """Symmetric word-level similarity of two segments, 0..1."""
    wa, wb = words(a), words(b)
    if not wa and not wb:
        return 1.0 if a == b else 0.5  # two bare indices
    if not wa or not wb:
        return 0.0
    got = sum(_weight(x) * max(word_sim(x, y) for y in wb) for x in wa)
    got += sum(_weight(y) * max(word_sim(x, y) for x in wa) for y in wb)
    return got / (sum(map(_weight, wa)) + sum(map(_weight, wb)))


def affinity(a: str, b: str) -> float:
    """Whole-template similarity, leaf segments weighing most (0..1)."""
    sa, sb = segments(a)[::-1], segments(b)[::-1]
    total = weight = 0.0
    for k in range(max(len(sa), len(sb))):
        w = 0.5**k
        weight += w
        if k < len(sa) and k < len(sb):
            total += w * segment_sim(sa[k], sb[k])
    return total / weight if weight else 0.0


def contrast(a: str, b: str, b2: str) -> tuple[float, float]:
    """Evidence ``(for b, for b2)`` as the partner of ``a``, from what tells ``b`` and
    ``b2`` apart: the segments where they differ (aligned from the leaf), and in those
    only the words one has and the other lacks (``in_norm``/``out_norm``: ``in``/``out``).
    Bare list indices are no evidence: ``layer1`` says nothing about ``stages.1`` vs
    ``stages.0`` (an index shift is exactly that trap)."""
    sa, sb, sb2 = segments(a)[::-1], segments(b)[::-1], segments(b2)[::-1]
    for_b = for_b2 = 0.0
    for k in range(max(len(sb), len(sb2))):
        x = sb[k] if k < len(sb) else ""
        y = sb2[k] if k < len(sb2) else ""
        if x == y or x.isdigit() and y.isdigit():
            continue  # two list indices: a name says nothing about which (structure does)
        ref = words(sa[k]) if k < len(sa) else []
        wx, wy = words(x), words(y)
        common = set(wx) & set(wy)
        w = 0.5**k
        for_b += w * _found(ref, [t for t in wx if t not in common])
        for_b2 += w * _found(ref, [t for t in wy if t not in common])
    return for_b, for_b2


def _found(ref: list[str], distinct: list[str]) -> float:
    """How much of ``distinct`` the reference words contain (weighted, 0..1)."""
    if not ref or not distinct:
        return 0.0
    got = sum(_weight(t) * max(word_sim(t, r) for r in ref) for t in distinct)
    return got / sum(map(_weight, distinct))


def margin(strength: float, rival: float) -> float:
    """Relative margin of ``strength`` over ``rival``: 1 when the rival has no evidence,
    0 when they are equal (a tie) or the rival is stronger."""
    if strength <= 0.0:
        return 0.0
    return max(0.0, 1.0 - rival / strength)
