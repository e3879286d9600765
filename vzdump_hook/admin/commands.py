"""Admin commands (click): check, status, recover, simulate, history."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import click

from .. import config as configuration
from ..config import Config, GuestConfig
from ..errors import ConfigError, HookError
from ..guest import fanout
from ..guest import install as guest_install
from ..guest.marker import Marker
from ..guest.recovery import Recovery, guest_of_entries, recover_guest
from ..guest.session import GuestSession, describe
from ..logs import setup_logging
from ..node import pve, safefile, tags
from ..node.job import JobId
from ..node.ledger import Entry, Ledger, LedgerError
from ..node.state import GuestRecord, HostState, Status, forget_recovery_answers, keep_recovery_answer
from ..phase.runner import HARD_GRACE, STATE_DIR_ENV, settings_with_env
from ..resident import process as resident
from ..resident.client import RUN_DIR_ENV
from ..text import escape, escape_lines
from ..vzdump import rules
from ..vzdump.phases import POINT_IN_TIME, TRANSFER, GuestType, Mode, Phase, backup_order

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


def _contact(fn: Callable[[T], R], items: Sequence[T], seconds: float) -> list[R | None]:
    """fn(item) for every guest at once, within `seconds` (None: no answer by then); progress on a
    terminal when there are more than a few."""

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    progress = fanout.progress_for(items, sys.stdout.isatty(), write, f"contacting {len(items)} guests")
    try:
        return fanout.run_all(fn, items, time.monotonic() + seconds, progress)
    finally:
        if progress is not None:
            progress.end()


def _ledger(settings: configuration.HookSettings) -> Ledger:
    return Ledger.for_settings(settings, JobId.current().node, settle=settings.phase_timeout + HARD_GRACE)


def _ledger_entries(ledger: Ledger) -> dict[int, list[Entry]]:
    try:
        return ledger.entries()
    except LedgerError as e:
        raise click.ClickException(str(e)) from None


config_option = click.option("--config", "config_path", metavar="FILE", help=f"config file [default: ${configuration.CONFIG_ENV} or {configuration.DEFAULT_CONFIG_PATH}]")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vzdump-hook", message="%(prog)s %(version)s")
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
@click.option("--no-connect", is_flag=True, help="Validate the config (and the node's side) only; contact no guest.")
@click.option("--cluster", "cluster_", is_flag=True, help="Only: which nodes of the cluster run the hook, and which version.")
def check(vmid: int | None, config_path: str | None, timeout: float, no_connect: bool, cluster_: bool) -> None:
    """Validate the config, reach each guest, show what a backup would stop. Changes nothing in the
    guests. Exit 1 on any problem (warnings alone: 0)."""
    if cluster_:
        _check_cluster(config_path)
        return
    cfg = _load(config_path)
    _report_node(cfg.hook.pve_dir)
    guests = _targets(cfg, vmid)
    members = tags.members(cfg) if vmid is None else []
    handled = len(guests)
    click.echo(f"config {cfg.source}: ok, {handled} guest(s) handled" + ("" if guests else " (none: add a [guests.VMID] table, or tag a guest " + (cfg.hook.tag or "(tags are off)") + ")"))
    for m in members:
        click.echo(f"  {m.vmid}: {'in' if m.guest else 'out'}: {m.why}")
    warns = configuration.warnings(cfg) + tags.warnings(cfg)
    for w in warns:
        click.echo(f"  WARNING: {w}")
    node_ok = True
    for script in cfg.hook.chain:
        if not (os.path.isfile(script) and os.access(script, os.X_OK)):
            click.echo(f"  hook.chain: {script} is not an executable file: every phase would report it failed")
            node_ok = False
    settings = settings_with_env(cfg.hook, os.environ)
    for d in (settings.run_dir, settings.state_dir):
        try:
            safefile.private_dir(d)  # root's alone (an older install's 0755 is fixed)
            if not os.access(d, os.W_OK):
                raise OSError("not writable")
        except (OSError, safefile.UnsafePath) as e:
            click.echo(f"  {d}: {e}")
            node_ok = False
    if no_connect:
        sys.exit(0 if node_ok else 1)

    def one(g: GuestConfig) -> tuple[str, bool]:
        ctl = GuestSession(g, JobId.current())
        start = time.monotonic()
        try:
            p = ctl.preflight(time.monotonic() + timeout)
            side, side_ok = _guest_side(ctl, g, settings.state_dir, time.monotonic() + timeout)
        except HookError as e:
            return escape(f"{g.vmid} {g.describe_target()}: FAILED: {describe(e)}"), False
        finally:
            ctl.close()
        lines = [f"{g.vmid} {g.describe_target()}: ok in {time.monotonic() - start:.1f} s, compose: {' '.join(p.compose) or 'not used'}"]
        lines.append(f"    running stacks: {', '.join(p.running) or 'none'}")
        order = "in parallel" if g.parallel else "in this order, started in reverse"
        lines.append(f"    a backup stops: {', '.join(p.selected) or 'nothing'}" + (f" ({order})" if len(p.selected) > 1 else ""))
        if p.missing:
            lines.append(f"    configured but not running (left alone): {', '.join(p.missing)}")
        lines.append(f"    on_quiesce_error = {g.on_quiesce_error.value}, stop_timeout = {g.stop_timeout:g} s, max_downtime = {g.max_downtime:g} s")
        lines += [f"    {note}" for note in p.notes]
        if p.marker is not None:
            age = time.time() - p.marker.written_at
            lines.append(f"    MARKER present: job {p.marker.job}, {age:.0f} s old, lists {', '.join(s.name for s in p.marker.stacks)} (`vzdump-hook recover {g.vmid}`)")
        lines.append(f"    {side}")
        return "\n".join(escape(line) for line in lines), side_ok

    answers = _contact(one, guests, 2 * timeout + 5)
    results = [a if a is not None else (f"{g.vmid} {g.describe_target()}: FAILED: no answer within {2 * timeout + 5:g} s", False) for g, a in zip(guests, answers, strict=True)]
    for text, _ in results:
        click.echo(text)
    if not node_ok or not all(ok for _, ok in results):
        sys.exit(1)


def _guest_side(ctl: GuestSession, g: GuestConfig, state_dir: str, deadline: float) -> tuple[str, bool]:
    """check's guest-side line, and whether it is no problem. A recovery program that is missing or
    outdated is one: a restore of a backup would come up with its stacks stopped (docker does not
    start containers stopped by hand); so is a marker directory others may write to. The answer is
    kept for backup-start's note (state.recovery_answer)."""
    if g.transport == "none":
        return "guest side: not reached (transport none): its controller keeps its own marker and starts its apps after a restore", True
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
        script = "" if n.version is None else f", vzdump.conf script: {n.script or 'none (jobs with their own script option only)'}"
        click.echo(f"{n.node}: " + (f"PROBLEM: {problem}" if problem else f"vzdump-hook {n.version}") + (f" (reported {when}{script})" if n.version else ""))
    sys.exit(1 if bad else 0)


@cli.command()
@config_option
@click.option("--no-connect", is_flag=True, help="Only the node's records and the ledger; do not ask the guests for markers.")
@click.option("--timeout", default=15.0, show_default=True, help="Seconds for the guests to answer.")
def status(config_path: str | None, no_connect: bool, timeout: float) -> None:
    """Markers in the guests next to the ledger of outstanding markers, and this node's records of
    running and recent jobs. Exit 1 when stacks are down that no running backup explains (a marker
    or record of a job that is over, or not of this node), or a guest's state is unknown
    (unreachable); 0 when everything runs. A guest PVE says is not running is not asked (its stacks
    start with it). Where the ledger and a guest disagree, the line says so."""
    cfg = _load(config_path)
    settings = settings_with_env(cfg.hook, os.environ)
    jobs_dir = os.path.join(settings.run_dir, "jobs")
    try:
        keys = sorted(os.listdir(jobs_dir), key=lambda k: os.path.getmtime(os.path.join(jobs_dir, k)))
    except FileNotFoundError:
        keys = []
    bad = False  # something is down that no running job explains, or unknown
    for key in keys:
        pid, _, start = key.partition("-")
        job = JobId(JobId.current().node, "", int(pid), int(start or 0))
        state = HostState(settings, job)
        recs = state.records()
        running = os.path.exists(f"/proc/{pid}")
        click.echo(f"job {key} ({'running' if running else 'over'}): " + ("; ".join(_rec_line(r) for r in recs) if recs else "no guests"))
        bad = bad or (not running and any(r.status.pending for r in recs))
    for job_dir, info in resident.residents(settings.run_dir):
        answer = resident.tell(job_dir, info.vmid, "", wait=2.0)
        what = str(answer.get("state", "?")) if answer else "not answering"
        stacks = ", ".join(map(str, answer.get("stacks", ()))) if answer else ""
        click.echo(f"  resident {info.vmid} (pid {info.pid}, job {os.path.basename(job_dir)}): {escape(what)}, stacks "
                   f"{escape(stacks) or '-'}; gives up at {time.strftime('%H:%M:%S', time.localtime(info.deadline))}")
    ledger = _ledger(settings)
    entries = _ledger_entries(ledger)
    known = ledger.known()
    count = sum(map(len, entries.values()))
    click.echo(f"ledger {ledger.dir}: " + (f"{count} {'entry' if count == 1 else 'entries'} for guest(s) {', '.join(map(str, sorted(entries)))}" if entries else "no outstanding marker"))
    if no_connect:
        for vmid, es in sorted(entries.items()):
            click.echo(f"{vmid}: ledger: {'; '.join(e.describe() for e in es)}")
        sys.exit(1 if bad else 0)

    targets = {g.vmid: g for g in _targets(cfg, None)}
    for vmid, es in entries.items():
        if vmid not in targets and (g := guest_of_entries(es)) is not None:
            targets[vmid] = g
    node = JobId.current().node
    asked: list[GuestConfig] = []
    for vmid, g in sorted(targets.items()):
        vmtype = pve.local_type(settings.pve_dir, node, vmid)
        if vmtype and pve.guest_running(vmtype, vmid, settings.pve_dir, settings.qmp_dir) is False:
            click.echo(f"{vmid}: not running (PVE), not asked; {_ledger_says(entries.get(vmid), vmid in known)}")
        else:
            asked.append(g)

    def one(g: GuestConfig) -> tuple[str, bool]:
        ctl = GuestSession(g, JobId.current())
        try:
            m = ctl.read_marker(time.monotonic() + timeout)
            line, down = _marker_line(g.vmid, m, entries.get(g.vmid), g.vmid in known)
            # a controller keeps its own marker: what it holds (stacks/controller.py)
            for name, text, held in ctl.driver.controllers.end_stale(False, timeout, act=False):
                line += f"; controller {name}: {text or 'holds nothing'}"
                down = down or held
            return line, down
        except HookError as e:
            return f"{g.vmid}: marker unknown: {describe(e)}; {_ledger_says(entries.get(g.vmid), g.vmid in known)}", True
        finally:
            ctl.close()

    answers = _contact(one, asked, timeout + 5)
    for g, a in zip(asked, answers, strict=True):
        line, down = a if a is not None else (f"{g.vmid}: marker unknown: no answer within {timeout + 5:g} s", True)
        click.echo(escape(line))
        bad = bad or down
    sys.exit(1 if bad else 0)


def _ledger_says(es: list[Entry] | None, known: bool) -> str:
    if es:
        return "ledger: " + "; ".join(e.describe() for e in es)
    return "ledger: no entry" if known else "ledger: does not cover it yet (the next job-start asks it)"


def _marker_line(vmid: int, m: Marker | None, es: list[Entry] | None, known: bool) -> tuple[str, bool]:
    """The status line of a guest that answered, and whether it counts as down."""
    ledger = _ledger_says(es, known)
    if m is None:
        extra = ": DISAGREES, no marker (a crash between the two writes, or the guest recovered itself): the next job-start removes the entry" if es else ""
        return f"{vmid}: no marker; {ledger}{extra}", False
    over = m.job.is_over()
    state = "job over" if over else "job running" if over is False else "job of another node"
    line = f"{vmid}: MARKER of job {m.job} ({state}, {'expired' if m.expired else 'deadline ahead'}): {', '.join(s.name for s in m.stacks)}; {ledger}"
    if not es and known:
        line += f": DISAGREES, job-start would not ask this guest (`vzdump-hook recover {vmid}`)"
    return line, over is not False or m.expired


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
    ledger = _ledger(settings)
    guests = _targets(cfg, vmid)
    if all_ and vmid is None:
        have = {g.vmid for g in guests}
        guests += [g for v, es in sorted(_ledger_entries(ledger).items()) if v not in have and (g := guest_of_entries(es)) is not None]
    seconds = settings.sweep_timeout + max((g.command_timeout for g in guests), default=0)
    deadline = time.monotonic() + seconds
    answers = _contact(lambda g: recover_guest(g, state.job, state, deadline, force, ledger=ledger), guests, seconds + 1)
    results = [a if a is not None else Recovery(f"{g.vmid}: no answer within {seconds:g} s", True, False) for g, a in zip(guests, answers, strict=True)]
    for g, r in zip(guests, results, strict=True):
        click.echo(escape(r.text) or f"{g.vmid}: no marker, nothing to do")
    if any(r.down for r in results):
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
    cfg = _load(config_path)
    g = _targets(cfg, vmid)[0]
    click.echo(f"{vmid} {g.describe_target()}: {'what would change (dry run)' if dry_run else 'installing the guest side'}")
    # its diffs show the guest's files: escaped, line by line
    inst = guest_install.Installer(g, guest_install.Layout.from_env(), lambda text: click.echo(escape_lines(text)), dry_run=dry_run, restrict=not no_restrict,
                                   authorized_keys=authorized_keys, identity_file=identity_file)
    try:
        inst.run()
    except HookError as e:
        raise click.ClickException(escape(describe(e))) from None  # may quote what the guest said
    if not dry_run:
        forget_recovery_answers(settings_with_env(cfg.hook, os.environ).state_dir, vmid)
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
        click.echo(f"{when:16}  {r['vmid']:>6}  {r['vmtype'] + '/' + r['mode']:14}  {down:>7}  {result:22}  {escape(str(r['stacks']))}")


@cli.command()
@click.argument("vmid", type=int)
@click.option("--type", "vmtype", type=click.Choice([t.value for t in GuestType]), required=True)
@click.option("--mode", type=click.Choice([m.value for m in Mode]), default="snapshot", show_default=True)
@click.option("--pause", default=2.0, show_default=True, help="Seconds to wait at the backup's point in time.")
@click.option("--transfer", default=0.0, show_default=True, help="Seconds of simulated data transfer.")
@click.option("--dry-run", is_flag=True, help="Change nothing: check the guest and print what each phase would do.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before really stopping the guest's stacks.")
@config_option
def simulate(vmid: int, vmtype: str, mode: str, pause: float, transfer: float, dry_run: bool, yes: bool, config_path: str | None) -> None:
    """Play vzdump's phase order for one guest: each phase a new `vzdump-hook` process with
    vzdump's emptied environment, a pause at the point in time, then the rest of the phases.
    This REALLY stops and starts the guest's stacks (no backup is taken); --dry-run changes nothing."""
    cfg = _load(config_path)
    g = _targets(cfg, vmid)[0]
    vt, md = GuestType(vmtype), Mode(mode)
    order = ("job-init", "job-start", *backup_order(vt, md), "job-end")
    if dry_run:
        _simulate_dry(g, vt, md, order)
        return
    if not yes:
        click.echo(f"simulate {vmid}: this REALLY stops the stacks a backup would stop in guest {vmid} ({g.describe_target()}) "
                   f"and starts them again after {pause:g} s (+ {transfer:g} s transfer); no backup is taken. "
                   f"`--dry-run` only shows what would happen.")
        if not click.confirm("Stop them now?", default=False):
            raise click.ClickException("nothing done")
    env = {"STOREID": "simulate", "DUMPDIR": "/tmp", "VMTYPE": vmtype, "HOSTNAME": f"guest{vmid}", "TARGET": f"/tmp/vzdump-{vmtype}-{vmid}-simulate.tar", "LOGFILE": "/dev/null"}
    # Test/dev deviation from vzdump: the config path (and state dirs) must reach the child.
    env[configuration.CONFIG_ENV] = cfg.source
    for k in (RUN_DIR_ENV, STATE_DIR_ENV, guest_install.GUEST_ROOT_ENV, "VZDUMP_HOOK_DEBUG"):  # the phases look where `check` looked
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
    """Whether vzdump fails the guest's backup when `step` exits non-zero (main path, docs/design.md §1)."""
    if step in ("backup-start", "pre-stop", "backup-end"):
        return True
    before_archive = (vt is GuestType.LXC and md is not Mode.STOP) or (vt is GuestType.QEMU and md is Mode.SNAPSHOT)
    return step in ("pre-restart", "post-restart") and before_archive


def _run_hook(argv: list[str], env: dict[str, str], t0: float) -> int:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-I", "-m", "vzdump_hook", *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout.splitlines():
        click.echo(f"{time.monotonic() - t0:6.1f}s  INFO: {escape(line)}")  # its stderr too (a traceback)
    click.echo(f"{time.monotonic() - t0:6.1f}s  ({' '.join(argv)}: exit {proc.returncode}, {time.monotonic() - start:.2f} s)")
    return proc.returncode


def _simulate_dry(g: GuestConfig, vt: GuestType, md: Mode, order: tuple[str, ...]) -> None:
    ctl = GuestSession(g, JobId.current())
    try:
        p = ctl.preflight(time.monotonic() + 30)
    except HookError as e:
        raise click.ClickException(escape(f"{g.vmid}: {describe(e)}")) from None
    finally:
        ctl.close()
    rec = GuestRecord(g.vmid, vt.value, md.value, {}, status=Status.PREFLIGHT_OK)
    for step in order:
        if step in (POINT_IN_TIME, TRANSFER):
            click.echo(f"  {step}")
            continue
        phase = Phase(step)
        plan = rules.plan(phase, vt, md, rec, g.early_resume)
        what = {
            rules.Step.SWEEP: "resume markers left by jobs that are over",
            rules.Step.PREFLIGHT: f"check the guest ({ctl.t.target}): ok now",
            rules.Step.QUIESCE: f"write the marker, stop {', '.join(p.selected) or 'nothing'}",
            rules.Step.RESUME: f"start {', '.join(reversed(p.selected)) or 'nothing'}, remove the marker",
            rules.Step.ARM_WATCHER: "watch QMP: start the stacks once QEMU's backup job has started",
            rules.Step.FINISH: "last resume attempts, summary",
        }.get(plan.step, plan.note or "nothing")
        if plan.arm_watcher:
            what += "; then watch QMP: start the stacks once QEMU's backup job has started"
        click.echo(f"  {step:13} {what}")
        if plan.step is rules.Step.QUIESCE and p.selected:
            rec.status = Status.QUIESCED
        elif plan.step is rules.Step.RESUME:
            rec.status = Status.RESUMED


@cli.command()
@click.argument("vmid", type=int)
@click.option("--yes", "-y", is_flag=True, help="Trust without asking (only after comparing the fingerprint some other way).")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait for the guest's sshd.")
@config_option
def trust(vmid: int, yes: bool, timeout: float, config_path: str | None) -> None:
    """Show the SSH host key of guest VMID with the command that prints the same fingerprint in the
    guest; add it to the guest's known_hosts once confirmed."""
    from . import trust as hostkeys

    g = _targets(_load(config_path), vmid)[0]
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
            f"{g.ssh.known_hosts} has ANOTHER {hk.key.get_name()} key for {hk.name}: the guest's key changed, or this is not the guest. "
            f"If it was really reinstalled: ssh-keygen -R '{hk.name}' -f {g.ssh.known_hosts}, then run this again")
    click.echo(f"In the guest, this prints its fingerprint; compare the two:\n    {hk.guest_command}")
    if not yes and not click.confirm(f"Trust it (add it to {g.ssh.known_hosts})?", default=False):
        raise click.ClickException("not trusted, nothing written")
    hostkeys.add(g.ssh.known_hosts, hk)
    click.echo(f"added to {g.ssh.known_hosts}")


launcher_option = click.option("--launcher", default=None, help="The path vzdump is to run [default: /usr/bin/vzdump-hook from the Debian package, else /usr/local/bin/vzdump-hook].")
vzdump_conf_option = click.option("--vzdump-conf", default="/etc/vzdump.conf", show_default=True, help="vzdump's node-wide defaults.")


@cli.command()
@vzdump_conf_option
@launcher_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask before moving an existing script into [hook] chain.")
@config_option
def enable(vzdump_conf: str, launcher: str | None, yes: bool, config_path: str | None) -> None:
    """Name the hook in vzdump.conf (`script:`). A script named there already keeps running:
    it is moved into [hook] chain of the config, after confirmation."""
    from . import enable as en

    launcher = launcher or en.default_launcher()
    path = configuration.config_path(config_path)
    p = en.plan(en.read(vzdump_conf), launcher)
    if p.already:
        click.echo(f"{vzdump_conf}: script: {launcher} (already enabled)")
        return
    if p.moved:
        click.echo(f"{vzdump_conf} names another hook script: {', '.join(p.moved)}. vzdump runs only one; "
                   f"vzdump-hook would run it in every phase, with vzdump's arguments and environment ([hook] chain in {path}).")
        if not yes and not click.confirm("Move it into [hook] chain and make vzdump-hook the script?", default=False):
            raise click.ClickException("nothing changed")
        cfg_text = en.read(path)
        try:
            new_cfg = en.with_chain(cfg_text, p.moved, path)
        except HookError as e:
            raise click.ClickException(escape(describe(e))) from None
        if new_cfg != cfg_text:
            en.write(path, new_cfg)
            click.echo(f"{path}: [hook] chain = {list(p.moved)}")
    en.write(vzdump_conf, p.vzdump_conf)
    click.echo(f"{vzdump_conf}: script: {launcher}")
    _note_job_scripts(launcher)


def _note_job_scripts(launcher: str) -> None:
    from . import enable as en

    jobs, own = en.job_scripts(configuration.HookSettings().pve_dir)
    if own:
        click.echo(f"note: backup jobs in {jobs} set their own script ({', '.join(own)}); those jobs do not run the node's. "
                   f"Point them at {launcher} (and that script into [hook] chain) where vzdump-hook should run.")


@cli.command()
@vzdump_conf_option
@launcher_option
@config_option
def setup(vzdump_conf: str, launcher: str | None, config_path: str | None) -> None:
    """Prepare this node (idempotent; changes nothing in vzdump.conf): the config directory (0700), a
    config that handles no guest yet, the node's SSH key and known_hosts; then print the line for
    vzdump.conf, and warn when vzdump.conf names another hook script. Exit 1 if something could not be made."""
    from . import enable as en
    from . import setup as node_setup

    launcher = launcher or en.default_launcher()
    ok = node_setup.prepare(configuration.config_path(config_path), click.echo)
    p = en.plan(en.read(vzdump_conf), launcher)
    if p.already:
        click.echo(f"{vzdump_conf}: enabled (script: {launcher})")
    else:
        if p.moved:
            click.echo(f"WARNING: {vzdump_conf} names another hook script: {', '.join(p.moved)}. vzdump runs only one: "
                       f"`vzdump-hook enable` makes vzdump-hook the script and runs {'them' if len(p.moved) > 1 else 'it'} from [hook] chain, as before.")
        click.echo(f"to enable it for every backup job, this line in {vzdump_conf} (or run `vzdump-hook enable`):\n    script: {launcher}")
    _note_job_scripts(launcher)
    click.echo("next: add a guest to the config (or tag it vzdump-hook), `vzdump-hook trust VMID`, `vzdump-hook guest install VMID`, `vzdump-hook check`")
    sys.exit(0 if ok else 1)
