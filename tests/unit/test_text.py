"""text.py: guest-provided text, made safe for one log line (issue 9)."""

from __future__ import annotations

import io
import logging

import pytest

from vzdump_hook.errors import ConfigError, TransportError
from vzdump_hook.phase import runner as hookmod
from vzdump_hook.text import escape, escape_lines

from .test_logs import unsafe

FORGERIES = [
    "db\nvzdump-hook: all stacks running",
    "db\rvzdump-hook: all stacks running",
    "db\x1b[2K\x1b[1Gvzdump-hook: all stacks running",
    "db\x85vzdump-hook: all stacks running",
    "db\u2028vzdump-hook: all stacks running",
    "db\u202evzdump-hook: gninnur",
    "db\x00\x07\x08\x7f",
    # the rest of what str.splitlines() breaks at, CSI, and the bidi marks and isolates (issue 20)
    "db\x0bvzdump-hook: x\x0cvzdump-hook: y\x1cvzdump-hook: z\x1d\x1e\u2029",
    "db\x9b2J\x9b1Gvzdump-hook: all stacks running",
    "db\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u2066\u2067\u2068\u2069",
    "db\ud800\udc80",  # lone surrogates (undecodable bytes): no terminal shows one
]


@pytest.mark.parametrize("text", FORGERIES)
def test_escape_leaves_no_control_character(text: str) -> None:
    out = escape(text)
    assert out.isprintable() and out.startswith("db\\")


def test_escape_changes_exactly_the_unsafe_characters() -> None:
    # the oracle is Unicode's own tables (tests/unit/test_logs.py), not text.py's list
    chars = [chr(i) for i in range(0x10000)] + ["\U0001f600", "\U000e0001", "\U0010ffff"]
    assert [f"U+{ord(c):04X}" for c in chars if (escape(c) != c) != bool(unsafe(c))] == []


def test_escape_writes_each_as_its_code_and_escaping_again_changes_nothing() -> None:
    assert [escape(c) for c in "\x85\x9b\x1b\u2028\u202e\u061c\ud800"] == ["\\x85", "\\x9b", "\\x1b", "\\u2028",
                                                                        "\\u202e", "\\u061c", "\\ud800"]
    for text in FORGERIES:
        assert escape(escape(text)) == escape(text)


def test_escape_keeps_ordinary_text() -> None:
    assert escape("/srv/caf\u00e9 d'x; $(y) \\n") == "/srv/caf\u00e9 d'x; $(y) \\n"
    assert escape("a\tb") == "a\\x09b"


def _task_log(*args: object) -> str:
    """What the hook's own log handler writes for `log.warning(*args)`."""
    root = logging.getLogger("vzdump_hook")
    saved = (root.handlers[:], root.level, root.propagate)
    try:
        hookmod.setup_logging()
        out = io.StringIO()
        (handler,) = root.handlers
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(out)
        logging.getLogger("vzdump_hook.guest.session").warning(*args)
        return out.getvalue()
    finally:
        root.handlers[:], root.level, root.propagate = saved


@pytest.mark.parametrize("text", FORGERIES)
def test_a_guest_string_in_a_log_record_is_one_line(text: str) -> None:
    err = TransportError("compose stop failed", stderr=text)
    for args in (("%s: %s", "101", text), ("%s", err)):
        out = _task_log(*args)
        assert out.count("\n") == 1 and out.endswith("\n") and out.startswith("vzdump-hook: WARNING: ")
        assert out[:-1].isprintable(), out


def test_a_config_error_keeps_its_lines() -> None:
    # the node's own config (root's file) is no guest text: each problem stays on its line
    out = _task_log("config: %s", ConfigError(["guests.101.ssh: missing", "guests.102: bad"], "/etc/x.toml"))
    assert out.splitlines()[1:] == ["  guests.101.ssh: missing", "  guests.102: bad"]


def test_escape_lines_keeps_the_line_breaks_only() -> None:
    assert escape_lines("-a\x1b[2J\n+b\r\n") == "-a\\x1b[2J\n+b\\x0d\n"
