"""`vzdump-hook guest install VMID`: deploy the guest side (examples/guest/) into a guest."""

from __future__ import annotations

import os

import click

from ..errors import HookError
from ..guest import install as guest_install
from ..guest.session import describe
from ..node.state import forget_recovery_answers
from ..phase.runner import settings_with_env
from ..text import escape, escape_lines
from .common import config_option, load_config, targets


@click.group("guest")
def guest() -> None:
    """The guest side: recovery at boot and past a marker's deadline, and the wrapper the node's key is
    restricted to."""


@guest.command("install")
@click.argument("vmid", type=int)
@click.option("--dry-run", is_flag=True, help="Change nothing: show what would change.")
@click.option("--no-restrict", is_flag=True, help="Install the files, leave the node's key unrestricted.")
@click.option("--identity-file", metavar="KEY",
              help="Connect with this key (one with a shell) instead of the node's, e.g. when that is restricted "
                   "already.")
@click.option("--authorized-keys", default=guest_install.AUTHORIZED_KEYS, show_default=True,
              help="The guest's authorized_keys file (relative: in the SSH user's home).")
@config_option
def guest_install_command(vmid: int, dry_run: bool, no_restrict: bool, identity_file: str | None,
                          authorized_keys: str, config_path: str | None) -> None:
    """Deploy the guest side to VMID over its transport; idempotent. Exit 1 if it could not."""
    cfg = load_config(config_path)
    g = targets(cfg, vmid)[0]
    doing = "what would change (dry run)" if dry_run else "installing the guest side"
    click.echo(f"{vmid} {g.describe_target()}: {doing}")
    # its diffs show the guest's files: escaped, line by line
    inst = guest_install.Installer(g, guest_install.Layout.from_env(), lambda text: click.echo(escape_lines(text)),
                                   dry_run=dry_run, restrict=not no_restrict, authorized_keys=authorized_keys,
                                   identity_file=identity_file)
    try:
        inst.run()
    except HookError as e:
        raise click.ClickException(escape(describe(e))) from None  # may quote what the guest said
    if not dry_run:
        forget_recovery_answers(settings_with_env(cfg.hook, os.environ).state_dir, vmid)
    click.echo(f"{vmid}: {len(inst.changed)} change(s){' to make' if dry_run else ''}")
