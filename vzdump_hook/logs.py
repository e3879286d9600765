"""Logging for the task log: `vzdump-hook: [LEVEL: ]message` on stdout, one line per record, guest
text escaped. Configured once per process: by cli.py for a phase, by the resident for itself."""

from __future__ import annotations

import logging
import operator
import sys
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError
from .text import escape

# Shown as they are: their str() and repr() are digits, a sign, a point, `inf`/`nan` or True/False.
# Exact types only: a subclass (an IntEnum, anything) may print whatever its __str__ returns.
_PLAIN = (int, float, bool)


def setup_logging(debug: bool = False) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(Formatter())
    root = logging.getLogger("vzdump_hook")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
    if not debug:
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)


class Formatter(logging.Formatter):
    """`vzdump-hook: [LEVEL: ]message`, one line per record. Every argument that is not a plain
    number is shown escaped, whatever its type (guest text comes as str, bytes, exceptions, a JobId,
    lists of names...), and so is the template. A config error keeps its problems on their own
    lines, each escaped; a traceback (--debug) follows on indented lines, each escaped."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname}: "
        # the template is our own literal (tests/unit/test_logs.py), escaped all the same: cheap, and
        # a line of text passed as the message itself cannot break the line either
        msg = escape(record.msg if isinstance(record.msg, str) else str(record.msg))
        args = record.args
        if isinstance(args, Mapping):  # log.info("%(name)s", {...}): logging unwraps a single mapping
            msg = msg % {k: shown(v) for k, v in args.items()}
        elif args:
            msg = msg % tuple(shown(a) for a in args)
        out = f"vzdump-hook: {level}{msg}"
        extra = []
        if record.exc_info and record.exc_info[0] is not None:
            extra.append(self.formatException(record.exc_info))
        elif record.exc_text and not record.exc_info:  # a record made elsewhere, its traceback as text
            extra.append(record.exc_text)
        if record.stack_info:
            extra.append(self.formatStack(record.stack_info))
        for block in extra:  # indented: no line of it can pass for a line of ours
            out += "".join(f"\n  {escape(line)}" for line in block.split("\n"))
        return out


def shown(value: object) -> object:
    """`value` as a %-format argument of the task log: a plain number as it is, anything else escaped."""
    return value if type(value) in _PLAIN else _Shown(value)


def _text(value: object) -> str:
    if isinstance(value, ConfigError):
        # Its problems are mostly the admin's own config, which is trusted; but a ConfigError also
        # comes from the settings recorded in the ledger and the host records (validate_guest) and
        # from a controller's answer, and a problem may quote a value. So each part is escaped, and
        # only the line breaks between problems (our own layout, as errors.py lays it out) stay.
        where = f"{escape(value.source)}: " if value.source else ""
        if len(value.problems) == 1:
            return f"{where}{escape(value.problems[0])}"
        return f"{where}{len(value.problems)} problems" + "".join(f"\n  {escape(p)}" for p in value.problems)
    return escape(str(value))


class _Shown:
    """An argument as the task log shows it: str() (%s) and repr() (%r, %a) escaped to one line;
    int(), float() and index() those of the value, so that `%d`, `%.1f` and `%x` still take a number
    (and refuse text, as they would without this)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return _text(self.value)

    def __repr__(self) -> str:
        return escape(repr(self.value))

    def _number(self) -> Any:
        if isinstance(self.value, str | bytes | bytearray):  # int("5") would pass where "%d" % "5" fails
            raise TypeError(f"a real number is required, not {type(self.value).__name__}")
        return self.value

    def __int__(self) -> int:
        return int(self._number())

    def __float__(self) -> float:
        return float(self._number())

    def __index__(self) -> int:
        return operator.index(self.value)
