"""The click command `vzdump-hook enable`; what it does is in enable.py, which imports no click (the
job-start phase reads vzdump.conf's script with it)."""

from __future__ import annotations

import click

from .. import config as configuration
from ..errors import HookError
from ..guest.session import describe
from ..text import escape
from . import enable as en
from .common import config_option, confirm, launcher_option, note_job_scripts, vzdump_conf_option


@click.command("enable")
@vzdump_conf_option
@launcher_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask before moving an existing script into [hook] chain.")
@config_option
def enable(vzdump_conf: str, launcher: str | None, yes: bool, config_path: str | None) -> None:
    """Name the hook in vzdump.conf (`script:`). A script named there already keeps running:
    it is moved into [hook] chain of the config, after confirmation."""
    launcher = launcher or en.default_launcher()
    path = configuration.config_path(config_path)
    p = en.plan(en.read(vzdump_conf), launcher)
    if p.already:
        click.echo(f"{vzdump_conf}: script: {launcher} (already enabled)")
        return
    if p.moved:
        _move_into_chain(vzdump_conf, p.moved, path, yes)
    en.write(vzdump_conf, p.vzdump_conf)
    click.echo(f"{vzdump_conf}: script: {launcher}")
    note_job_scripts(launcher)


def _move_into_chain(vzdump_conf: str, moved: tuple[str, ...], path: str, yes: bool) -> None:
    """The scripts vzdump.conf names into [hook] chain of the config at `path`, once confirmed."""
    click.echo(f"{vzdump_conf} names another hook script: {', '.join(moved)}. vzdump runs only one; "
               f"vzdump-hook would run it in every phase, with vzdump's arguments and environment "
               f"([hook] chain in {path}).")
    if not yes:
        confirm("Move it into [hook] chain and make vzdump-hook the script?", "nothing changed")
    cfg_text = en.read(path)
    try:
        new_cfg = en.with_chain(cfg_text, moved, path)
    except HookError as e:
        raise click.ClickException(escape(describe(e))) from None
    if new_cfg != cfg_text:
        en.write(path, new_cfg)
        click.echo(f"{path}: [hook] chain = {list(moved)}")
