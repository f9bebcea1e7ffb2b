"""Key patterns that are invertible by construction.

A pattern is a dotted key with placeholders::

    conv1.{p}                 {p}       exactly one dotted segment
    layers.{i:int}.attn.{p}   {i:int}   one segment of digits
    encoder.{rest:*}          {rest:*}  one or more segments
    stages.{i-1}.{p}          {i-1}     index arithmetic: the value of i, minus 1
    layer{i+1}.{p}            {i+1}     (also {i:int+1}); with an index_map, a table

Patterns always match the *whole* key (HF's history shows unanchored regexes
renaming keys twice). A rename ``from → to`` is invertible because both sides
must use exactly the same placeholders: the inverse is simply ``to → from``.
Index arithmetic keeps that property — matching ``stages.{i-1}`` against
``stages.0`` gives ``i = 1`` — so ``layer{i:int}`` → ``stages.{i-1}`` reverts by
reading the rule right to left. An arithmetic placeholder only accepts canonical
numbers (``7``, not ``07``), since ``07`` could not be written back.
The escape hatch is ``Regex``, which must be given its inverse; its replacements
may shift a numeric group too (``\\g<1-1>``), and the planner proves the pair on
every key it touches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import RulesError

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::(int|\*))?(?:([+-][0-9]+))?\}")
_KINDS = {None: r"[^.]+", "int": r"[0-9]+", "*": r".+"}
_REGEX_SHIFT = re.compile(r"\\g<(\w+)([+-][0-9]+)>")


class IndexArithmeticError(RulesError):
    """A rule's index arithmetic has no value for this key (negative, or not in its map)."""


@dataclass(frozen=True)
class Pattern:
    """A compiled placeholder pattern; ``text`` is what the user wrote.

    ``values`` exchanged by ``match``/``format`` are the placeholders' *own* values;
    ``shifts`` and ``maps`` say how this pattern writes them (``{i-1}``: shift -1).
    """

    text: str
    regex: re.Pattern[str]
    names: tuple[str, ...]
    shifts: tuple[tuple[str, int], ...] = ()
    maps: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = ()

    def match(self, key: str) -> dict[str, str] | None:
        m = self.regex.fullmatch(key)
        if not m:
            return None
        values = m.groupdict()
        for name in self._arith():
            own = self._read(name, values[name])
            if own is None:
                return None
            values[name] = str(own)
        return values

    def format(self, values: dict[str, str]) -> str:
        """Fill the placeholders (``{i:int}`` and ``{i}`` both take the value of i).
        Raises ``IndexArithmeticError`` when arithmetic has no answer for this value."""
        return _PLACEHOLDER.sub(lambda m: self._write(m.group(1), values[m.group(1)]), self.text)

    def _arith(self) -> set[str]:
        return {n for n, _ in self.shifts} | {n for n, _ in self.maps}

    def _read(self, name: str, text: str) -> int | None:
        if not _canonical(text):
            return None
        v = int(text)
        table = dict(self.maps).get(name)
        if table is not None:
            back = {w: k for k, w in table}
            return back.get(v)
        v -= dict(self.shifts).get(name, 0)
        return v if v >= 0 else None

    def _write(self, name: str, value: str) -> str:
        if name not in self._arith():
            return value
        if not _canonical(value):
            raise IndexArithmeticError(f"{self.text!r}: index {name}={value!r} is not a plain number")
        v = int(value)
        table = dict(self.maps).get(name)
        if table is not None:
            out = dict(table).get(v)
            if out is None:
                raise IndexArithmeticError(f"{self.text!r}: index {name}={v} is not in the rule's index_map")
            return str(out)
        v += dict(self.shifts).get(name, 0)
        if v < 0:
            raise IndexArithmeticError(f"{self.text!r}: index {name}={value} would become {v}")
        return str(v)


def _canonical(text: str) -> bool:
    return text.isdigit() and (text == "0" or not text.startswith("0"))


def compile_pattern(text: str, where: str, maps: dict[str, dict[int, int]] | None = None) -> Pattern:
    """Compile ``text``; a placeholder may appear once (twice would be a hidden equality test).
    ``maps``: index tables this pattern writes through (a rule's ``index_map``)."""
    if not isinstance(text, str) or not text:
        raise RulesError(f"{where}: a pattern must be a non-empty string, got {text!r}")
    if "\x00" in text or "\n" in text:
        raise RulesError(f"{where}: pattern {text!r} holds NUL/newline characters")
    parts, names, shifts, pos = [], [], [], 0
    for m in _PLACEHOLDER.finditer(text):
        parts.append(re.escape(text[pos : m.start()]))
        name, kind, shift = m.group(1), m.group(2), m.group(3)
        if name in names:
            raise RulesError(f"{where}: placeholder {{{name}}} appears twice in {text!r}")
        if shift is not None and kind == "*":
            raise RulesError(f"{where}: {{{name}:*}} holds segments, not a number; it cannot be shifted")
        names.append(name)
        arith = shift is not None or name in (maps or {})
        parts.append(f"(?P<{name}>{_KINDS['int' if arith else kind]})")
        if shift is not None and int(shift):
            shifts.append((name, int(shift)))
        pos = m.end()
    parts.append(re.escape(text[pos:]))
    _reject_stray_braces(text, where)
    table = tuple((n, tuple(sorted(t.items()))) for n, t in (maps or {}).items() if n in names)
    return Pattern(text, re.compile("".join(parts)), tuple(names), tuple(shifts), table)


def _reject_stray_braces(text: str, where: str) -> None:
    stripped = _PLACEHOLDER.sub("", text)
    if "{" in stripped or "}" in stripped:
        raise RulesError(
            f"{where}: malformed placeholder in {text!r} (use {{name}}, {{name:int}} or {{name:*}})"
        )


def compile_pair(
    src: str, dst: str, where: str, maps: dict[str, dict[int, int]] | None = None
) -> tuple[Pattern, Pattern]:
    """``from``/``to`` patterns; equal placeholder sets make the pair invertible.
    ``maps`` (a rule's ``index_map``) apply to the ``to`` side."""
    a = compile_pattern(src, where)
    b = compile_pattern(dst, where, maps)
    ints = {m.group(1) for m in _PLACEHOLDER.finditer(src) if m.group(2) == "int" or m.group(3)}
    shifted = {n for n, _ in a.shifts + b.shifts} | {n for n, _ in b.maps}
    if shifted - ints:
        raise RulesError(
            f"{where}: only numbers can be shifted or mapped: write {sorted(shifted - ints)} as "
            f"{{name:int}} in 'from' ({src!r})"
        )
    if set(a.names) != set(b.names):
        raise RulesError(
            f"{where}: 'from' {src!r} and 'to' {dst!r} must use the same placeholders "
            f"(from has {sorted(a.names)}, to has {sorted(b.names)}); otherwise the rename "
            "cannot be inverted"
        )
    return a, b


@dataclass(frozen=True)
class Regex:
    """The escape hatch: a full-match regex with its replacement and stated inverse."""

    pattern: re.Pattern[str]
    repl: str
    inverse_pattern: re.Pattern[str]
    inverse_repl: str

    def map(self, key: str) -> str | None:
        m = self.pattern.fullmatch(key)
        return _expand(m, self.repl) if m else None

    def unmap(self, key: str) -> str | None:
        m = self.inverse_pattern.fullmatch(key)
        return _expand(m, self.inverse_repl) if m else None


def _expand(m: re.Match[str], repl: str) -> str | None:
    """``m.expand(repl)`` plus shifted numeric groups (``\\g<1-1>``, ``\\g<name+2>``);
    None when a shifted group is not a plain number or would go negative."""
    failed = False

    def shift(t: re.Match[str]) -> str:
        nonlocal failed
        ref = int(t.group(1)) if t.group(1).isdigit() else t.group(1)
        text = m.group(ref)
        if text is None or not _canonical(text) or int(text) + int(t.group(2)) < 0:
            failed = True
            return ""
        return str(int(text) + int(t.group(2)))

    try:
        out = m.expand(_REGEX_SHIFT.sub(shift, repl))
    except (IndexError, re.error):
        return None
    return None if failed else out


def compile_regex(spec: dict, where: str) -> Regex:
    """Compile the regex rule fields; the inverse is mandatory, not optional."""
    missing = [k for k in ("regex", "to", "inverse_regex", "inverse_to") if k not in spec]
    if missing:
        raise RulesError(
            f"{where}: a regex rule must state its inverse; missing {', '.join(missing)} "
            "(give inverse_regex and inverse_to so the migration can be reverted)"
        )
    try:
        rx = Regex(
            re.compile(spec["regex"]), spec["to"], re.compile(spec["inverse_regex"]), spec["inverse_to"]
        )
        for pattern, repl in ((rx.pattern, rx.repl), (rx.inverse_pattern, rx.inverse_repl)):
            for t in _REGEX_SHIFT.finditer(repl):  # a shift must name a group that exists
                ref = t.group(1)
                if (
                    ref.isdigit()
                    and int(ref) > pattern.groups
                    or not ref.isdigit()
                    and ref not in pattern.groupindex
                ):
                    raise re.error(f"\\g<{ref}{t.group(2)}> names no group of {pattern.pattern!r}")
        return rx
    except (re.error, TypeError) as e:
        raise RulesError(f"{where}: invalid regex ({e})") from e
