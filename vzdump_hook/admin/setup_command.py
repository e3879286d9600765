"""The click command `vzdump-hook setup`; what it makes is in setup.py (no click there)."""

from __future__ import annotations

import sys

import click

from .. import config as configuration
from . import enable as en
from . import setup as node_setup
from .common import config_option, launcher_option, note_job_scripts, vzdump_conf_option


@click.command("setup")
@vzdump_conf_option
@launcher_option
@config_option
def setup(vzdump_conf: str, launcher: str | None, config_path: str | None) -> None:
    """Prepare this node (idempotent; changes nothing in vzdump.conf): the config directory (0700), a
    config that handles no guest yet, the node's SSH key and known_hosts; then print the line for
    vzdump.conf, and warn when vzdump.conf names another hook script. Exit 1 if something could not be made."""
    launcher = launcher or en.default_launcher()
    ok = node_setup.prepare(configuration.config_path(config_path), click.echo)
    p = en.plan(en.read(vzdump_conf), launcher)
    if p.already:
        click.echo(f"{vzdump_conf}: enabled (script: {launcher})")
    else:
        if p.moved:
            click.echo(f"WARNING: {vzdump_conf} names another hook script: {', '.join(p.moved)}. vzdump runs only "
                       f"one: `vzdump-hook enable` makes vzdump-hook the script and runs "
                       f"{'them' if len(p.moved) > 1 else 'it'} from [hook] chain, as before.")
        click.echo(f"to enable it for every backup job, this line in {vzdump_conf} (or run `vzdump-hook enable`):\n"
                   f"    script: {launcher}")
    note_job_scripts(launcher)
    click.echo("next: add a guest to the config (or tag it vzdump-hook), `vzdump-hook trust VMID`, "
               "`vzdump-hook guest install VMID`, `vzdump-hook check`")
    sys.exit(0 if ok else 1)
