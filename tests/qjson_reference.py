"""Reference decoders for QEMU's strings: byte-at-a-time loops that mirror util/unicode.c
mod_utf8_codepoint(), json-parser.c parse_string() and json-writer.c's handling of invalid
sequences. qmpmux.qjson does the same work with C-speed passes; tests compare the two.
"""

from __future__ import annotations

import re

from qmpmux.qjson import _Error, _valid_cp

_NONCHAR_RE = re.compile(
    "[\ufdd0-\ufdef\ufffe\uffff"
    + "".join(f"{chr(p * 0x10000 + 0xFFFE)}{chr(p * 0x10000 + 0xFFFF)}" for p in range(1, 17))
    + "]"
)
_MIN_CP = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)


def _mod_utf8_codepoint(b: bytes, i: int) -> tuple[int, int]:
    """util/unicode.c mod_utf8_codepoint(): (codepoint or -1, end index)."""
    n = len(b)
    byte = b[i]
    i += 1
    if byte < 0x80:
        return byte, i
    if byte >= 0xFE or not byte & 0x40:
        return -1, i
    length = 0
    mask = 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    cp = byte & (mask - 1)
    for _ in range(1, length):
        nxt = b[i] if i < n else 0
        if nxt & 0xC0 != 0x80:
            return -1, i
        i += 1
        cp = (cp << 6) | (nxt & 0x3F)
    if not _valid_cp(cp) or (cp < _MIN_CP[length - 2] and not (cp == 0 and length == 2)):
        return -1, i
    return cp, i


def writer_text(b: bytes) -> str:
    """The text json-writer.c prints for C string ``b`` (invalid sequences -> U+FFFD)."""
    b = b.split(b"\0", 1)[0]
    if b.isascii():
        return b.decode("ascii")
    if b"\xc0\x80" not in b:
        try:
            s = b.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            if not _NONCHAR_RE.search(s):
                return s
    out: list[str] = []
    i = 0
    while i < len(b):
        cp, i = _mod_utf8_codepoint(b, i)
        out.append(chr(cp) if cp >= 0 else "\ufffd")
    return "".join(out)


def literal(seg: bytes) -> str:
    """Decode a run of raw string bytes (no backslash), as parse_string() validates it."""
    if seg.isascii():
        return seg.decode("ascii")
    if b"\xc0\x80" not in seg:
        try:
            s = seg.decode("utf-8")
        except UnicodeDecodeError:
            raise _Error(b"invalid UTF-8 sequence in string") from None
        if _NONCHAR_RE.search(s):
            raise _Error(b"invalid UTF-8 sequence in string")
        return s
    out: list[str] = []
    i = 0
    while i < len(seg):
        cp, i = _mod_utf8_codepoint(seg, i)
        if cp < 0:
            raise _Error(b"invalid UTF-8 sequence in string")
        out.append(chr(cp))
    return "".join(out)


_SIMPLE_ESCAPES = {
    0x22: '"',
    0x27: "'",
    0x5C: "\\",
    0x2F: "/",
    0x62: "\b",
    0x66: "\f",
    0x6E: "\n",
    0x72: "\r",
    0x74: "\t",
}
_HEX4 = re.compile(rb"[0-9a-fA-F]{4}")


def _hex4(b: bytes, i: int) -> int:
    """json-parser.c cvt4hex(): four hex digits at b[i:], else -1."""
    return int(b[i : i + 4], 16) if _HEX4.match(b, i) else -1


def parse_string(tok: bytes) -> str:
    """json-parser.c parse_string() on a complete string token (quotes included)."""
    body = tok[1:-1]
    if 0x5C not in body:
        return literal(body)
    parts: list[str] = []
    pos = 0
    while True:
        j = body.find(b"\\", pos)
        if j < 0:
            parts.append(literal(body[pos:]))
            return "".join(parts)
        if j > pos:
            parts.append(literal(body[pos:j]))
        esc = body[j + 1]  # the lexer never ends a string right after a backslash
        simple = _SIMPLE_ESCAPES.get(esc)
        if simple is not None:
            parts.append(simple)
            pos = j + 2
            continue
        if esc != 0x75:  # 'u'
            raise _Error(b"invalid escape sequence in string")
        cp = _hex4(body, j + 2)
        end = j + 6
        if 0xD800 <= cp <= 0xDBFF and body[end : end + 2] == b"\\u":
            trailing = _hex4(body, end + 2)
            if 0xDC00 <= trailing <= 0xDFFF:
                cp = 0x10000 + ((cp & 0x3FF) << 10) + (trailing & 0x3FF)
                end += 6
            else:
                cp = -1
        if not _valid_cp(cp):
            # "%.*s" of the escape; the C string ends after the closing quote
            text = (body + tok[-1:])[j:end]
            raise _Error(text + b" is not a valid Unicode character")
        parts.append(chr(cp))
        pos = end
