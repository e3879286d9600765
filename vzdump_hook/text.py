"""Text from guests, made safe for one log line or one terminal line.

A guest controls docker's labels, command output and its marker. Shown verbatim, a newline in any of
them would start a forged `vzdump-hook: ...` line in vzdump's task log, and an escape sequence would
reach the admin's terminal.
"""

from __future__ import annotations

import re

# What must not reach a terminal or a one-line log: the C0 controls (ESC, \n, \r, \v, \f and the
# separators \x1c-\x1e, which str.splitlines() breaks at), DEL, the C1 controls (NEL \x85, CSI
# \x9b), the line and paragraph separators, the bidirectional marks (ALM U+061C, LRM, RLM),
# embeddings, overrides and isolates, and lone surrogates (no UTF-8 terminal can show one: written
# out, they fail the whole log line). Every character str.splitlines() breaks at is in it.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def _code(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def escape(text: str) -> str:
    """`text` with every control character (newline, ESC, ...) written as a `\\xNN`/`\\uNNNN` escape.
    What it returns holds none of them, so escaping it again changes nothing."""
    return _UNSAFE.sub(_code, text)


def escape_lines(text: str) -> str:
    """A block of lines (a diff of guest files) with every line escaped; its line breaks stay."""
    return "\n".join(escape(line) for line in text.split("\n"))
