"""Structured output: a JSON schema turned into a Lark grammar that always fits a token budget.

onnxruntime-genai's guidance (llguidance) keeps every token inside a grammar, but a grammar alone
does not make the answer *end*: a small model happily fills a string or whitespace until
`max_tokens` runs out and the JSON is cut off. So the grammar we hand genai is bounded:

- no free whitespace at all (compact separators), strings drawn from a character class that
  needs no escapes, numbers with a bounded count of digits, arrays with a bounded item count;
- every bound comes from one knob `k`, and we pick the largest `k` whose *longest* answer fits
  the budget in bytes. A token is at least one byte, so the longest answer also fits in tokens:
  the model must finish (and genai then samples the end token) within the budget.

If even the tightest grammar (no optional properties, smallest alternatives, ASCII strings) is
longer than the budget in bytes, but a shortest valid answer fits in tokens, that answer is forced
(emitted as its canonical tokens, no sampling). If not even that fits, generation runs under the
tightest grammar and ends at the budget with finish_reason "length".

Supported keywords: type (one or a list), properties, required, additionalProperties (extra keys
are never generated, so any value is honoured), items, minItems, maxItems, minLength, maxLength,
enum, const, anyOf; annotations (title, description, default, examples, $schema, $id) are ignored.
Anything else is refused with a one-line error rather than silently producing non-matching JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Union

from phi3_onnx.errors import Phi3OnnxError

ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment"})
SUPPORTED = frozenset({"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
                       "minLength", "maxLength", "enum", "const", "anyOf"}) | ANNOTATIONS
# Caps on the knob: long regex repetitions and item chains make the grammar slow to compile.
MAX_STRING_CHARS = 1024
MAX_ITEMS = 32
MAX_DIGITS = 12
FREE_DEPTH = 1  # {"type": "object"} with no properties: nested objects one level deep
UNICODE_CHARS = r'[^"\\\x00-\x1f]'
ASCII_CHARS = r'[ !#-\[\]-~]'


class SchemaError(Phi3OnnxError):
    """A JSON schema we cannot turn into a grammar (bad or unsupported keyword)."""


# --- the schema as a small tree ----------------------------------------------------------------
@dataclass(frozen=True)
class Lit:
    text: str  # compact JSON text of a const/enum value


@dataclass(frozen=True)
class Str:
    min_len: int = 0
    max_len: int | None = None


@dataclass(frozen=True)
class Num:
    integer: bool


@dataclass(frozen=True)
class Arr:
    item: Node
    min_items: int = 0
    max_items: int | None = None


@dataclass(frozen=True)
class Obj:
    required: tuple[tuple[str, Node], ...]
    optional: tuple[tuple[str, Node], ...]


@dataclass(frozen=True)
class FreeObj:
    """An object with any keys; values are scalars (depth 0) or free objects one level down."""

    depth: int


@dataclass(frozen=True)
class Choice:
    options: tuple[Node, ...]


Node = Union[Lit, Str, Num, Arr, Obj, FreeObj, Choice]
SCALARS: tuple[Node, ...] = (Str(), Num(False), Lit("true"), Lit("false"), Lit("null"))


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def parse_schema(schema: Any, where: str = "#") -> Node:
    """The schema as a Node tree; SchemaError names the first unsupported keyword and where it is."""
    if schema is True or schema == {}:
        return Choice((*SCALARS, FreeObj(FREE_DEPTH)))
    if not isinstance(schema, Mapping):
        raise SchemaError(f"JSON schema at {where} must be an object, got {type(schema).__name__}")
    unknown = sorted(set(schema) - SUPPORTED)
    if unknown:
        raise SchemaError(f"unsupported JSON schema keyword {unknown[0]!r} at {where} "
                          f"(supported: {', '.join(sorted(SUPPORTED - ANNOTATIONS))})")
    if "const" in schema:
        return Lit(_compact(schema["const"]))
    if "enum" in schema:
        return _enum(schema["enum"], where)
    if "anyOf" in schema:
        return _any_of(schema["anyOf"], where)
    return _typed(schema, schema.get("type"), where)


def _enum(values: Any, where: str) -> Node:
    if not isinstance(values, list) or not values:
        raise SchemaError(f"'enum' at {where} must be a non-empty list")
    return Choice(tuple(Lit(_compact(v)) for v in values))


def _any_of(options: Any, where: str) -> Node:
    if not isinstance(options, list) or not options:
        raise SchemaError(f"'anyOf' at {where} must be a non-empty list")
    return Choice(tuple(parse_schema(s, f"{where}/anyOf/{i}") for i, s in enumerate(options)))


def _typed(schema: Mapping[str, Any], kind: Any, where: str) -> Node:
    if isinstance(kind, list):
        if not kind:
            raise SchemaError(f"'type' at {where} is an empty list")
        return Choice(tuple(_typed(schema, k, where) for k in kind))
    if kind is None:
        kind = "object" if "properties" in schema else ("array" if "items" in schema else None)
        if kind is None:
            return parse_schema({}, where)
    if kind == "string":
        lo, hi = _bounds(schema, "minLength", "maxLength", where)
        return Str(lo, hi)
    if kind in ("integer", "number"):
        return Num(kind == "integer")
    if kind in ("boolean", "null"):
        return Choice((Lit("true"), Lit("false"))) if kind == "boolean" else Lit("null")
    if kind == "array":
        lo, hi = _bounds(schema, "minItems", "maxItems", where)
        return Arr(parse_schema(schema.get("items", {}), f"{where}/items"), lo, hi)
    if kind == "object":
        return _object(schema, where)
    raise SchemaError(f"unknown type {kind!r} at {where}")


def _bounds(schema: Mapping[str, Any], low: str, high: str, where: str) -> tuple[int, int | None]:
    lo, hi = schema.get(low, 0), schema.get(high)
    if not isinstance(lo, int) or lo < 0 or (hi is not None and (not isinstance(hi, int) or hi < lo)):
        raise SchemaError(f"'{low}'/'{high}' at {where} must be integers with 0 <= {low} <= {high}")
    return lo, hi


def _object(schema: Mapping[str, Any], where: str) -> Node:
    props = schema.get("properties")
    if props is None:
        return FreeObj(FREE_DEPTH)
    if not isinstance(props, Mapping):
        raise SchemaError(f"'properties' at {where} must be an object")
    required = schema.get("required", [])
    if not isinstance(required, list) or any(r not in props for r in required):
        raise SchemaError(f"'required' at {where} must list names from 'properties'")
    nodes = {name: parse_schema(sub, f"{where}/properties/{name}") for name, sub in props.items()}
    return Obj(tuple((n, nodes[n]) for n in props if n in required),
               tuple((n, nodes[n]) for n in props if n not in required))


# --- sizes in bytes ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bounds:
    """How one grammar is bounded: the knob and the string alphabet (bytes per character)."""

    k: int
    ascii: bool = False

    @property
    def char_bytes(self) -> int:
        return 1 if self.ascii else 4

    def chars(self, s: Str) -> int:
        hi = min(self.k, MAX_STRING_CHARS, MAX_STRING_CHARS if s.max_len is None else s.max_len)
        return max(s.min_len, hi)

    def items(self, a: Arr) -> int:
        hi = min(self.k, MAX_ITEMS, MAX_ITEMS if a.max_items is None else a.max_items)
        return max(a.min_items, hi)

    def digits(self) -> int:
        return max(1, min(self.k, MAX_DIGITS))

    def members(self) -> int:
        return min(self.k, MAX_ITEMS)


def _key_bytes(name: str) -> int:
    return len(_compact(name).encode()) + 1  # "name":


def min_bytes(node: Node) -> int:
    """Bytes of the shortest valid answer (compact JSON)."""
    if isinstance(node, Lit):
        return len(node.text.encode())
    if isinstance(node, Str):
        return 2 + node.min_len
    if isinstance(node, Num):
        return 1
    if isinstance(node, Arr):
        return 2 + node.min_items * min_bytes(node.item) + max(node.min_items - 1, 0)
    if isinstance(node, Obj):
        parts = [_key_bytes(n) + min_bytes(v) for n, v in node.required]
        return 2 + sum(parts) + max(len(parts) - 1, 0)
    if isinstance(node, FreeObj):
        return 2
    return min(min_bytes(o) for o in node.options)


def max_bytes(node: Node, b: Bounds) -> int:
    """Bytes of the longest answer the bounded grammar allows."""
    if isinstance(node, Lit):
        return len(node.text.encode())
    if isinstance(node, Str):
        return 2 + b.chars(node) * b.char_bytes
    if isinstance(node, Num):
        return 1 + b.digits() + (0 if node.integer else 1 + b.digits())
    if isinstance(node, Arr):
        n = b.items(node)
        return 2 + n * max_bytes(node.item, b) + max(n - 1, 0)
    if isinstance(node, Obj):
        parts = [_key_bytes(n) + max_bytes(v, b) for n, v in (*node.required, *node.optional)]
        return 2 + sum(parts) + max(len(parts) - 1, 0)
    if isinstance(node, FreeObj):
        n = b.members()
        key = 2 + b.chars(Str()) * b.char_bytes + 1
        return 2 + n * (key + max_bytes(_free_value(node), b)) + max(n - 1, 0)
    return max(max_bytes(o, b) for o in node.options)


def _free_value(node: FreeObj) -> Node:
    return Choice(SCALARS if node.depth <= 0 else (*SCALARS, FreeObj(node.depth - 1)))


def tighten(node: Node) -> Node:
    """The same schema with only its shortest shapes: no optional properties, smallest alternative."""
    if isinstance(node, Arr):
        return Arr(tighten(node.item), node.min_items, node.min_items)
    if isinstance(node, Obj):
        return Obj(tuple((n, tighten(v)) for n, v in node.required), ())
    if isinstance(node, FreeObj):
        return Lit("{}")
    if isinstance(node, Choice):
        return tighten(min(node.options, key=min_bytes))
    if isinstance(node, Num):
        return Num(True)
    return node


# --- Lark text ---------------------------------------------------------------------------------
class _Rules:
    """Collects named rules so that repeated parts (array tails) stay small."""

    def __init__(self, b: Bounds) -> None:
        self.b = b
        self.lines: list[str] = []

    def add(self, body: str) -> str:
        name = f"r{len(self.lines)}"
        self.lines.append(f"{name}: {body}")
        return name

    def expr(self, node: Node) -> str:
        if isinstance(node, Lit):
            return _lark_str(node.text)
        if isinstance(node, Str):
            return self.string(node)
        if isinstance(node, Num):
            return self.number(node)
        if isinstance(node, Arr):
            return self.array(node)
        if isinstance(node, Obj):
            return self.obj(node)
        if isinstance(node, FreeObj):
            return self.free(node)
        return self.add(" | ".join(self.expr(o) for o in node.options))

    def string(self, s: Str) -> str:
        hi = self.b.chars(s)
        if hi == 0:
            return _lark_str('""')
        chars = ASCII_CHARS if self.b.ascii else UNICODE_CHARS
        return f'/"{chars}{{{s.min_len},{hi}}}"/'

    def number(self, n: Num) -> str:
        d = self.b.digits()
        whole = "-?(0|[1-9][0-9]{0,%d})" % (d - 1) if d > 1 else "-?[0-9]"
        return f"/{whole}/" if n.integer else f"/{whole}(\\.[0-9]{{1,{d}}})?/"

    def items(self, item: str, first: int, extra: int) -> str:
        """`first` items then up to `extra` more, each after a comma."""
        tail = ""
        for _ in range(extra):
            tail = self.add(f'("," {item} {tail})?'.replace("  ", " ")) if tail else self.add(f'("," {item})?')
        body = " ".join([item] + [f'"," {item}'] * (first - 1)) if first else ""
        return f"{body} {tail}".strip()

    def array(self, a: Arr) -> str:
        n, item = self.b.items(a), self.expr(a.item)
        if n == 0:
            return '"[" "]"'
        if a.min_items:
            return self.add(f'"[" {self.items(item, a.min_items, n - a.min_items)} "]"')
        return self.add(f'"[" ({self.items(item, 1, n - 1)})? "]"')

    def obj(self, o: Obj) -> str:
        req = [f"{_lark_str(_compact(n) + ':')} {self.expr(v)}" for n, v in o.required]
        opt = [f"{_lark_str(_compact(n) + ':')} {self.expr(v)}" for n, v in o.optional]
        if req:
            body = ' "," '.join(req) + "".join(f' ("," {p})?' for p in opt)
            return self.add(f'"{{" {body} "}}"')
        return self.add(f'"{{" {self.optional_members(opt)} "}}"') if opt else '"{" "}"'

    def optional_members(self, members: list[str]) -> str:
        """Any subset of `members` in order, commas between: S_i = m_i T_{i+1} | S_{i+1} | empty."""
        start = ""
        for i in range(len(members) - 1, -1, -1):
            tail = "".join(f' ("," {m})?' for m in members[i + 1:])
            start = self.add(f"{members[i]}{tail}" + (f" | {start}" if start else ""))
        return f"({start})?"

    def free(self, f: FreeObj) -> str:
        n = self.b.members()
        if n == 0:
            return '"{" "}"'
        pair = self.add(f'{self.string(Str())} ":" {self.expr(_free_value(f))}')
        return self.add(f'"{{" ({self.items(pair, 1, n - 1)})? "}}"')


def _lark_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def to_lark(node: Node, b: Bounds) -> str:
    rules = _Rules(b)
    top = rules.expr(node)
    return "\n".join([f"start: {top}", *rules.lines]) + "\n"


# --- choosing the bounds ---------------------------------------------------------------------------
def shortest_answer(node: Node) -> str:
    """A shortest valid answer (compact JSON): what a forced completion emits."""
    if isinstance(node, Lit):
        return node.text
    if isinstance(node, Str):
        return '"' + "a" * node.min_len + '"'
    if isinstance(node, Num):
        return "0"
    if isinstance(node, Arr):
        return "[" + ",".join([shortest_answer(node.item)] * node.min_items) + "]"
    if isinstance(node, Obj):
        return "{" + ",".join(_compact(n) + ":" + shortest_answer(v) for n, v in node.required) + "}"
    if isinstance(node, FreeObj):
        return "{}"
    return shortest_answer(min(node.options, key=min_bytes))


@dataclass(frozen=True)
class JsonPlan:
    """How a structured answer is produced within its token budget.

    mode "grammar": the model writes it under `lark`, whose longest answer (`longest` bytes, and a
    token is at least a byte) fits the budget, so it always completes;
    mode "forced": no bounded grammar fits in bytes, but a shortest answer (`forced`) fits in tokens:
    it is emitted as is, without sampling;
    mode "length": not even a shortest answer fits; the model writes under the tightest grammar and
    is cut at the budget (finish_reason "length").
    """

    mode: str
    lark: str
    longest: int
    forced: str | None = None


def budget_grammar(node: Node, budget: int) -> tuple[str, int] | None:
    """The loosest bounded grammar whose longest answer is at most `budget` bytes, or None."""
    for shape, ascii_only in ((node, False), (node, True), (tighten(node), True)):
        if max_bytes(shape, Bounds(0, ascii_only)) <= budget:
            b = Bounds(_largest_k(shape, budget, ascii_only), ascii_only)
            return to_lark(shape, b), max_bytes(shape, b)
    return None


def plan_json(node: Node, budget: int, count_tokens: Callable[[str], int]) -> JsonPlan:
    bounded = budget_grammar(node, budget)
    if bounded is not None:
        return JsonPlan("grammar", *bounded)
    tight = tighten(node)
    lark, longest = to_lark(tight, Bounds(0, True)), max_bytes(tight, Bounds(0, True))
    forced = shortest_answer(node)
    if count_tokens(forced) <= budget:
        return JsonPlan("forced", lark, longest, forced)
    return JsonPlan("length", lark, longest)


def _largest_k(node: Node, budget: int, ascii_only: bool) -> int:
    lo, hi = 0, max(MAX_STRING_CHARS, MAX_ITEMS, MAX_DIGITS)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if max_bytes(node, Bounds(mid, ascii_only)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def schema_text(schema: Mapping[str, Any] | bool) -> str:
    """The schema as JSON text (hashable, for frozen options; key order kept); checks it parses."""
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"json_schema is not JSON-serialisable ({exc})") from None
    parse_schema(schema)
    return text


def plan_for(schema_json: str, budget: int, count_tokens: Callable[[str], int]) -> JsonPlan:
    return plan_json(parse_schema(json.loads(schema_json)), budget, count_tokens)
