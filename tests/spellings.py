"""Hypothesis strategies for JSON text the way a client may spell it to QEMU.

Every value comes in the spellings QEMU's parser accepts (json-lexer.c, json-parser.c):
either quote, any character raw or escaped (C0 80 for U+0000, surrogate-pair escapes,
``\\/``, ``\\'``), integers and floats in any notation (``1e2``, ``100.0``, ``1.5E+3``,
long mantissas, beyond uint64), and whitespace between tokens. Used to check that what
qmpmux forwards is never longer than what the client wrote, and means the same to QEMU.
"""

from __future__ import annotations

from hypothesis import strategies as st

WHITESPACE = st.sampled_from([b"", b"", b"", b" ", b"\t", b"\r\n", b"  \n "])

# the characters with several spellings come up often; any other valid character too
CHARACTERS = st.sampled_from(list("\x00\"'\\/\n\x01\x7f\u00e9\u2028\U0001f600a")) | st.characters(
    codec="utf-8"
).filter(lambda c: not (0xFDD0 <= ord(c) <= 0xFDEF or (ord(c) & 0xFFFE) == 0xFFFE))
SHORT_ESCAPES = {'"': b'\\"', "'": b"\\'", "\\": b"\\\\", "/": b"\\/", "\b": b"\\b"}
SHORT_ESCAPES |= {"\f": b"\\f", "\n": b"\\n", "\r": b"\\r", "\t": b"\\t"}


def _u(cp: int, upper: bool) -> bytes:
    text = f"\\u{cp:04X}" if upper else f"\\u{cp:04x}"
    return text.encode("ascii")


def char_spellings(c: str, quote: bytes) -> list[bytes]:
    """Every way to write ``c`` inside a string delimited by ``quote``."""
    cp = ord(c)
    out: list[bytes] = []
    if cp == 0:
        out.append(b"\xc0\x80")
    elif cp >= 0x20 and c.encode() != quote and c != "\\":
        out.append(c.encode())
    if c in SHORT_ESCAPES:
        out.append(SHORT_ESCAPES[c])
    if cp > 0xFFFF:
        low = cp - 0x10000
        high, low = 0xD800 + (low >> 10), 0xDC00 + (low & 0x3FF)
        out += [_u(high, False) + _u(low, False), _u(high, True) + _u(low, True)]
    else:
        out += [_u(cp, False), _u(cp, True)]
    return out


@st.composite
def strings(draw: st.DrawFn) -> bytes:
    quote = draw(st.sampled_from([b'"', b"'"]))
    text = draw(st.text(alphabet=CHARACTERS, max_size=10))
    body = b"".join(draw(st.sampled_from(char_spellings(c, quote))) for c in text)
    return quote + body + quote


INTEGERS = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1).map(lambda n: str(n).encode()),
    st.from_regex(rb"\A-?(0|[1-9][0-9]{0,40})\Z"),  # beyond uint64: a double to QEMU
)
# QEMU's lexer ends a number at "0" unless a '.' follows ("0e5" is 0, then a keyword)
FLOATS = st.from_regex(
    rb"\A-?(0\.[0-9]{1,30}|[1-9][0-9]{0,30}(\.[0-9]{1,30})?)([eE][+-]?[0-9]{1,4})?\Z"
).filter(lambda t: b"." in t or b"e" in t.lower())
SCALARS = st.one_of(strings(), INTEGERS, FLOATS, st.sampled_from([b"true", b"false", b"null"]))


def _join(draw: st.DrawFn, ws: Ws, open_: bytes, items: list[bytes], close: bytes) -> bytes:
    out = open_ + draw(ws)
    for i, item in enumerate(items):
        if i:
            out += b"," + draw(ws)
        out += item + draw(ws)
    return out + close


Ws = st.SearchStrategy[bytes]


@st.composite
def _array(draw: st.DrawFn, children: st.SearchStrategy[bytes], ws: Ws) -> bytes:
    return _join(draw, ws, b"[", draw(st.lists(children, max_size=4)), b"]")


@st.composite
def objects(draw: st.DrawFn, children: st.SearchStrategy[bytes], ws: Ws) -> bytes:
    """An object with distinct keys (QEMU rejects duplicates)."""
    keys = draw(st.lists(st.text(alphabet=CHARACTERS, max_size=4), max_size=4, unique=True))
    members = []
    for key in keys:
        quote = draw(st.sampled_from([b'"', b"'"]))
        spelled = b"".join(draw(st.sampled_from(char_spellings(c, quote))) for c in key)
        colon = draw(ws) + b":" + draw(ws)
        members.append(quote + spelled + quote + colon + draw(children))
    return _join(draw, ws, b"{", members, b"}")


def values(ws: Ws) -> st.SearchStrategy[bytes]:
    """Any value, with ``ws`` between its tokens."""
    return st.recursive(
        SCALARS, lambda children: _array(children, ws) | objects(children, ws), max_leaves=12
    )


@st.composite
def commands(draw: st.DrawFn, names: list[str], padded: bool = True) -> bytes:
    """A command naming one of ``names`` with arguments, members in any order.

    Unless ``padded``, without whitespace or an id: only what qmpmux forwards.
    """
    ws = WHITESPACE if padded else st.just(b"")
    name = draw(st.sampled_from(names))
    quote = draw(st.sampled_from([b'"', b"'"]))
    members = [
        quote + b"execute" + quote + b":" + draw(ws) + quote + name.encode() + quote,
        b'"arguments"' + draw(ws) + b":" + draw(objects(values(ws), ws)),
    ]
    if padded and draw(st.booleans()):
        members.append(b"'id':" + draw(values(ws)))
    order = draw(st.permutations(members))
    return _join(draw, ws, b"{", list(order), b"}")
