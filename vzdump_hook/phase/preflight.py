"""backup-start: is the guest ready to be quiesced? It answers, its stacks are listed, a marker left by
another job is resumed first, and the node says when a restore would come up with stacks down."""

from __future__ import annotations

import logging
import time

from ..config import GuestConfig, QuiescePolicy
from ..errors import ConfigError, HookError
from ..guest.marker import Marker
from ..guest.resume import resume_leftover
from ..guest.session import GuestSession, Preflight, Resume, describe
from ..node import pve
from ..node.state import GuestRecord, Status, keep_recovery_answer, recovery_answer
from ..stacks import Kind
from ..vzdump.phases import GuestType, Mode
from ..vzdump.rules import Outcome
from .context import PhaseContext

log = logging.getLogger("vzdump_hook")

RECOVERY_CHECK = 10.0  # at most this long asking whether the guest's recovery program is current


def run(ctx: PhaseContext, guest: GuestConfig, vmtype: GuestType, mode: Mode) -> Outcome:
    vmid = guest.vmid
    old = ctx.state.load(vmid)
    if old is not None and old.status.pending:
        log.warning("backup-start %d: called again while stacks of this job are down: keeping them for the resume",
                    vmid)
        return Outcome()
    rec = GuestRecord(vmid, vmtype, mode, dict(guest.table))
    if mode is Mode.STOP and pve.guest_running(vmtype.value, vmid, ctx.settings.pve_dir, ctx.settings.qmp_dir) is False:
        rec.status = Status.SKIPPED
        ctx.state.save(rec)
        log.info("backup-start %d: guest not running: nothing to stop", vmid)
        return Outcome()
    start = time.monotonic()
    # stop mode is also how vzdump backs up a guest that is off: unreachable is no failure then
    failed = Outcome(preflight_failed=True,
                     abort_policy=guest.on_quiesce_error is QuiescePolicy.ABORT and mode is not Mode.STOP)
    ctx.if_overrun(failed)
    ctl = GuestSession(guest, ctx.job)
    try:
        with ctx.state.guest_lock(vmid, ctx.left()):
            p = _ask(ctx, ctl, rec)
    except HookError as e:
        return _not_ready(ctx, guest, mode, rec, e, failed)
    finally:
        ctl.close()
    for note in p.notes:
        log.warning("backup-start %d: %s", vmid, note)
    if p.absent and _absent(ctx, guest, rec, p, failed.abort_policy):
        return failed
    compose = " ".join(p.compose) or "no compose"
    will = ", ".join(p.selected) if p.selected else "nothing (no selected stack is running)"
    extra = f"; not running: {', '.join(p.missing)}" if p.missing else ""
    log.info("backup-start %d: %s answers, will stop %s (%s)%s in %.1f s", vmid, ctl.t.target, will, compose, extra,
             time.monotonic() - start)
    # a restore comes up with these stopped unless the guest's recovery program starts them: a systemd
    # unit that is enabled starts at boot, and a controller keeps its own marker
    held = tuple(n for n in p.selected if (spec := ctl.spec(n)) is None or spec.kind in (Kind.COMPOSE, Kind.CONTAINER))
    if held:
        _recovery_note(ctx, ctl, held)
    return Outcome()


def _ask(ctx: PhaseContext, ctl: GuestSession, rec: GuestRecord) -> Preflight:
    """Under the guest's lock: the guest's answer, a stale marker resumed, the record saved."""
    seen = ctx.resumer.entries(rec.vmid)
    p = ctl.preflight(ctx.deadline, end_stale=True)
    if p.marker is None or (p.marker.job != ctx.job
                            and not resume_stale(ctx, ctl, p.marker, "backup-start").marker_left):
        ctx.resumer.forget(seen)
    rec.status = Status.PREFLIGHT_OK
    rec.compose = list(p.compose)
    ctx.state.save(rec)
    return p


def _absent(ctx: PhaseContext, guest: GuestConfig, rec: GuestRecord, p: Preflight, abort: bool) -> bool:
    """Names the config gives that the guest does not have (a typo, a container removed): never a silent
    crash-consistent backup. A WARNING for each; on_quiesce_error decides: abort fails the guest's
    backup (nothing is stopped: True), continue stops what exists and marks the backup crash-consistent."""
    vmid = guest.vmid
    for a in p.absent:
        log.warning("backup-start %d: config problem: %s", vmid, a)
    rec.absent = list(p.absent)
    rec.crash_consistent = True
    rec.problems += [f"preflight: {a}" for a in p.absent]
    if abort:
        rec.status = Status.CONFIG_ERROR
        log.warning("backup-start %d: failing this guest's backup (on_quiesce_error = abort): fix the names above",
                    vmid)
    else:
        log.warning("backup-start %d: its backup is crash-consistent for what does not exist "
                    "(on_quiesce_error = continue); what exists is stopped as usual", vmid)
    ctx.state.save(rec)
    return abort


def _not_ready(ctx: PhaseContext, guest: GuestConfig, mode: Mode, rec: GuestRecord, e: HookError,
               failed: Outcome) -> Outcome:
    config = isinstance(e, ConfigError)  # e.g. a token the guest's controller refuses
    rec.status = Status.CONFIG_ERROR if config else Status.PREFLIGHT_FAILED
    rec.problems.append(f"preflight: {describe(e)}")
    ctx.state.save(rec)
    if failed.abort_policy:
        outcome = "failing this guest's backup (on_quiesce_error = abort)"
    elif mode is Mode.STOP:
        outcome = "nothing will be stopped (if the guest is off, its backup is consistent anyway)"
    else:
        outcome = "nothing will be stopped, the backup is crash-consistent"
    log.warning("backup-start %d: %s: %s -> %s", guest.vmid, "config error" if config else "guest not ready",
                describe(e), outcome)
    return failed


def _recovery_note(ctx: PhaseContext, ctl: GuestSession, stacks: tuple[str, ...]) -> None:
    """Say when a restore of this backup would come up with its stacks down: the backup holds
    them stopped, and docker does not start a container stopped by hand when the restored guest
    boots; only the guest's recovery program does. The guest is asked only when the node has no
    trusted answer (state.recovery_answer). Bounded; never fails the backup."""
    vmid, now = ctl.guest.vmid, time.time()
    answer = recovery_answer(ctx.settings.state_dir, vmid, now)
    if answer is None:
        from ..guest import install as guest_install

        try:
            until = min(ctx.deadline, time.monotonic() + RECOVERY_CHECK)
            answer = guest_install.inspect(ctl.t, ctl.guest, guest_install.Layout.from_env(), until).recovery
            keep_recovery_answer(ctx.settings.state_dir, vmid, answer, now)
        except (HookError, OSError) as e:
            log.debug("backup-start %d: guest side not checked: %s", vmid, e)
            return
    if answer != "current":
        log.warning("backup-start %d: guest side: recovery %s: a restore of this backup comes up with %s stopped "
                    "(at boot, docker starts a container stopped by hand only if its restart policy is `always`): "
                    "`vzdump-hook guest install %d`", vmid, answer, ", ".join(stacks), vmid)


def resume_stale(ctx: PhaseContext, ctl: GuestSession, m: Marker, where: str) -> Resume:
    """Start what a marker of another job lists. At backup-start vzdump holds this guest's backup
    lock, so no other job can be working on it: any other job's marker is stale."""
    r = resume_leftover(ctl, ctx.state, ctx.deadline, lock_held=True)  # preflight holds the guest's lock
    started = ", ".join(r.started) or "nothing"
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.written_at))
    log.warning("%s %d: marker left by job %s (%s) found: started %s", where, ctl.guest.vmid, m.job, when, started)
    if r.failed:
        raise HookError(f"stale marker: could not start {', '.join(r.failed)}: {'; '.join(r.problems)}")
    return r
