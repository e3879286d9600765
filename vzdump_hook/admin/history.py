"""`vzdump-hook history`: past quiesce/resume runs recorded on this node."""

from __future__ import annotations

import os
import time

import click

from ..node.job import JobId
from ..node.state import HostState
from ..phase.runner import settings_with_env
from ..text import escape
from .common import config_option, load_config


@click.command("history")
@click.argument("vmid", type=int, required=False)
@click.option("--limit", default=20, show_default=True)
@config_option
def history(vmid: int | None, limit: int, config_path: str | None) -> None:
    """Past quiesce/resume runs recorded on this node."""
    cfg = load_config(config_path)
    state = HostState(settings_with_env(cfg.hook, os.environ), JobId.current())
    rows = state.history(vmid, limit)
    click.echo(f"{'when':16}  {'guest':>6}  {'type/mode':14}  {'down s':>7}  {'result':22}  stacks")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["stop_started"])) if r["stop_started"] else "-"
        down = f"{r['downtime']:.1f}" if r["downtime"] is not None else "-"
        result = r["status"] + (", crash-consistent" if r["crash_consistent"] else "")
        click.echo(f"{when:16}  {r['vmid']:>6}  {r['vmtype'] + '/' + r['mode']:14}  {down:>7}  {result:22}  "
                   f"{escape(str(r['stacks']))}")
