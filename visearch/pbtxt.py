"""Triton's model configuration (`config.pbtxt`, protobuf text format): read it, and replace one of its
top-level fields keeping the rest of the text (comments included) as it is.

No torch here: serving code (visearch.triton_repo) and the model layer (visearch.models.repository) share it.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r'\s*(?:#[^\n]*|("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([^\s{}\[\]:,"#]+))')


def _tokens(text: str) -> list[tuple[str, int, int]]:
    """(token, start, end) of every string, punctuation mark and bare word; comments dropped."""
    out = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip():
                raise ValueError(f"cannot parse config.pbtxt near {text[pos:pos + 30]!r}")
            break
        pos = m.end()
        for group in (1, 2, 3):
            if m.group(group):
                out.append((m.group(group), m.start(group), m.end(group)))
    return out


def parse_pbtxt(text: str) -> dict:
    """Minimal protobuf text-format reader: fields map to lists of values (scalars or dicts)."""
    it = iter([t for t, _, _ in _tokens(text)] + [None])  # type: ignore[list-item]

    def scalar(tok: str):
        if tok.startswith('"'):
            return tok[1:-1]
        try:
            return int(tok)
        except ValueError:
            return tok

    def value(tok):
        if tok == "{":
            return message("}")
        if tok == "[":
            out = []
            while (t := next(it)) != "]":
                if t != ",":
                    out.append(value(t))
            return out
        return scalar(tok)

    def message(end):
        fields: dict = {}
        while (tok := next(it)) != end:
            if tok is None:
                raise ValueError("config.pbtxt: unbalanced braces")
            t = next(it)
            if t == ":":
                t = next(it)
            v = value(t)
            # `f: [a, b]` is text-format shorthand for the repeated entries `f: a f: b`.
            fields.setdefault(tok, []).extend(v if t == "[" else [v])
        return fields

    return message(None)


def field_spans(text: str, name: str) -> list[tuple[int, int]]:
    """Where each top-level `name` entry is in `text`: (start of the name, end of its value)."""
    toks = _tokens(text)
    spans, depth, i = [], 0, 0
    while i < len(toks):
        tok, start, _ = toks[i]
        if tok in "{[" and len(tok) == 1:
            depth += 1
        elif tok in "}]" and len(tok) == 1:
            depth -= 1
        elif depth == 0 and tok == name:
            j = i + 1
            if j < len(toks) and toks[j][0] == ":":
                j += 1
            if j >= len(toks):
                raise ValueError(f"config.pbtxt: {name} has no value")
            if toks[j][0] in ("{", "["):
                level = 0
                for k in range(j, len(toks)):
                    if toks[k][0] in ("{", "["):
                        level += 1
                    elif toks[k][0] in ("}", "]"):
                        level -= 1
                        if level == 0:
                            break
                else:
                    raise ValueError(f"config.pbtxt: {name} is not closed")
                j = k
            spans.append((start, toks[j][2]))
            i = j + 1
            continue
        i += 1
    return spans


def set_field(text: str, name: str, block: str) -> str:
    """`text` with its top-level `name` entries replaced by `block` (a whole `name ...` entry), or with
    `block` added at the end when it has none."""
    spans = field_spans(text, name)
    if not spans:
        return text.rstrip("\n") + "\n" + block.rstrip("\n") + "\n"
    out, last = [], 0
    for n, (start, end) in enumerate(spans):
        out.append(text[last:start])
        if n == 0:
            out.append(block.rstrip("\n"))
        last = end
    out.append(text[last:])
    return "".join(out)
