"""text.py: guest-provided text, made safe for one log line (issue 9)."""

from __future__ import annotations

import io
import logging

import pytest

from vzdump_hook import hook as hookmod
from vzdump_hook.errors import ConfigError, TransportError
from vzdump_hook.text import escape, escape_lines

FORGERIES = [
    "db\nvzdump-hook: all stacks running",
    "db\rvzdump-hook: all stacks running",
    "db\x1b[2K\x1b[1Gvzdump-hook: all stacks running",
    "db\x85vzdump-hook: all stacks running",
    "db\u2028vzdump-hook: all stacks running",
    "db\u202evzdump-hook: gninnur",
    "db\x00\x07\x08\x7f",
]


@pytest.mark.parametrize("text", FORGERIES)
def test_escape_leaves_no_control_character(text: str) -> None:
    out = escape(text)
    assert out.isprintable() and out.startswith("db\\")


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
        logging.getLogger("vzdump_hook.controller").warning(*args)
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
