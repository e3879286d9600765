"""What several admin commands share: their options, the config, the guests a command is for,
contacting guests at once, the ledger of outstanding markers."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import click

from .. import config as configuration
from ..config import Config, GuestConfig
from ..errors import ConfigError
from ..guest import fanout
from ..node import tags
from ..node.job import JobId
from ..node.ledger import Entry, Ledger, LedgerError
from ..phase.runner import HARD_GRACE
from .enable import job_scripts

T = TypeVar("T")
R = TypeVar("R")

config_option = click.option(
    "--config", "config_path", metavar="FILE",
    help=f"config file [default: ${configuration.CONFIG_ENV} or {configuration.DEFAULT_CONFIG_PATH}]")
launcher_option = click.option(
    "--launcher", default=None,
    help="The path vzdump is to run [default: /usr/bin/vzdump-hook from the Debian package, "
         "else /usr/local/bin/vzdump-hook].")
vzdump_conf_option = click.option(
    "--vzdump-conf", default="/etc/vzdump.conf", show_default=True, help="vzdump's node-wide defaults.")


def load_config(path: str | None) -> Config:
    try:
        return configuration.load(path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


def targets(cfg: Config, vmid: int | None, all_: bool = True) -> list[GuestConfig]:
    """Guest `vmid` (configured or tagged; else an error), or every guest handled."""
    if vmid is not None:
        g = cfg.guests.get(vmid) or tags.guest_config(cfg, vmid)
        if g is None:
            raise click.ClickException(
                f"guest {vmid} is not in {cfg.source}" + (f" and not tagged {cfg.hook.tag}" if cfg.hook.tag else ""))
        return [g]
    return [m.guest for m in tags.members(cfg) if m.guest is not None] if all_ else []


def contact(fn: Callable[[T], R], items: Sequence[T], seconds: float) -> list[R | None]:
    """fn(item) for every guest at once, within `seconds` (None: no answer by then); progress on a
    terminal when there are more than a few."""

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    progress = fanout.progress_for(items, sys.stdout.isatty(), write, f"contacting {len(items)} guests")
    try:
        return fanout.run_all(fn, items, time.monotonic() + seconds, progress)
    finally:
        if progress is not None:
            progress.end()


def open_ledger(settings: configuration.HookSettings) -> Ledger:
    return Ledger.for_settings(settings, JobId.current().node, settle=settings.phase_timeout + HARD_GRACE)


def ledger_entries(ledger: Ledger) -> dict[int, list[Entry]]:
    try:
        return ledger.entries()
    except LedgerError as e:
        raise click.ClickException(str(e)) from None


def note_job_scripts(launcher: str) -> None:
    """enable's and setup's note on backup jobs that set a script of their own."""
    jobs, own = job_scripts(configuration.HookSettings().pve_dir)
    if own:
        click.echo(f"note: backup jobs in {jobs} set their own script ({', '.join(own)}); those jobs do not run "
                   f"the node's. Point them at {launcher} (and that script into [hook] chain) where vzdump-hook "
                   f"should run.")


def confirm(question: str, refused: str) -> None:
    """Ask `question` (on the terminal, or read from a pipe); ClickException(`refused`) unless the answer
    is yes. With no answer to read (no terminal: cron, a script, Ansible; end of input) it says that
    --yes runs the command unattended, where click alone prints only "Aborted!"."""
    try:
        ok = click.confirm(question, default=False)
    except click.Abort:
        raise click.ClickException(f"no answer to {question!r} (no terminal, or end of input): run it again "
                                   f"with --yes (-y) to go ahead unattended; {refused}") from None
    if not ok:
        raise click.ClickException(refused)
