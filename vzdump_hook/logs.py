"""Logging for the task log: `vzdump-hook: [LEVEL: ]message` on stdout, one line per record, guest
text escaped. Configured once per process: by cli.py for a phase, by the resident for itself."""

from __future__ import annotations

import logging
import sys

from .errors import ConfigError


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
    """`vzdump-hook: [LEVEL: ]message`, one line per record: every argument (guest text: labels,
    command output, marker fields) is escaped; the message templates and the node's config errors
    are our own text."""

    def format(self, record: logging.LogRecord) -> str:
        from .text import escape

        level = "" if record.levelno < logging.WARNING else f"{record.levelname}: "
        msg = record.msg if isinstance(record.msg, str) else escape(str(record.msg))
        args = record.args
        if isinstance(args, tuple) and args:
            args = tuple(escape(a) if isinstance(a, str) else escape(str(a)) if isinstance(a, Exception) and not isinstance(a, ConfigError) else a for a in args)
            msg = msg % args
        elif args:
            msg = record.getMessage()  # a mapping: rare, and only ever with our own values
        return f"vzdump-hook: {level}{msg}"
