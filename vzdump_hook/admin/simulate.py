"""`vzdump-hook simulate`: play vzdump's phase order for one guest, each phase a new `vzdump-hook`
process (no backup is taken); `--dry-run`: what each phase would do."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import click

from .. import config as configuration
from ..config import Config, GuestConfig
from ..errors import HookError
from ..guest import install as guest_install
from ..guest.session import GuestSession, describe
from ..node.job import JobId
from ..node.state import GuestRecord, Status
from ..phase.runner import STATE_DIR_ENV
from ..resident.client import RUN_DIR_ENV
from ..text import escape
from ..vzdump import rules
from ..vzdump.phases import POINT_IN_TIME, TRANSFER, GuestType, Mode, Phase, backup_order
from .common import config_option, confirm, load_config, targets


@click.command("simulate")
@click.argument("vmid", type=int)
@click.option("--type", "vmtype", type=click.Choice([t.value for t in GuestType]), required=True)
@click.option("--mode", type=click.Choice([m.value for m in Mode]), default="snapshot", show_default=True)
@click.option("--pause", default=2.0, show_default=True, help="Seconds to wait at the backup's point in time.")
@click.option("--transfer", default=0.0, show_default=True, help="Seconds of simulated data transfer.")
@click.option("--dry-run", is_flag=True, help="Change nothing: check the guest and print what each phase would do.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before really stopping the guest's stacks.")
@config_option
def simulate(vmid: int, vmtype: str, mode: str, pause: float, transfer: float, dry_run: bool, yes: bool,
             config_path: str | None) -> None:
    """Play vzdump's phase order for one guest: each phase a new `vzdump-hook` process with
    vzdump's emptied environment, a pause at the point in time, then the rest of the phases.
    This REALLY stops and starts the guest's stacks (no backup is taken); --dry-run changes nothing."""
    cfg = load_config(config_path)
    g = targets(cfg, vmid)[0]
    vt, md = GuestType(vmtype), Mode(mode)
    order = ("job-init", "job-start", *backup_order(vt, md), "job-end")
    if dry_run:
        _simulate_dry(g, vt, md, order)
        return
    if not yes:
        click.echo(f"simulate {vmid}: this REALLY stops the stacks a backup would stop in guest {vmid} "
                   f"({g.describe_target()}) and starts them again after {pause:g} s (+ {transfer:g} s transfer); "
                   f"no backup is taken. `--dry-run` only shows what would happen.")
        confirm("Stop them now?", "nothing done")
    sys.exit(_play(order, _child_env(cfg, vmid, vmtype), vmid, vt, md, pause, transfer))


def _child_env(cfg: Config, vmid: int, vmtype: str) -> dict[str, str]:
    """The environment of each phase: vzdump's (emptied, its variables for the guest)."""
    env = {"STOREID": "simulate", "DUMPDIR": "/tmp", "VMTYPE": vmtype, "HOSTNAME": f"guest{vmid}",
           "TARGET": f"/tmp/vzdump-{vmtype}-{vmid}-simulate.tar", "LOGFILE": "/dev/null"}
    # Test/dev deviation from vzdump: the config path (and state dirs) must reach the child.
    env[configuration.CONFIG_ENV] = cfg.source
    # the phases look where `check` looked
    for k in (RUN_DIR_ENV, STATE_DIR_ENV, guest_install.GUEST_ROOT_ENV, "VZDUMP_HOOK_DEBUG"):
        if os.environ.get(k):
            env[k] = os.environ[k]
    return env


def _play(order: tuple[str, ...], env: dict[str, str], vmid: int, vt: GuestType, md: Mode, pause: float,
          transfer: float) -> int:
    """Run the phases in `order` as vzdump would (after a failed backup: backup-abort, no more of the
    guest's phases; after a failed job-start: job-abort, the end); the exit status."""
    t0 = time.monotonic()
    failed = False
    for step in order:
        if step in (POINT_IN_TIME, TRANSFER):
            _wait(step, pause, transfer, t0)
            continue
        if failed and step in ("pre-stop", "pre-restart", "post-restart", "backup-end"):
            continue
        if failed and step == "log-end":
            _run_hook(["backup-abort", md.value, str(vmid)], env, t0)
        argv = [step] if step.startswith("job-") else [step, md.value, str(vmid)]
        code = _run_hook(argv, env, t0)
        if code and rules.fails_backup(Phase(step), vt, md):
            click.echo(f"{time.monotonic() - t0:6.1f}s  ERROR: {step} exited {code}: vzdump fails this guest's backup")
            failed = True
        elif code and step == "job-start":
            click.echo(f"{time.monotonic() - t0:6.1f}s  ERROR: job-start exited {code}: vzdump aborts the job")
            _run_hook(["job-abort"], env, t0)
            return 1
    return 1 if failed else 0


def _wait(step: str, pause: float, transfer: float, t0: float) -> None:
    """The backup's point in time (`pause`), or its data transfer (`transfer`, if any)."""
    if step == POINT_IN_TIME:
        click.echo(f"{time.monotonic() - t0:6.1f}s  --- backup's point in time (pause {pause:g} s) ---")
        time.sleep(pause)
    elif transfer:
        click.echo(f"{time.monotonic() - t0:6.1f}s  --- data transfer ({transfer:g} s) ---")
        time.sleep(transfer)


def _run_hook(argv: list[str], env: dict[str, str], t0: float) -> int:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-I", "-m", "vzdump_hook", *argv], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout.splitlines():
        click.echo(f"{time.monotonic() - t0:6.1f}s  INFO: {escape(line)}")  # its stderr too (a traceback)
    click.echo(f"{time.monotonic() - t0:6.1f}s  ({' '.join(argv)}: exit {proc.returncode}, "
               f"{time.monotonic() - start:.2f} s)")
    return proc.returncode


def _simulate_dry(g: GuestConfig, vt: GuestType, md: Mode, order: tuple[str, ...]) -> None:
    ctl = GuestSession(g, JobId.current())
    try:
        p = ctl.preflight(time.monotonic() + 30)
    except HookError as e:
        raise click.ClickException(escape(f"{g.vmid}: {describe(e)}")) from None
    finally:
        ctl.close()
    rec = GuestRecord(g.vmid, vt, md, {}, status=Status.PREFLIGHT_OK)
    for step in order:
        if step in (POINT_IN_TIME, TRANSFER):
            click.echo(f"  {step}")
            continue
        plan = rules.plan(Phase(step), vt, md, rec, g.early_resume)
        click.echo(f"  {step:13} {_dry_step(plan, ctl.t.target, p.selected)}")
        if plan.step is rules.Step.QUIESCE and p.selected:
            rec.status = Status.QUIESCED
        elif plan.step is rules.Step.RESUME:
            rec.status = Status.RESUMED


def _dry_step(plan: rules.Plan, target: str, selected: tuple[str, ...]) -> str:
    """What a phase would do, in --dry-run's words."""
    what = {
        rules.Step.SWEEP: "resume markers left by jobs that are over",
        rules.Step.PREFLIGHT: f"check the guest ({target}): ok now",
        rules.Step.QUIESCE: f"write the marker, stop {', '.join(selected) or 'nothing'}",
        rules.Step.RESUME: f"start {', '.join(reversed(selected)) or 'nothing'}, remove the marker",
        rules.Step.ARM_WATCHER: "watch QMP: start the stacks once QEMU's backup job has started",
        rules.Step.FINISH: "last resume attempts, summary",
    }.get(plan.step, plan.note or "nothing")
    if plan.arm_watcher:
        what += "; then watch QMP: start the stacks once QEMU's backup job has started"
    return what
