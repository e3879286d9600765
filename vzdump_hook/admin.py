"""Admin commands (click): check, status, recover, simulate, history."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import click

from . import config as configuration
from . import guest_install, orchestrator, tags
from .config import Config, GuestConfig
from .controller import GuestController, describe
from .errors import ConfigError, HookError
from .hook import RUN_DIR_ENV, STATE_DIR_ENV, recover_guest, settings_with_env, setup_logging
from .job import JobId
from .phases import POINT_IN_TIME, TRANSFER, GuestType, Mode, Phase, backup_order
from .state import GuestRecord, HostState, Status
from .text import escape, escape_lines

T = TypeVar("T")
R = TypeVar("R")


def _load(path: str | None) -> Config:
    try:
        return configuration.load(path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


def _targets(cfg: Config, vmid: int | None, all_: bool = True) -> list[GuestConfig]:
    if vmid is not None:
        g = cfg.guests.get(vmid) or tags.guest_config(cfg, vmid)
        if g is None:
            raise click.ClickException(f"guest {vmid} is not in {cfg.source}" + (f" and not tagged {cfg.hook.tag}" if cfg.hook.tag else ""))
        return [g]
    return [m.guest for m in tags.members(cfg) if m.guest is not None] if all_ else []


def _parallel(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    todo = list(items)
    if not todo:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(todo))) as pool:
        return list(pool.map(fn, todo))


config_option = click.option("--config", "config_path", metavar="FILE", help=f"config file [default: ${configuration.CONFIG_ENV} or {configuration.DEFAULT_CONFIG_PATH}]")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show debug logging and tracebacks.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Application-consistent Proxmox VE backups: vzdump calls `vzdump-hook PHASE [MODE VMID]`;
    these commands are for the admin."""
    setup_logging(debug)
    ctx.obj = {"debug": debug}


@cli.command()
@click.argument("vmid", type=int, required=False)
@config_option
@click.option("--timeout", default=30.0, show_default=True, help="Seconds per guest.")
def check(vmid: int | None, config_path: str | None, timeout: float) -> None:
    """Validate the config, reach each guest, show what a backup would stop. Changes nothing."""
    cfg = _load(config_path)
    guests = _targets(cfg, vmid)
    click.echo(f"config {cfg.source}: ok, {len(cfg.guests)} guest(s)" + ("" if guests else "; none enabled"))
    for m in tags.members(cfg) if vmid is None else []:
        click.echo(f"  {m.vmid}: {'in' if m.guest else 'out'}: {m.why}")
    settings = settings_with_env(cfg.hook, os.environ)
    for d in (settings.run_dir, settings.state_dir):
        try:
            os.makedirs(d, exist_ok=True)
            if not os.access(d, os.W_OK):
                raise OSError("not writable")
        except OSError as e:
            click.echo(f"  {d}: {e}")

    def one(g: GuestConfig) -> tuple[str, bool]:
        ctl = GuestController(g, JobId.current())
        start = time.monotonic()
        try:
            p = ctl.preflight(time.monotonic() + timeout)
            side = guest_install.describe(ctl.t, g, time.monotonic() + timeout)
        except HookError as e:
            return escape(f"{g.vmid} {g.describe_target()}: FAILED: {describe(e)}"), False
        finally:
            ctl.close()
        lines = [f"{g.vmid} {g.describe_target()}: ok in {time.monotonic() - start:.1f} s, compose: {' '.join(p.compose)}"]
        lines.append(f"    running stacks: {', '.join(p.running) or 'none'}")
        order = "in parallel" if g.parallel else "in this order, started in reverse"
        lines.append(f"    a backup stops: {', '.join(p.selected) or 'nothing'}" + (f" ({order})" if len(p.selected) > 1 else ""))
        if p.missing:
            lines.append(f"    configured but not running (left alone): {', '.join(p.missing)}")
        lines.append(f"    on_quiesce_error = {g.on_quiesce_error.value}, stop_timeout = {g.stop_timeout:g} s, max_downtime = {g.max_downtime:g} s")
        if p.marker is not None:
            age = time.time() - p.marker.written_at
            lines.append(f"    MARKER present: job {p.marker.job}, {age:.0f} s old, lists {', '.join(s.name for s in p.marker.stacks)} (`vzdump-hook recover {g.vmid}`)")
        lines.append(f"    {side}")
        return "\n".join(escape(line) for line in lines), True

    results = _parallel(one, guests)
    for text, _ in results:
        click.echo(text)
    if not all(ok for _, ok in results):
        sys.exit(1)


@cli.command()
@config_option
@click.option("--no-connect", is_flag=True, help="Only the node's records; do not ask the guests for markers.")
def status(config_path: str | None, no_connect: bool) -> None:
    """Markers in the guests and this node's records of running and recent jobs."""
    cfg = _load(config_path)
    settings = settings_with_env(cfg.hook, os.environ)
    jobs_dir = os.path.join(settings.run_dir, "jobs")
    try:
        keys = sorted(os.listdir(jobs_dir), key=lambda k: os.path.getmtime(os.path.join(jobs_dir, k)))
    except FileNotFoundError:
        keys = []
    for key in keys:
        pid, _, start = key.partition("-")
        job = JobId(JobId.current().node, "", int(pid), int(start or 0))
        state = HostState(settings, job)
        recs = state.records()
        running = "running" if os.path.exists(f"/proc/{pid}") else "over"
        click.echo(f"job {key} ({running}): " + ("; ".join(_rec_line(r) for r in recs) if recs else "no guests"))
    if no_connect:
        return

    def one(g: GuestConfig) -> str:
        ctl = GuestController(g, JobId.current())
        try:
            m = ctl.read_marker(time.monotonic() + 15)
        except HookError as e:
            return f"{g.vmid}: marker unknown: {describe(e)}"
        finally:
            ctl.close()
        if m is None:
            return f"{g.vmid}: no marker"
        over = m.job.is_over()
        state = "job over" if over else "job running" if over is False else "job of another node"
        return f"{g.vmid}: MARKER of job {m.job} ({state}, {'expired' if m.expired else 'deadline ahead'}): {', '.join(s.name for s in m.stacks)}"

    for line in _parallel(one, _targets(cfg, None)):
        click.echo(escape(line))


def _rec_line(r: GuestRecord) -> str:
    down = f" down {r.downtime:.1f} s" if r.downtime is not None else ""
    return f"{r.vmid} {r.vmtype}/{r.mode} {r.status.value}{down}"


@cli.command()
@click.argument("vmid", type=int, required=False)
@click.option("--all", "all_", is_flag=True, help="Every configured guest.")
@click.option("--force", is_flag=True, help="Also markers whose job may still run (never while a backup of the guest runs!).")
@config_option
def recover(vmid: int | None, all_: bool, force: bool, config_path: str | None) -> None:
    """Start what guests' markers list, for markers whose job is over. Exit 1 if anything is still down."""
    if vmid is None and not all_:
        raise click.UsageError("give a VMID or --all")
    cfg = _load(config_path)
    settings = settings_with_env(cfg.hook, os.environ)
    state = HostState(settings, JobId.current())
    guests = _targets(cfg, vmid)
    results = _parallel(lambda g: recover_guest(g, state.job, state, time.monotonic() + settings.sweep_timeout + g.command_timeout, force), guests)
    for g, (text, _) in zip(guests, results, strict=True):
        click.echo(escape(text) or f"{g.vmid}: no marker, nothing to do")
    if any(down for _, down in results):
        sys.exit(1)


@cli.group()
def guest() -> None:
    """The guest side: recovery at boot and past a marker's deadline, and the wrapper the node's key is restricted to."""


@guest.command("install")
@click.argument("vmid", type=int)
@click.option("--dry-run", is_flag=True, help="Change nothing: show what would change.")
@click.option("--no-restrict", is_flag=True, help="Install the files, leave the node's key unrestricted.")
@click.option("--identity-file", metavar="KEY", help="Connect with this key (one with a shell) instead of the node's, e.g. when that is restricted already.")
@click.option("--authorized-keys", default=guest_install.AUTHORIZED_KEYS, show_default=True, help="The guest's authorized_keys file (relative: in the SSH user's home).")
@config_option
def guest_install_command(vmid: int, dry_run: bool, no_restrict: bool, identity_file: str | None, authorized_keys: str, config_path: str | None) -> None:
    """Deploy the guest side to VMID over its transport; idempotent. Exit 1 if it could not."""
    g = _targets(_load(config_path), vmid)[0]
    click.echo(f"{vmid} {g.describe_target()}: {'what would change (dry run)' if dry_run else 'installing the guest side'}")
    # its diffs show the guest's files: escaped, line by line
    inst = guest_install.Installer(g, guest_install.Layout.from_env(), lambda text: click.echo(escape_lines(text)), dry_run=dry_run, restrict=not no_restrict,
                                   authorized_keys=authorized_keys, identity_file=identity_file)
    try:
        inst.run()
    except HookError as e:
        raise click.ClickException(describe(e)) from None
    click.echo(f"{vmid}: {len(inst.changed)} change(s){' to make' if dry_run else ''}")


@cli.command()
@click.argument("vmid", type=int, required=False)
@click.option("--limit", default=20, show_default=True)
@config_option
def history(vmid: int | None, limit: int, config_path: str | None) -> None:
    """Past quiesce/resume runs recorded on this node."""
    cfg = _load(config_path)
    state = HostState(settings_with_env(cfg.hook, os.environ), JobId.current())
    rows = state.history(vmid, limit)
    click.echo(f"{'when':16}  {'guest':>6}  {'type/mode':14}  {'down s':>7}  {'result':22}  stacks")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["stop_started"])) if r["stop_started"] else "-"
        down = f"{r['downtime']:.1f}" if r["downtime"] is not None else "-"
        result = r["status"] + (", crash-consistent" if r["crash_consistent"] else "")
        click.echo(f"{when:16}  {r['vmid']:>6}  {r['vmtype'] + '/' + r['mode']:14}  {down:>7}  {result:22}  {r['stacks']}")


@cli.command()
@click.argument("vmid", type=int)
@click.option("--type", "vmtype", type=click.Choice([t.value for t in GuestType]), required=True)
@click.option("--mode", type=click.Choice([m.value for m in Mode]), default="snapshot", show_default=True)
@click.option("--pause", default=2.0, show_default=True, help="Seconds to wait at the backup's point in time.")
@click.option("--transfer", default=0.0, show_default=True, help="Seconds of simulated data transfer.")
@click.option("--dry-run", is_flag=True, help="Change nothing: check the guest and print what each phase would do.")
@config_option
def simulate(vmid: int, vmtype: str, mode: str, pause: float, transfer: float, dry_run: bool, config_path: str | None) -> None:
    """Play vzdump's phase order for one guest: each phase a new `vzdump-hook` process with
    vzdump's emptied environment, a pause at the point in time, then the rest of the phases."""
    cfg = _load(config_path)
    g = _targets(cfg, vmid)[0]
    vt, md = GuestType(vmtype), Mode(mode)
    order = ("job-init", "job-start", *backup_order(vt, md), "job-end")
    if dry_run:
        _simulate_dry(g, vt, md, order)
        return
    env = {"STOREID": "simulate", "DUMPDIR": "/tmp", "VMTYPE": vmtype, "HOSTNAME": f"guest{vmid}", "TARGET": f"/tmp/vzdump-{vmtype}-{vmid}-simulate.tar", "LOGFILE": "/dev/null"}
    # Test/dev deviation from vzdump: the config path (and state dirs) must reach the child.
    env[configuration.CONFIG_ENV] = cfg.source
    for k in (RUN_DIR_ENV, STATE_DIR_ENV, "VZDUMP_HOOK_DEBUG"):
        if os.environ.get(k):
            env[k] = os.environ[k]
    t0 = time.monotonic()
    failed = False
    for step in order:
        if step == POINT_IN_TIME:
            click.echo(f"{time.monotonic() - t0:6.1f}s  --- backup's point in time (pause {pause:g} s) ---")
            time.sleep(pause)
            continue
        if step == TRANSFER:
            if transfer:
                click.echo(f"{time.monotonic() - t0:6.1f}s  --- data transfer ({transfer:g} s) ---")
                time.sleep(transfer)
            continue
        if failed and step in ("pre-stop", "pre-restart", "post-restart", "backup-end"):
            continue
        if failed and step == "log-end":
            _run_hook(["backup-abort", mode, str(vmid)], env, t0)
        argv = [step] if step.startswith("job-") else [step, mode, str(vmid)]
        code = _run_hook(argv, env, t0)
        if code and _fails_backup(step, vt, md):
            click.echo(f"{time.monotonic() - t0:6.1f}s  ERROR: {step} exited {code}: vzdump fails this guest's backup")
            failed = True
        elif code and step == "job-start":
            click.echo(f"{time.monotonic() - t0:6.1f}s  ERROR: job-start exited {code}: vzdump aborts the job")
            _run_hook(["job-abort"], env, t0)
            sys.exit(1)
    sys.exit(1 if failed else 0)


def _fails_backup(step: str, vt: GuestType, md: Mode) -> bool:
    """Whether vzdump fails the guest's backup when `step` exits non-zero (main path, DESIGN.md §1)."""
    if step in ("backup-start", "pre-stop", "backup-end"):
        return True
    before_archive = (vt is GuestType.LXC and md is not Mode.STOP) or (vt is GuestType.QEMU and md is Mode.SNAPSHOT)
    return step in ("pre-restart", "post-restart") and before_archive


def _run_hook(argv: list[str], env: dict[str, str], t0: float) -> int:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "vzdump_hook", *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout.splitlines():
        click.echo(f"{time.monotonic() - t0:6.1f}s  INFO: {line}")
    click.echo(f"{time.monotonic() - t0:6.1f}s  ({' '.join(argv)}: exit {proc.returncode}, {time.monotonic() - start:.2f} s)")
    return proc.returncode


def _simulate_dry(g: GuestConfig, vt: GuestType, md: Mode, order: tuple[str, ...]) -> None:
    ctl = GuestController(g, JobId.current())
    try:
        p = ctl.preflight(time.monotonic() + 30)
    except HookError as e:
        raise click.ClickException(f"{g.vmid}: {describe(e)}") from None
    finally:
        ctl.close()
    rec = GuestRecord(g.vmid, vt.value, md.value, {}, status=Status.PREFLIGHT_OK)
    for step in order:
        if step in (POINT_IN_TIME, TRANSFER):
            click.echo(f"  {step}")
            continue
        phase = Phase(step)
        plan = orchestrator.plan(phase, vt, md, rec, g.early_resume)
        what = {
            orchestrator.Step.SWEEP: "resume markers left by jobs that are over",
            orchestrator.Step.PREFLIGHT: f"check the guest ({ctl.t.target}): ok now",
            orchestrator.Step.QUIESCE: f"write the marker, stop {', '.join(p.selected) or 'nothing'}",
            orchestrator.Step.RESUME: f"start {', '.join(reversed(p.selected)) or 'nothing'}, remove the marker",
            orchestrator.Step.ARM_WATCHER: "watch QMP: start the stacks once QEMU's backup job has started",
            orchestrator.Step.FINISH: "last resume attempts, summary",
        }.get(plan.step, plan.note or "nothing")
        if plan.arm_watcher:
            what += "; then watch QMP: start the stacks once QEMU's backup job has started"
        click.echo(f"  {step:13} {what}")
        if plan.step is orchestrator.Step.QUIESCE and p.selected:
            rec.status = Status.QUIESCED
        elif plan.step is orchestrator.Step.RESUME:
            rec.status = Status.RESUMED
