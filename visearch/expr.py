"""Milvus boolean expressions built from values, through one escaping function.

Every value that reaches a Milvus expression (primary keys, item ids, metadata keys and
values of filters) goes through `literal`; nothing else in the project writes an expression
from a value. pymilvus's `get(ids=...)` and `delete(ids=...)` wrap string keys in quotes
without escaping them (an id `x' or object_id != '` rewrote the expression), so the store
never uses them: it queries and deletes with `pk_in`.

The engines this project runs (Milvus Lite 3.2, Milvus 2.3 servers) have no expression
templates, and agree on this much of the string-literal grammar: a double-quoted string in
which `\\"`, `\\\\`, `\\n`, `\\r` and `\\t` are escapes and every other character (non-ASCII
too) stands for itself. `\\uXXXX` (what json.dumps writes) is refused by Milvus Lite, so
non-ASCII characters are written as they are.

Metadata keys are JSON paths (`metadata["key"]`), which Milvus 2.3 servers do not parse as
string literals: they split the path text on `][` and strip quotes by hand (a key `][`
crashed the server's proxy). Keys are therefore restricted (`check_key`) to what both
engines read back exactly; values are not.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

from visearch.errors import InvalidArgument

_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})
KEY_FORBIDDEN = set('[]"\'\\')
KEY_MAX_BYTES = 128


def literal(value: str) -> str:
    """`value` as a Milvus string literal that both engines read back as exactly `value`."""
    if not isinstance(value, str):
        raise TypeError(f"a Milvus string literal is made from a str, not {type(value).__name__}")
    return '"' + value.translate(_ESCAPES) + '"'


def pk_in(field: str, values: Iterable[str]) -> str:
    """`field in ["a", "b", ...]` for string primary keys."""
    return f"{field} in [{', '.join(literal(v) for v in values)}]"


def key_problem(key: str) -> str | None:
    """Why `key` cannot be a metadata key (None when it can)."""
    if not key:
        return "it is empty"
    if len(key.encode()) > KEY_MAX_BYTES:
        return f"it is over {KEY_MAX_BYTES} bytes"
    bad = sorted({c for c in key if c in KEY_FORBIDDEN or unicodedata.category(c) == "Cc"})
    if bad:
        return f"it contains {', '.join(repr(c) for c in bad)} (no brackets, quotes, backslashes or control characters)"
    return None


def check_key(key: str, what: str = "metadata key") -> str:
    problem = key_problem(key)
    if problem:
        raise InvalidArgument(f"{what} {key[:80]!r} is invalid: {problem}")
    return key


def json_equals(field: str, key: str, value: str) -> str:
    """`field["key"] == "value"`: an exact match on one key of a JSON field."""
    return f"{field}[{literal(check_key(key, 'filter key'))}] == {literal(value)}"


COMPARISONS = frozenset({"<", "<=", ">", ">="})


def compare(field: str, op: str, value: str) -> str:
    """`field > "value"` (op one of <, <=, >, >=) on a string field. Both engines compare strings by
    their UTF-8 bytes, which is code point order: the order of Python's `str` (tests/test_store.py
    pages through ids with quotes, backslashes and non-ASCII characters on both)."""
    if op not in COMPARISONS:
        raise ValueError(f"comparison {op!r}: expected one of {', '.join(sorted(COMPARISONS))}")
    return f"{field} {op} {literal(value)}"
