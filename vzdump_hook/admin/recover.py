"""`vzdump-hook recover`: start what guests' markers list, for markers whose job is over."""

from __future__ import annotations

import os
import sys
import time

import click

from ..config import Config, GuestConfig
from ..guest.recovery import Recovery, guest_of_entries, recover_guest
from ..node.job import JobId
from ..node.ledger import Ledger
from ..node.state import HostState
from ..phase.runner import settings_with_env
from ..text import escape
from .common import config_option, contact, ledger_entries, load_config, open_ledger, targets


@click.command("recover")
@click.argument("vmid", type=int, required=False)
@click.option("--all", "all_", is_flag=True, help="Every configured guest.")
@click.option("--force", is_flag=True,
              help="Also markers whose job may still run (never while a backup of the guest runs!).")
@config_option
def recover(vmid: int | None, all_: bool, force: bool, config_path: str | None) -> None:
    """Start what guests' markers list, for markers whose job is over. Exit 1 if anything is still down."""
    if vmid is None and not all_:
        raise click.UsageError("give a VMID or --all")
    cfg = load_config(config_path)
    settings = settings_with_env(cfg.hook, os.environ)
    state = HostState(settings, JobId.current())
    ledger = open_ledger(settings)
    guests = _guests(cfg, vmid, all_, ledger)
    seconds = settings.sweep_timeout + max((g.command_timeout for g in guests), default=0)
    deadline = time.monotonic() + seconds
    answers = contact(lambda g: recover_guest(g, state.job, state, deadline, force, ledger=ledger), guests, seconds + 1)
    results = [a if a is not None else Recovery(f"{g.vmid}: no answer within {seconds:g} s", True, False)
               for g, a in zip(guests, answers, strict=True)]
    for g, r in zip(guests, results, strict=True):
        click.echo(escape(r.text) or f"{g.vmid}: no marker, nothing to do")
    if any(r.down for r in results):
        sys.exit(1)


def _guests(cfg: Config, vmid: int | None, all_: bool, ledger: Ledger) -> list[GuestConfig]:
    """Guest `vmid`, or every guest handled; with --all also those only the ledger knows (their
    settings as recorded)."""
    guests = targets(cfg, vmid)
    if all_ and vmid is None:
        have = {g.vmid for g in guests}
        guests += [g for v, es in sorted(ledger_entries(ledger).items())
                   if v not in have and (g := guest_of_entries(es)) is not None]
    return guests
