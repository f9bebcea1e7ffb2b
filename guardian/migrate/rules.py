"""The rules file: renames, drops, expected-missing keys and tensor ops.

TOML (read with the standard library's ``tomllib``) or JSON::

    version = 1

    [[rules]]                      # rename: placeholders on both sides
    from = "conv1.{p}"
    to = "embed_1.{p}"

    [[rules]]                      # transform: rename + ops (inverse derived, or lossy = true)
    from = "fc.weight"
    to = "head.weight"
    ops = [{op = "transpose", dims = [0, 1]}]

    [[rules]]                      # index arithmetic: layer1..3 became stages.0..2
    from = "layer{i:int}.{rest:*}"
    to = "stages.{i-1}.{rest:*}"

    [[rules]]                      # or a table, when the indices are not a shift
    from = "blocks.{i:int}.{p}"
    to = "layers.{i}.{p}"
    index_map = {i = {"1" = 0, "3" = 1}}

    [[rules]]                      # drop, always with a reason
    from = "aux_head.{rest:*}"
    drop = "auxiliary head removed in v2"

    [[rules]]                      # escape hatch: a regex must state its inverse
    regex = 'blk_(\\d+)\\.(.*)'
    to = 'blocks.\\1.\\2'
    inverse_regex = 'blocks\\.(\\d+)\\.(.*)'
    inverse_to = 'blk_\\1.\\2'

    [[expect_missing]]             # new in the target; initialised by the new model
    pattern = "head.{p}"
    init = "model"                 # "model" (factory or target checkpoint) or "zeros"

Rules are tried in file order and the first that matches a key claims it; a key
is renamed at most once (no chaining). A rule that claims nothing is an error:
dead rules hide typos.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from ..format import strictjson
from . import ops as ops_mod
from .errors import RulesError
from .patterns import Pattern, Regex, compile_pair, compile_pattern, compile_regex

MAX_RULES_BYTES = 1024 * 1024
RULE_FIELDS = {
    "from",
    "to",
    "ops",
    "drop",
    "lossy",
    "regex",
    "inverse_regex",
    "inverse_to",
    "why",
    "index_map",
}
MISSING_FIELDS = {"pattern", "init", "why"}
INITS = ("model", "zeros")


@dataclass
class Rule:
    """One compiled rule. ``srcs[0]`` decides whether the rule claims a key; further
    ``srcs`` (concat) and every ``dsts`` are filled from its placeholders."""

    index: int
    spec: dict[str, Any]
    srcs: list[Pattern] = field(default_factory=list)
    dsts: list[Pattern] = field(default_factory=list)
    regex: Regex | None = None
    ops: list[dict[str, Any]] = field(default_factory=list)
    drop: str | None = None
    lossy: bool = False

    @property
    def label(self) -> str:
        return f"rules[{self.index}]"

    def describe(self) -> str:
        if self.regex is not None:
            return f"{self.label} regex {self.spec['regex']!r} → {self.spec['to']!r}"
        head = " + ".join(p.text for p in self.srcs)
        if self.drop is not None:
            return f"{self.label} drop {head}"
        tail = " + ".join(p.text for p in self.dsts)
        return f"{self.label} {head} → {tail}" + (f" [{ops_mod.describe(self.ops)}]" if self.ops else "")

    def claim(self, key: str) -> tuple[list[str], list[str]] | None:
        """``(source keys, target keys)`` if this rule claims ``key``, else None."""
        if self.regex is not None:
            out = self.regex.map(key)
            return None if out is None else ([key], [out])
        values = self.srcs[0].match(key)
        if values is None:
            return None
        srcs = [key] + [p.format(values) for p in self.srcs[1:]]
        return srcs, [p.format(values) for p in self.dsts]

    def unclaim(self, dst: str) -> str | None:
        """The source key this rule's inverse gives for its first target key: a rule
        is only usable where ``unclaim(claim(k)[1][0]) == k``."""
        if self.regex is not None:
            return self.regex.unmap(dst)
        values = self.dsts[0].match(dst) if self.dsts else None
        return None if values is None else self.srcs[0].format(values)


@dataclass
class ExpectMissing:
    index: int
    pattern: Pattern
    init: str
    why: str

    @property
    def label(self) -> str:
        return f"expect_missing[{self.index}]"


@dataclass
class Rules:
    rules: list[Rule] = field(default_factory=list)
    expect_missing: list[ExpectMissing] = field(default_factory=list)
    origin: str = "<none>"

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "rules": [r.spec for r in self.rules],
            "expect_missing": [
                {"pattern": e.pattern.text, "init": e.init, "why": e.why} for e in self.expect_missing
            ],
        }


def load_rules(path: str | os.PathLike[str] | None) -> Rules:
    """Read a TOML or JSON rules file (bounded size, duplicate keys rejected)."""
    if path is None:
        return Rules()
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RULES_BYTES + 1)
    except OSError as e:
        raise RulesError(f"{path}: cannot read the rules file ({e.strerror})") from e
    if len(data) > MAX_RULES_BYTES:
        raise RulesError(f"{path}: rules file larger than {MAX_RULES_BYTES} bytes")
    obj = _parse_json(data, path) if path.endswith(".json") else _parse_toml(data, path)
    rules = parse_rules(obj, path)
    rules.origin = path
    return rules


def _parse_json(data: bytes, path: str) -> Any:
    try:
        return strictjson.loads(data, what=path, max_bytes=MAX_RULES_BYTES)
    except ValueError as e:
        raise RulesError(str(e)) from e


def _parse_toml(data: bytes, path: str) -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the same parser, from PyPI (a dependency there)
        import tomli as tomllib
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RulesError(f"{path}: not valid TOML ({e})") from e


def parse_rules(obj: Any, origin: str = "<rules>") -> Rules:
    """Compile a rules document (already parsed from TOML/JSON)."""
    if not isinstance(obj, dict):
        raise RulesError(f"{origin}: the rules document must be a table/object")
    unknown = set(obj) - {"version", "rules", "expect_missing"}
    if unknown:
        raise RulesError(
            f"{origin}: unknown top-level keys {sorted(unknown)} (expected rules, expect_missing)"
        )
    if obj.get("version", 1) != 1:
        raise RulesError(f"{origin}: rules version {obj.get('version')!r} is not supported (1 is)")
    rules = [_compile_rule(i, r, origin) for i, r in enumerate(_list(obj, "rules", origin))]
    missing = [_compile_missing(i, m, origin) for i, m in enumerate(_list(obj, "expect_missing", origin))]
    return Rules(rules=rules, expect_missing=missing, origin=origin)


def _list(obj: dict, name: str, origin: str) -> list:
    value = obj.get(name, [])
    if not isinstance(value, list):
        raise RulesError(f"{origin}: {name!r} must be an array of tables ([[{name}]])")
    return value


def _compile_rule(i: int, spec: Any, origin: str) -> Rule:
    where = f"{origin}: rules[{i}]"
    if not isinstance(spec, dict):
        raise RulesError(f"{where}: must be a table")
    unknown = set(spec) - RULE_FIELDS
    if unknown:
        raise RulesError(
            f"{where}: unknown fields {sorted(unknown)} (known: {', '.join(sorted(RULE_FIELDS))})"
        )
    rule = Rule(index=i, spec=dict(spec), lossy=bool(spec.get("lossy", False)))
    rule.ops = [ops_mod.validate(op, where) for op in spec.get("ops", [])]
    if "index_map" in spec and ("regex" in spec or "drop" in spec):
        raise RulesError(f"{where}: index_map belongs to a from/to rename (a regex shifts with \\g<1-1>)")
    if "regex" in spec:
        if rule.ops or "drop" in spec:
            raise RulesError(f"{where}: a regex rule only renames (no ops, no drop)")
        rule.regex = compile_regex(spec, where)
        return rule
    if "from" not in spec:
        raise RulesError(f"{where}: needs 'from' (a pattern) or 'regex'")
    if "drop" in spec:
        return _compile_drop(rule, spec, where)
    return _compile_rename(rule, spec, where)


def _compile_drop(rule: Rule, spec: dict, where: str) -> Rule:
    if not isinstance(spec["drop"], str) or not spec["drop"].strip():
        raise RulesError(f'{where}: drop needs a reason, e.g. drop = "auxiliary head removed"')
    if "to" in spec or rule.ops:
        raise RulesError(f"{where}: a drop rule has no 'to' and no ops")
    if not isinstance(spec["from"], str):
        raise RulesError(f"{where}: a drop rule's 'from' is one pattern")
    rule.srcs = [compile_pattern(spec["from"], where)]
    rule.drop = spec["drop"]
    return rule


def _compile_rename(rule: Rule, spec: dict, where: str) -> Rule:
    if "to" not in spec:
        raise RulesError(f"{where}: needs 'to' (or drop = \"reason\")")
    srcs = spec["from"] if isinstance(spec["from"], list) else [spec["from"]]
    dsts = spec["to"] if isinstance(spec["to"], list) else [spec["to"]]
    if not srcs or not dsts:
        raise RulesError(f"{where}: 'from' and 'to' must not be empty")
    maps = _index_maps(spec.get("index_map"), where)
    first, _ = compile_pair(srcs[0], dsts[0], where, maps)
    rule.srcs = [first] + [_follower(t, first, where) for t in srcs[1:]]
    rule.dsts = [_follower(t, first, where, maps) for t in dsts]
    unknown = set(maps) - set(first.names)
    if unknown:
        raise RulesError(f"{where}: index_map names {sorted(unknown)}, which 'from' does not use")
    kinds = [op["op"] for op in rule.ops]
    if len(srcs) > 1 and "concat" not in kinds:
        raise RulesError(f"{where}: several 'from' keys need a concat op")
    if len(dsts) > 1 and "split" not in kinds:
        raise RulesError(f"{where}: several 'to' keys need a split op")
    return rule


def _index_maps(obj: Any, where: str) -> dict[str, dict[int, int]]:
    """``index_map = {i = {"1" = 0, "3" = 1}}``: per placeholder, a one-to-one table from
    the source's index to the target's (one-to-one, or the rule could not be inverted)."""
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise RulesError(f'{where}: index_map must be a table, e.g. index_map = {{i = {{"1" = 0}}}}')
    out: dict[str, dict[int, int]] = {}
    for name, table in obj.items():
        if not isinstance(table, dict) or not table:
            raise RulesError(f"{where}: index_map.{name} must be a non-empty table of index = index")
        try:
            pairs = {int(k): int(v) for k, v in table.items() if not isinstance(v, bool)}
        except (TypeError, ValueError) as e:
            raise RulesError(f"{where}: index_map.{name}: indices must be whole numbers ({e})") from e
        if len(pairs) != len(table) or min(pairs) < 0 or min(pairs.values()) < 0:
            raise RulesError(f"{where}: index_map.{name}: indices must be whole numbers ≥ 0")
        if len(set(pairs.values())) != len(pairs):
            raise RulesError(f"{where}: index_map.{name} sends two indices to one; it cannot be inverted")
        out[str(name)] = pairs
    return out


def _follower(
    text: str, first: Pattern, where: str, maps: dict[str, dict[int, int]] | None = None
) -> Pattern:
    """Secondary patterns are filled from the first's placeholders (and must use all of
    them, so the rule stays invertible)."""
    p = compile_pattern(text, where, maps)
    if set(p.names) != set(first.names):
        raise RulesError(
            f"{where}: {text!r} must use the same placeholders as {first.text!r} "
            f"({sorted(first.names)}), or the rename cannot be inverted"
        )
    return p


def _compile_missing(i: int, spec: Any, origin: str) -> ExpectMissing:
    where = f"{origin}: expect_missing[{i}]"
    if isinstance(spec, str):
        spec = {"pattern": spec}
    if not isinstance(spec, dict) or "pattern" not in spec:
        raise RulesError(f'{where}: needs pattern = "…"')
    unknown = set(spec) - MISSING_FIELDS
    if unknown:
        raise RulesError(f"{where}: unknown fields {sorted(unknown)}")
    init = spec.get("init", "model")
    if init not in INITS:
        raise RulesError(f"{where}: init must be one of {INITS}, got {init!r}")
    return ExpectMissing(i, compile_pattern(spec["pattern"], where), init, str(spec.get("why", "")))


def rule_snippet(src: str, dst: str, comment: str = "") -> str:
    """A ready-to-paste TOML rule."""
    head = f"# {comment}\n" if comment else ""
    return f"{head}[[rules]]\nfrom = {json.dumps(src)}\nto = {json.dumps(dst)}\n"
