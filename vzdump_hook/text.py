"""Text from guests, made safe for one log line or one terminal line.

A guest controls docker's labels, command output and its marker. Shown verbatim, a newline in any of
them would start a forged `vzdump-hook: ...` line in vzdump's task log, and an escape sequence would
reach the admin's terminal.
"""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, Unicode line/paragraph separators and the bidirectional overrides
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _code(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def escape(text: str) -> str:
    """`text` with every control character (newline, ESC, ...) written as a `\\xNN`/`\\uNNNN` escape."""
    return _UNSAFE.sub(_code, text)



def escape_lines(text: str) -> str:
    """A block of lines (a diff of guest files) with every line escaped; its line breaks stay."""
    return "\n".join(escape(line) for line in text.split("\n"))
