"""Key patterns that are invertible by construction.

A pattern is a dotted key with placeholders::

    conv1.{p}                 {p}       exactly one dotted segment
    layers.{i:int}.attn.{p}   {i:int}   one segment of digits
    encoder.{rest:*}          {rest:*}  one or more segments

Patterns always match the *whole* key (HF's history shows unanchored regexes
renaming keys twice). A rename ``from → to`` is invertible because both sides
must use exactly the same placeholders: the inverse is simply ``to → from``.
The escape hatch is ``Regex``, which must be given its inverse; ``check_roundtrip``
proves the pair on every key it touches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import RulesError

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::(int|\*))?\}")
_KINDS = {None: r"[^.]+", "int": r"[0-9]+", "*": r".+"}


@dataclass(frozen=True)
class Pattern:
    """A compiled placeholder pattern; ``text`` is what the user wrote."""

    text: str
    regex: re.Pattern[str]
    names: tuple[str, ...]

    def match(self, key: str) -> dict[str, str] | None:
        m = self.regex.fullmatch(key)
        return m.groupdict() if m else None

    def format(self, values: dict[str, str]) -> str:
        """Fill the placeholders (``{i:int}`` and ``{i}`` both take the value of i)."""
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.text)


def compile_pattern(text: str, where: str) -> Pattern:
    """Compile ``text``; a placeholder may appear once (twice would be a hidden equality test)."""
    if not isinstance(text, str) or not text:
        raise RulesError(f"{where}: a pattern must be a non-empty string, got {text!r}")
    if "\x00" in text or "\n" in text:
        raise RulesError(f"{where}: pattern {text!r} holds NUL/newline characters")
    parts, names, pos = [], [], 0
    for m in _PLACEHOLDER.finditer(text):
        parts.append(re.escape(text[pos : m.start()]))
        name, kind = m.group(1), m.group(2)
        if name in names:
            raise RulesError(f"{where}: placeholder {{{name}}} appears twice in {text!r}")
        names.append(name)
        parts.append(f"(?P<{name}>{_KINDS[kind]})")
        pos = m.end()
    parts.append(re.escape(text[pos:]))
    _reject_stray_braces(text, where)
    return Pattern(text=text, regex=re.compile("".join(parts)), names=tuple(names))


def _reject_stray_braces(text: str, where: str) -> None:
    stripped = _PLACEHOLDER.sub("", text)
    if "{" in stripped or "}" in stripped:
        raise RulesError(
            f"{where}: malformed placeholder in {text!r} (use {{name}}, {{name:int}} or {{name:*}})"
        )


def compile_pair(src: str, dst: str, where: str) -> tuple[Pattern, Pattern]:
    """``from``/``to`` patterns; equal placeholder sets make the pair invertible."""
    a, b = compile_pattern(src, where), compile_pattern(dst, where)
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
        return m.expand(self.repl) if m else None

    def unmap(self, key: str) -> str | None:
        m = self.inverse_pattern.fullmatch(key)
        return m.expand(self.inverse_repl) if m else None


def compile_regex(spec: dict, where: str) -> Regex:
    """Compile the regex rule fields; the inverse is mandatory, not optional."""
    missing = [k for k in ("regex", "to", "inverse_regex", "inverse_to") if k not in spec]
    if missing:
        raise RulesError(
            f"{where}: a regex rule must state its inverse; missing {', '.join(missing)} "
            "(give inverse_regex and inverse_to so the migration can be reverted)"
        )
    try:
        return Regex(
            re.compile(spec["regex"]), spec["to"], re.compile(spec["inverse_regex"]), spec["inverse_to"]
        )
    except (re.error, TypeError) as e:
        raise RulesError(f"{where}: invalid regex ({e})") from e
