"""Entry point. `vzdump-hook PHASE [MODE VMID]` is vzdump calling: handled by phase/runner.py without
importing click (every phase pays its imports). Any other first word is an admin command (admin/cli.py)."""

from __future__ import annotations

import os
import sys

ADMIN_COMMANDS = frozenset({"check", "status", "recover", "simulate", "history", "guest", "trust", "enable", "setup"})


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] not in ADMIN_COMMANDS and not args[0].startswith("-"):
        from .resident.client import tell_early

        if tell_early(args, os.environ):  # first: a resume point's start is sent before the rest is imported
            sys.stdout.flush()
            os._exit(0)  # the resident did all this phase had to do for the guest
        from .logs import setup_logging
        from .phase.runner import exit_process, run_phase

        setup_logging(debug=bool(os.environ.get("VZDUMP_HOOK_DEBUG")))
        exit_process(run_phase(args, os.environ))  # at once: every phase is bounded, no thread waited for
    from .admin.cli import cli

    cli.main(args=args, prog_name="vzdump-hook")
