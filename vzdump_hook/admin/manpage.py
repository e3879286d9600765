"""The man page vzdump-hook(8), made from the CLI's own help (click): `python3 -m vzdump_hook.admin.manpage`
prints it (roff). The Debian package builds it with this; tests/unit/test_manpage.py checks it against
the program's --help output. The date is $SOURCE_DATE_EPOCH's (reproducible builds), else today."""

from __future__ import annotations

import inspect
import os
import sys
import time
from collections.abc import Iterator

import click

PHASES = """vzdump runs \\fBvzdump-hook\\fR \\fIPHASE\\fR for the job phases (job-init, job-start, job-end,
job-abort) and \\fBvzdump-hook\\fR \\fIPHASE MODE VMID\\fR for each guest (backup-start, pre-stop,
pre-restart, post-restart, backup-end, backup-abort, log-end), each phase in a new process with an emptied
environment. For each guest in the config it stops the guest's application stacks (docker compose
projects) right before the backup's point in time and starts them again right after it, keeping a marker
file inside the guest so that nothing stays down after a crash. A hook program that cannot start fails no
backup: the launcher prints one line and exits 0 (job-end: 1)."""

FILES = [
    ("/etc/vzdump-hook/config.toml",
     "the config (TOML); every key with its default: /usr/share/doc/vzdump-hook/config.example.toml"),
    ("/etc/vzdump-hook/id_ed25519", "the node's SSH key (made by `vzdump-hook setup`)"),
    ("/etc/vzdump-hook/known_hosts", "the guests' SSH host keys (`vzdump-hook trust VMID` adds one)"),
    ("/etc/vzdump.conf",
     "vzdump's node-wide defaults: the line `script: /usr/bin/vzdump-hook` enables the hook (`vzdump-hook enable`)"),
    ("/run/vzdump-hook/, /var/lib/vzdump-hook/", "the state of running jobs, the history"),
    ("/usr/share/vzdump-hook/guest/", "the guest side that `vzdump-hook guest install VMID` deploys"),
]


def esc(text: str) -> str:
    """Text for roff: backslashes and hyphens escaped, no line starting with a control character."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in out.splitlines())


def _help(text: str | None) -> str:
    """A command's docstring as one paragraph (click keeps its indentation)."""
    return esc(" ".join(inspect.cleandoc(text or "").split()))


def _commands(group: click.Group, ctx: click.Context,
              prefix: str) -> Iterator[tuple[str, click.Command, click.Context]]:
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        sub = click.Context(cmd, info_name=name, parent=ctx)
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, sub, f"{prefix} {name}")
        else:
            yield f"{prefix} {name}", cmd, sub


def _options(cmd: click.Command, ctx: click.Context) -> list[str]:
    lines = []
    for param in cmd.get_params(ctx):
        if not isinstance(param, click.Option):
            continue  # arguments: in the usage line
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record
        lines += [".TP", f"\\fB{esc(names)}\\fR", esc(help_text) or "\\&"]
    return lines


def render(group: click.Group, when: float) -> str:
    ctx = click.Context(group, info_name="vzdump-hook")
    date = time.strftime("%Y-%m-%d", time.gmtime(when))
    lines = [
        f'.TH VZDUMP\\-HOOK 8 "{date}" "vzdump-hook" "System Administration"',
        ".SH NAME",
        "vzdump\\-hook \\- application\\-consistent Proxmox VE backups (a vzdump hook script)",
        ".SH SYNOPSIS",
        "\\fBvzdump-hook\\fR \\fIPHASE\\fR [\\fIMODE VMID\\fR]".replace("-", "\\-"),
        ".br",
        "\\fBvzdump\\-hook\\fR [\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
        ".SH DESCRIPTION",
        _help(group.help),
        ".PP",
        PHASES.replace("-", "\\-"),
        ".SH OPTIONS",
        *_options(group, ctx),
        ".SH COMMANDS",
    ]
    for name, cmd, sub in _commands(group, ctx, "vzdump-hook"):
        usage = " ".join(cmd.collect_usage_pieces(sub))
        lines += [".SS " + esc(f"{name} {usage}".strip()), _help(cmd.help)]
        opts = _options(cmd, sub)
        if opts:
            lines += [".PP", "Options:", ".RS", *opts, ".RE"]
    lines += [".SH FILES"]
    for path, what in FILES:
        lines += [".TP", f"\\fI{esc(path)}\\fR", esc(what)]
    lines += [
        ".SH EXIT STATUS",
        "Phases: 0, or non\\-zero where failing the backup is the intended outcome (the policy of the guest's",
        "config). Commands: 0 on success, 1 on a problem (see each command), 2 on a usage error.",
        ".SH SEE ALSO",
        "\\fBvzdump\\fR(1), " + esc("/usr/share/doc/vzdump-hook/README.md"),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    from .cli import cli

    when = float(os.environ.get("SOURCE_DATE_EPOCH") or time.time())
    sys.stdout.write(render(cli, when))


if __name__ == "__main__":
    main()
