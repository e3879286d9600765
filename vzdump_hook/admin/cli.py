"""The admin commands' click group: `vzdump-hook COMMAND` (vzdump_hook/cli.py sends the admin's words
here). Each command is a module of its own; COMMANDS lists them, one line each."""

from __future__ import annotations

import click

from ..logs import setup_logging
from . import check, enable_command, guest, history, recover, setup_command, simulate, status, trust_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vzdump-hook", message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, help="Show debug logging and tracebacks.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Application-consistent Proxmox VE backups: vzdump calls `vzdump-hook PHASE [MODE VMID]`;
    these commands are for the admin."""
    setup_logging(debug)
    ctx.obj = {"debug": debug}


COMMANDS: tuple[click.Command, ...] = (
    check.check,  # validate the config, reach each guest; --cluster: the nodes' versions
    status.status,  # markers in the guests next to the ledger, this node's jobs
    recover.recover,  # start what markers of jobs that are over list
    guest.guest,  # guest install: deploy the guest side
    history.history,  # past quiesce/resume runs
    simulate.simulate,  # play vzdump's phase order for one guest
    trust_command.trust,  # a guest's SSH host key, checked before trusted
    enable_command.enable,  # name the hook in vzdump.conf
    setup_command.setup,  # the config directory, a first config, the node's key
)
for command in COMMANDS:
    cli.add_command(command)
