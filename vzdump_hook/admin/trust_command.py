"""The click command `vzdump-hook trust VMID`; what it does is in trust.py (no click there)."""

from __future__ import annotations

import click

from ..errors import HookError
from ..guest.session import describe
from ..text import escape
from . import trust as hostkeys
from .common import config_option, confirm, load_config, targets


@click.command("trust")
@click.argument("vmid", type=int)
@click.option("--yes", "-y", is_flag=True,
              help="Trust without asking (only after comparing the fingerprint some other way).")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait for the guest's sshd.")
@config_option
def trust(vmid: int, yes: bool, timeout: float, config_path: str | None) -> None:
    """Show the SSH host key of guest VMID with the command that prints the same fingerprint in the
    guest; add it to the guest's known_hosts once confirmed."""
    g = targets(load_config(config_path), vmid)[0]
    if g.transport != "ssh" or g.ssh is None:
        raise click.ClickException(f"guest {vmid} uses transport {g.transport}: there is no SSH host key to trust")
    try:
        hk = hostkeys.fetch(g.ssh, timeout)
        have = hostkeys.known(g.ssh.known_hosts, hk)
    except HookError as e:
        raise click.ClickException(escape(describe(e))) from None  # may quote what the guest said
    click.echo(f"{vmid} {g.describe_target()}: host key {hk.fingerprint}")
    if have == "same":
        click.echo(f"already trusted in {g.ssh.known_hosts}")
        return
    if have == "other":
        raise click.ClickException(
            f"{g.ssh.known_hosts} has ANOTHER {hk.key.get_name()} key for {hk.name}: the guest's key changed, or "
            f"this is not the guest. If it was really reinstalled: ssh-keygen -R '{hk.name}' -f {g.ssh.known_hosts}, "
            f"then run this again")
    click.echo(f"In the guest, this prints its fingerprint; compare the two:\n    {hk.guest_command}")
    if not yes:
        confirm(f"Trust it (add it to {g.ssh.known_hosts})?", "not trusted, nothing written")
    hostkeys.add(g.ssh.known_hosts, hk)
    click.echo(f"added to {g.ssh.known_hosts}")
