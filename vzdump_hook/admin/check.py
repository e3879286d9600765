"""`vzdump-hook check`: validate the config and the node's side, reach each guest, show what a backup
would stop; `check --cluster`: which nodes of the cluster run the hook, and which version."""

from __future__ import annotations

import contextlib
import os
import sys
import time

import click

from .. import config as configuration
from ..config import Config, GuestConfig, HookSettings
from ..errors import ConfigError, HookError
from ..guest import install as guest_install
from ..guest.session import GuestSession, Preflight, describe
from ..node import safefile, tags
from ..node.job import JobId
from ..node.state import keep_recovery_answer
from ..phase.runner import settings_with_env
from ..text import escape
from .common import config_option, contact, load_config, targets


@click.command("check")
@click.argument("vmid", type=int, required=False)
@config_option
@click.option("--timeout", default=30.0, show_default=True, help="Seconds per guest.")
@click.option("--no-connect", is_flag=True, help="Validate the config (and the node's side) only; contact no guest.")
@click.option("--cluster", "cluster_", is_flag=True,
              help="Only: which nodes of the cluster run the hook, and which version.")
def check(vmid: int | None, config_path: str | None, timeout: float, no_connect: bool, cluster_: bool) -> None:
    """Validate the config, reach each guest, show what a backup would stop. Changes nothing in the
    guests. Exit 1 on any problem (warnings alone: 0)."""
    if cluster_:
        _check_cluster(config_path)
        return
    cfg = load_config(config_path)
    _report_node(cfg.hook.pve_dir)
    guests = targets(cfg, vmid)
    _show_config(cfg, guests, vmid)
    settings = settings_with_env(cfg.hook, os.environ)
    node_ok = _node_ok(cfg, settings)
    if no_connect:
        sys.exit(0 if node_ok else 1)
    results = _check_guests(guests, settings.state_dir, timeout)
    for text, _ in results:
        click.echo(text)
    if not node_ok or not all(ok for _, ok in results):
        sys.exit(1)


def _show_config(cfg: Config, guests: list[GuestConfig], vmid: int | None) -> None:
    """The config's line, which guests are in or out (all of them asked), its warnings."""
    members = tags.members(cfg) if vmid is None else []
    none = " (none: add a [guests.VMID] table, or tag a guest " + (cfg.hook.tag or "(tags are off)") + ")"
    click.echo(f"config {cfg.source}: ok, {len(guests)} guest(s) handled" + ("" if guests else none))
    for m in members:
        click.echo(f"  {m.vmid}: {'in' if m.guest else 'out'}: {m.why}")
    for w in configuration.warnings(cfg) + tags.warnings(cfg):
        click.echo(f"  WARNING: {w}")


def _node_ok(cfg: Config, settings: HookSettings) -> bool:
    """Whether the node's side is fine: the chained scripts run, the run and state dirs are root's."""
    ok = True
    for script in cfg.hook.chain:
        if not (os.path.isfile(script) and os.access(script, os.X_OK)):
            click.echo(f"  hook.chain: {script} is not an executable file: every phase would report it failed")
            ok = False
    for d in (settings.run_dir, settings.state_dir):
        try:
            safefile.private_dir(d)  # root's alone (an older install's 0755 is fixed)
            if not os.access(d, os.W_OK):
                raise OSError("not writable")
        except (OSError, safefile.UnsafePath) as e:
            click.echo(f"  {d}: {e}")
            ok = False
    return ok


def _check_guests(guests: list[GuestConfig], state_dir: str, timeout: float) -> list[tuple[str, bool]]:
    """Each guest's lines and whether it is fine, all guests at once."""
    seconds = 2 * timeout + 5
    answers = contact(lambda g: _check_guest(g, state_dir, timeout), guests, seconds)
    return [a if a is not None else (f"{g.vmid} {g.describe_target()}: FAILED: no answer within {seconds:g} s", False)
            for g, a in zip(guests, answers, strict=True)]


def _check_guest(g: GuestConfig, state_dir: str, timeout: float) -> tuple[str, bool]:
    ctl = GuestSession(g, JobId.current())
    start = time.monotonic()
    try:
        p = ctl.preflight(time.monotonic() + timeout)
        side, side_ok = _guest_side(ctl, g, state_dir, time.monotonic() + timeout)
    except HookError as e:
        return escape(f"{g.vmid} {g.describe_target()}: FAILED: {describe(e)}"), False
    finally:
        ctl.close()
    lines = _preflight_lines(g, p, time.monotonic() - start) + [f"    {side}"]
    return "\n".join(escape(line) for line in lines), side_ok and not p.absent


def _preflight_lines(g: GuestConfig, p: Preflight, took: float) -> list[str]:
    """What check shows of a guest that answered (before its guest-side line)."""
    lines = [f"{g.vmid} {g.describe_target()}: ok in {took:.1f} s, compose: {' '.join(p.compose) or 'not used'}"]
    lines.append(f"    running stacks: {', '.join(p.running) or 'none'}")
    order = "in parallel" if g.parallel else "in this order, started in reverse"
    lines.append(f"    a backup stops: {', '.join(p.selected) or 'nothing'}"
                 + (f" ({order})" if len(p.selected) > 1 else ""))
    if p.missing:
        lines.append(f"    configured but not running (left alone): {', '.join(p.missing)}")
    lines += [f"    DOES NOT EXIST: {a}: fix the name (a backup of {g.vmid} is crash-consistent for it)"
              for a in p.absent]
    lines.append(f"    on_quiesce_error = {g.on_quiesce_error.value}, stop_timeout = {g.stop_timeout:g} s, "
                 f"max_downtime = {g.max_downtime:g} s")
    lines += [f"    {note}" for note in p.notes]
    if p.marker is not None:
        age = time.time() - p.marker.written_at
        lines.append(f"    MARKER present: job {p.marker.job}, {age:.0f} s old, lists "
                     f"{', '.join(s.name for s in p.marker.stacks)} (`vzdump-hook recover {g.vmid}`)")
    return lines


def _guest_side(ctl: GuestSession, g: GuestConfig, state_dir: str, deadline: float) -> tuple[str, bool]:
    """check's guest-side line, and whether it is no problem. A recovery program that is missing or
    outdated is one: a restore of a backup would come up with its stacks stopped (docker does not
    start containers stopped by hand); so is a marker directory others may write to. The answer is
    kept for backup-start's note (state.recovery_answer)."""
    if g.transport == "none":
        return ("guest side: not reached (transport none): its controller keeps its own marker and starts its "
                "apps after a restore"), True
    try:
        setup = guest_install.inspect(ctl.t, g, guest_install.Layout.from_env(), deadline)
    except (HookError, OSError) as e:
        return f"guest side: unknown ({e})", True
    with contextlib.suppress(OSError):
        keep_recovery_answer(state_dir, g.vmid, setup.recovery, time.time())
    ok = setup.error != "" or (setup.recovery == "current" and not setup.marker_dir.startswith("INSECURE"))
    return setup.line(g.vmid, g.transport), ok


def _report_node(pve_dir: str) -> None:
    from ..node import cluster

    try:
        cluster.report(pve_dir, JobId.current().node)
    except OSError as e:
        click.echo(f"  {pve_dir}: this node's report for `check --cluster` not written: {e.strerror or e}")


def _check_cluster(config_path: str | None) -> None:
    from ..node import cluster

    try:
        pve_dir = configuration.load(config_path).hook.pve_dir
    except ConfigError as e:
        pve_dir = configuration.HookSettings().pve_dir
        click.echo(f"config: {e} (reading the cluster from {pve_dir})")
    _report_node(pve_dir)
    me = cluster.installed_version()
    states = cluster.nodes(pve_dir)
    if not states:
        raise click.ClickException(f"{pve_dir}/nodes: not found: not a Proxmox VE node")
    now = time.time()
    bad = False
    for n in states:
        problem = n.problem(me, now)
        bad = bad or problem is not None
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(n.at)) if n.at else "-"
        script = "" if n.version is None else \
            f", vzdump.conf script: {n.script or 'none (jobs with their own script option only)'}"
        click.echo(f"{n.node}: " + (f"PROBLEM: {problem}" if problem else f"vzdump-hook {n.version}")
                   + (f" (reported {when}{script})" if n.version else ""))
    sys.exit(1 if bad else 0)
