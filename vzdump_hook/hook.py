"""Carries out one vzdump phase: `vzdump-hook PHASE [MODE VMID]`, one process per phase.

The decisions come from orchestrator.py; this module does the I/O (config, host state, guest
controller), prints the task log lines and returns the exit status for vzdump.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

from . import config as configuration
from . import orchestrator, pve, tags
from .config import Config, GuestConfig, HookSettings, QuiescePolicy
from .controller import GuestController, NothingStopped, describe
from .errors import ConfigError, ConnectError, HookError
from .job import JobId
from .marker import Marker
from .orchestrator import Outcome, Step
from .phases import GuestType, Mode, Phase, parse_phase
from .state import GuestRecord, HostState, Status

log = logging.getLogger("vzdump_hook")

RUN_DIR_ENV = "VZDUMP_HOOK_RUN_DIR"  # overrides for tests and development; vzdump passes no environment
STATE_DIR_ENV = "VZDUMP_HOOK_STATE_DIR"
HARD_GRACE = 15.0  # seconds past the phase deadline before the watchdog ends the process
RETRY_WAIT = 10.0  # seconds to wait for a guest at a resume retry


def settings_with_env(settings: HookSettings, env: Mapping[str, str]) -> HookSettings:
    from dataclasses import replace

    return replace(
        settings,
        run_dir=env.get(RUN_DIR_ENV) or settings.run_dir,
        state_dir=env.get(STATE_DIR_ENV) or settings.state_dir,
    )


def _watchdog(seconds: float, phase: str) -> None:
    """End the process if a phase overruns every per-operation timeout: vzdump has no timeout."""

    def fire() -> None:
        print(f"vzdump-hook: {phase}: phase deadline of {seconds:.0f} s exceeded, giving up", flush=True)
        os._exit(1 if phase == "pre-stop" else 0)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


class PhaseRunner:
    """One phase of one job. `cfg` is None when the config could not be read."""

    def __init__(self, cfg: Config | None, settings: HookSettings, job: JobId) -> None:
        self.cfg = cfg
        self.settings = settings
        self.job = job
        self.state = HostState(settings, job)
        self.deadline = time.monotonic() + settings.phase_timeout

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    # -- entry ---------------------------------------------------------------------------------

    def run(self, phase: Phase, vmtype: GuestType | None, mode: Mode | None, vmid: int | None) -> int:
        if phase.is_job_phase:
            step = orchestrator.plan(phase, None, None, None).step
            if step is Step.SWEEP:
                self.sweep()
            elif step is Step.FINISH:
                return orchestrator.exit_status(phase, Outcome(still_down=self.finish(phase)))
            return 0
        assert vmtype is not None and mode is not None and vmid is not None
        if vmtype is GuestType.QEMU and phase in orchestrator.WATCHER_ENDS:
            self.disarm_watcher(vmid)  # before the record is read: the watcher may be resuming
        rec = self.state.load(vmid)
        guest = self._guest(vmid, rec)
        if guest is None:
            if phase is Phase.BACKUP_START:
                log.info("%s %d: not in %s (or not enabled): left alone", phase.value, vmid, self.cfg.source if self.cfg else "the config")
            return 0
        plan = orchestrator.plan(phase, vmtype, mode, rec, guest.early_resume)
        if plan.note and (rec is None or rec.status.pending or phase is Phase.PRE_STOP):
            log.info("%s %d: %s", phase.value, vmid, plan.note)
        if plan.step is Step.PREFLIGHT:
            return self.preflight(guest, vmtype, mode)
        if plan.step is Step.QUIESCE:
            code = self.quiesce(guest, vmtype, mode, rec, plan.note_backup_job)
            if plan.arm_watcher:
                self.arm_watcher(guest, phase)
            return code
        if plan.step is Step.ARM_WATCHER:
            self.arm_watcher(guest, phase)
        if plan.step is Step.RESUME:
            self.resume(guest, phase, plan.wait_for_guest)
        return 0

    def _guest(self, vmid: int, rec: GuestRecord | None) -> GuestConfig | None:
        """The guest's settings: those recorded by this job if stacks may be down (a config edited or
        broken since must not strand stopped stacks), else the config's."""
        if rec is not None and rec.guest_table and rec.status.pending:
            try:
                return configuration.validate_guest(vmid, rec.guest_table)
            except ConfigError as e:
                log.warning("guest %d: recorded settings unusable (%s); using the config", vmid, e)
        return tags.guest_config(self.cfg, vmid) if self.cfg is not None else None

    # -- backup-start --------------------------------------------------------------------------

    def preflight(self, guest: GuestConfig, vmtype: GuestType, mode: Mode) -> int:
        vmid = guest.vmid
        old = self.state.load(vmid)
        if old is not None and old.status.pending:
            log.warning("backup-start %d: called again while stacks of this job are down: keeping them for the resume", vmid)
            return 0
        rec = GuestRecord(vmid, vmtype.value, mode.value, dict(guest.table))
        if mode is Mode.STOP and pve.guest_running(vmtype.value, vmid, self.settings.pve_dir) is False:
            rec.status = Status.SKIPPED
            self.state.save(rec)
            log.info("backup-start %d: guest not running: nothing to stop", vmid)
            return 0
        start = time.monotonic()
        ctl = GuestController(guest, self.job)
        try:
            with self.state.guest_lock(vmid, self.left()):
                p = ctl.preflight(self.deadline)
                if p.marker is not None and p.marker.job != self.job:
                    self._resume_stale(ctl, p.marker, "backup-start")
                rec.status = Status.PREFLIGHT_OK
                rec.compose = list(p.compose)
                self.state.save(rec)
        except HookError as e:
            rec.status = Status.PREFLIGHT_FAILED
            rec.problems.append(f"preflight: {describe(e)}")
            self.state.save(rec)
            # stop mode is also how vzdump backs up a guest that is off: unreachable is no failure then
            abort = guest.on_quiesce_error is QuiescePolicy.ABORT and mode is not Mode.STOP
            if abort:
                outcome = "failing this guest's backup (on_quiesce_error = abort)"
            elif mode is Mode.STOP:
                outcome = "nothing will be stopped (if the guest is off, its backup is consistent anyway)"
            else:
                outcome = "nothing will be stopped, the backup is crash-consistent"
            log.warning("backup-start %d: guest not ready: %s -> %s", vmid, describe(e), outcome)
            return orchestrator.exit_status(Phase.BACKUP_START, Outcome(preflight_failed=True, abort_policy=abort))
        finally:
            ctl.close()
        compose = " ".join(p.compose)
        will = ", ".join(p.selected) if p.selected else "nothing (no selected stack is running)"
        extra = f"; not running: {', '.join(p.missing)}" if p.missing else ""
        log.info("backup-start %d: %s answers, will stop %s (%s)%s in %.1f s", vmid, ctl.t.target, will, compose, extra, time.monotonic() - start)
        return 0

    def _resume_stale(self, ctl: GuestController, m: Marker, where: str) -> None:
        """Start what a marker of another job lists. At backup-start vzdump holds this guest's backup
        lock, so no other job can be working on it: any other job's marker is stale."""
        r = ctl.resume(self.deadline)
        started = ", ".join(r.started) or "nothing"
        log.warning("%s %d: marker left by job %s (%s) found: started %s", where, ctl.guest.vmid, m.job, time.strftime("%Y-%m-%d %H:%M", time.localtime(m.written_at)), started)
        if r.failed:
            raise HookError(f"stale marker: could not start {', '.join(r.failed)}: {'; '.join(r.problems)}")

    # -- pre-stop ------------------------------------------------------------------------------

    def quiesce(self, guest: GuestConfig, vmtype: GuestType, mode: Mode, rec: GuestRecord | None, note_backup_job: bool = False) -> int:
        vmid = guest.vmid
        if note_backup_job:
            self._note_backup_job(vmid, mode)
        if rec is None:
            rec = GuestRecord(vmid, vmtype.value, mode.value, dict(guest.table))
        abort = guest.on_quiesce_error is QuiescePolicy.ABORT
        ctl = GuestController(guest, self.job)
        if ctl.driver.compose is None and rec.compose:
            ctl.driver.compose = tuple(rec.compose)
        try:
            with self.state.guest_lock(vmid, self.left()):
                rec.status = Status.QUIESCING
                self.state.save(rec)
                try:
                    q = ctl.quiesce(vmtype.value, mode.value, self.deadline)
                except NothingStopped as e:
                    rec.status = Status.NOTHING_STOPPED
                    rec.crash_consistent = True
                    rec.problems.append(f"quiesce: {e}")
                    self.state.save(rec)
                    log.warning("pre-stop %d: %s -> %s", vmid, e, "failing this guest's backup (on_quiesce_error = abort)" if abort else "nothing stopped, the backup is crash-consistent")
                    return orchestrator.exit_status(Phase.PRE_STOP, Outcome(quiesce_failed=True, abort_policy=abort))
                except HookError as e:
                    rec.problems.append(f"quiesce: {describe(e)}")
                    self.state.save(rec)  # still QUIESCING: later phases start what the marker lists
                    log.warning("pre-stop %d: quiesce failed: %s; whatever the marker lists is started again later", vmid, describe(e))
                    return orchestrator.exit_status(Phase.PRE_STOP, Outcome(quiesce_failed=True, abort_policy=abort))
                rec.stacks = list(q.stacks)
                rec.stop_started, rec.stop_ended = q.started, q.ended
                rec.status = Status.QUIESCED if q.stacks else Status.NOTHING_STOPPED
                failed = bool(q.killed or q.errors)
                rec.crash_consistent = failed
                rec.problems += [f"killed after stop timeout: {k}" for k in q.killed] + list(q.errors)
                self.state.save(rec)
                if not q.stacks:
                    log.info("pre-stop %d: nothing running to stop", vmid)
                    return 0
                log.info("pre-stop %d: stopped %s in %.1f s", vmid, ", ".join(s.name for s in q.stacks), q.ended - q.started)
                if not failed:
                    return 0
                for k in q.killed:
                    log.warning("pre-stop %d: %s did not stop within its stop timeout and was KILLED: the backup of %d is crash-consistent", vmid, k, vmid)
                for err in q.errors:
                    log.warning("pre-stop %d: stop failed: %s", vmid, err)
                if abort:
                    log.warning("pre-stop %d: on_quiesce_error = abort: starting the stacks again and failing this guest's backup", vmid)
                    self._resume_locked(ctl, rec, "pre-stop", wait=False)
                else:
                    log.warning("pre-stop %d: backup goes on crash-consistent (on_quiesce_error = continue)", vmid)
                return orchestrator.exit_status(Phase.PRE_STOP, Outcome(quiesce_failed=True, abort_policy=abort))
        except HookError as e:  # the lock
            log.warning("pre-stop %d: %s: nothing stopped", vmid, describe(e))
            return orchestrator.exit_status(Phase.PRE_STOP, Outcome(quiesce_failed=True, abort_policy=abort))
        finally:
            ctl.close()

    # -- QEMU: the early-resume watcher (qemu/watcher.py) ----------------------------------------

    def _note_backup_job(self, vmid: int, mode: Mode) -> None:
        """Before anything stops: the backup job QEMU knows now (a leftover must not count later)."""
        from .qemu import watcher

        try:
            watcher.note_backup_job(self.state, vmid, mode.value, self.deadline)
        except HookError as e:
            log.info("pre-stop %d: early resume off (%s): the stacks start at backup-end", vmid, describe(e))

    def arm_watcher(self, guest: GuestConfig, phase: Phase) -> None:
        """Start the watcher that starts the stacks once QEMU's backup job has started."""
        from .qemu import watcher

        rec = self.state.load(guest.vmid)
        if rec is None or not rec.status.pending:
            return
        try:
            w = watcher.arm(self.state, guest.vmid, (rec.stop_started or time.time()) + guest.max_downtime)
        except HookError as e:
            log.warning("%s %d: early resume off (%s): the stacks start at backup-end", phase.value, guest.vmid, describe(e))
            return
        if w is not None:
            log.info("%s %d: watching %s: the stacks start once QEMU's backup job has started (job before: %s), at backup-end at the latest", phase.value, guest.vmid, w.qmp, w.before_job.describe())

    def disarm_watcher(self, vmid: int) -> None:
        """End the guest's watcher (a resume under way is finished first) and log what it said."""
        from .qemu import watcher

        for line in watcher.disarm(self.state, vmid, wait=self.left() / 2):
            text = line.removeprefix("vzdump-hook: ")
            if text.startswith("WARNING: "):
                log.warning("%s", text.removeprefix("WARNING: "))
            elif text == line:  # not a log line of the watcher (a traceback?)
                log.warning("watcher %d: %s", vmid, line)
            else:
                log.info("%s", text)

    # -- resume --------------------------------------------------------------------------------

    def resume(self, guest: GuestConfig, phase: Phase, wait: bool) -> bool:
        """Start what this job stopped in `guest`, exactly once. True when nothing of it is down."""
        ctl = GuestController(guest, self.job)
        try:
            return self.resume_with(ctl, phase.value, wait)
        finally:
            ctl.close()

    def resume_with(self, ctl: GuestController, where: str, wait: bool) -> bool:
        """resume() over `ctl`, for `where` (a phase, or the watcher): under the guest's lock, only if
        this job's record says the stacks are still down. True when nothing of it is down."""
        try:
            with self.state.guest_lock(ctl.guest.vmid, self.left()):
                rec = self.state.load(ctl.guest.vmid)
                if rec is None or not rec.status.pending:
                    return True  # another phase or process did it
                return self._resume_locked(ctl, rec, where, wait)
        except HookError as e:
            log.warning("%s %d: resume: %s", where, ctl.guest.vmid, describe(e))
            return False

    def _resume_locked(self, ctl: GuestController, rec: GuestRecord, where: str, wait: bool) -> bool:
        vmid = rec.vmid
        start = time.monotonic()
        try:
            if wait:
                # a guest that already failed to answer in an earlier phase gets a short wait: a dead
                # guest must not add resume_wait to every remaining phase of the job
                ctl.wait_ready(ctl.guest.resume_wait if rec.status is not Status.RESUME_FAILED else min(RETRY_WAIT, ctl.guest.resume_wait), self.deadline)
            r = ctl.resume(self.deadline, fallback=tuple(rec.stacks))
        except HookError as e:
            rec.status = Status.RESUME_FAILED
            rec.problems.append(f"{where}: resume: {describe(e)}")
            self.state.save(rec)
            log.warning("%s %d: resume failed: %s (retried at the next phase; job-end fails if still down)", where, vmid, describe(e))
            return False
        for p in r.problems:
            log.warning("%s %d: %s", where, vmid, p)
        if r.failed:
            rec.status = Status.RESUME_FAILED
            rec.problems += [f"{where}: {p}" for p in r.problems]
            self.state.save(rec)
            log.warning("%s %d: STILL DOWN: %s (retried at the next phase)", where, vmid, ", ".join(r.failed))
            return False
        rec.status = Status.RESUMED
        rec.resumed_at = time.time()
        self.state.save(rec)
        try:
            self.state.record_history(rec)
        except Exception as e:  # history is for reports; it never fails a backup
            log.warning("history not written: %s", e)
        down = f", down {rec.downtime:.1f} s" if rec.downtime is not None else ""
        log.info("%s %d: started %s in %.1f s%s", where, vmid, ", ".join(r.started) or "nothing", time.monotonic() - start, down)
        return True

    # -- job-start -----------------------------------------------------------------------------

    def sweep(self) -> None:
        """Resume markers of configured guests on this node whose job is provably over."""
        self.state.write_job_info()
        for job, directory in self.state.other_jobs():
            if job is not None and job.is_over() is True:
                import shutil

                shutil.rmtree(directory, ignore_errors=True)
        if self.cfg is None:
            return
        start = time.monotonic()
        members = [m.guest for m in tags.members(self.cfg, self.job.node) if m.guest is not None]
        guests = [g for g in members if pve.guest_is_local(self.settings.pve_dir, self.job.node, g.vmid) is not False]
        if not guests:
            return
        budget = min(self.left(), self.cfg.hook.sweep_timeout)
        sweep_deadline = time.monotonic() + budget
        with ThreadPoolExecutor(max_workers=min(8, len(guests))) as pool:
            results = list(pool.map(lambda g: self._sweep_one(g, sweep_deadline), guests))
        found = [r for r in results if r]
        for line in found:
            log.info("job-start %s", line)
        log.info("job-start: %d guest(s) checked for leftover markers in %.1f s%s", len(guests), time.monotonic() - start, "" if found else ", none found")

    def _sweep_one(self, guest: GuestConfig, deadline: float) -> str:
        text, _ = recover_guest(guest, self.job, self.state, deadline)
        return text

    # -- job-end / job-abort -------------------------------------------------------------------

    def finish(self, phase: Phase) -> bool:
        """Last resume attempts for this job's guests, then the summary table. True if anything is down."""
        for r in self.state.records():
            if r.vmtype == GuestType.QEMU.value:
                self.disarm_watcher(r.vmid)
        records = self.state.records()
        pending = [r for r in records if r.status.pending]
        if pending:
            with ThreadPoolExecutor(max_workers=min(8, len(pending))) as pool:
                list(pool.map(lambda r: self._finish_one(r, phase), pending))
            records = self.state.records()
        if records:
            for line in summary(records):
                log.info("%s", line)
        down = [r.vmid for r in records if r.status.pending]
        if down:
            log.warning("%s: stacks still DOWN in guest(s) %s: run `vzdump-hook recover` on %s", phase.value, ", ".join(map(str, down)), self.job.node)
        for r in records:
            if r.status is not Status.RESUMED and r.stop_started is not None:
                try:
                    self.state.record_history(r)
                except Exception as e:
                    log.warning("history not written: %s", e)
        return bool(down)

    def _finish_one(self, rec: GuestRecord, phase: Phase) -> None:
        guest = self._guest(rec.vmid, rec)
        if guest is not None:
            self.resume(guest, phase, wait=True)


def recover_guest(guest: GuestConfig, job: JobId, state: HostState, deadline: float, force: bool = False) -> tuple[str, bool]:
    """Start what the guest's marker lists if the marker's job is provably over (or its deadline
    passed, or `force`). Returns (what was found and done, True if anything is still down or unknown).
    A marker of a job that may still run is left alone: in a cluster sharing one config, another
    node may be backing this guest up right now."""
    ctl = GuestController(guest, job)
    vmid = guest.vmid
    try:
        m = ctl.read_marker(deadline)
        if m is None:
            return "", False
        over = m.job.is_over()
        if over is not True and not m.expired and not force:
            return f"{vmid}: marker of job {m.job} left alone (that job may still run, deadline not passed)", False
        with state.guest_lock(vmid, max(0.1, deadline - time.monotonic())):
            r = ctl.resume(deadline)
        why = "forced" if force and over is not True and not m.expired else "its job is over" if over else "its deadline passed"
        text = f"{vmid}: marker of job {m.job} ({why}): started {', '.join(r.started) or 'nothing'}"
        for p in r.problems:
            text += f"; {p}"
        return text + (f"; STILL DOWN: {', '.join(r.failed)}" if r.failed else ""), bool(r.failed)
    except ConnectError as e:
        return f"{vmid}: not reachable ({e})", True
    except HookError as e:
        return f"{vmid}: {describe(e)}", True
    finally:
        ctl.close()


def summary(records: list[GuestRecord]) -> list[str]:
    """The job-end table: guest, stacks, seconds down, result (this goes into PVE's notification mail)."""
    rows = [("guest", "stacks", "down s", "result")]
    for r in records:
        stacks = ",".join(s.name for s in r.stacks) or "-"
        down = f"{r.downtime:.1f}" if r.downtime is not None else "-"
        result = {
            Status.RESUMED: "ok",
            Status.NOTHING_STOPPED: "nothing stopped",
            Status.SKIPPED: "guest not running",
            Status.PREFLIGHT_OK: "ok (not quiesced)",
            Status.PREFLIGHT_FAILED: "not quiesced (guest not ready)",
        }.get(r.status, "STILL DOWN")
        if r.crash_consistent and r.status is not Status.PREFLIGHT_FAILED:
            result += ", crash-consistent"
        rows.append((str(r.vmid), stacks, down, result))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def run_phase(args: list[str], env: Mapping[str, str]) -> int:
    """`vzdump-hook PHASE [MODE VMID]` as vzdump calls it. Returns the exit status for vzdump."""
    name = args[0]
    phase = parse_phase(name)
    if phase is None:
        log.info("ignoring unknown phase %r (a newer vzdump?)", name)
        return 0
    vmtype = mode = None
    vmid: int | None = None
    if not phase.is_job_phase:
        if len(args) < 3 or args[1] not in {m.value for m in Mode} or not args[2].isdigit():
            log.error("%s: expected `%s MODE VMID`, got %r", name, name, " ".join(args))
            return 2
        mode, vmid = Mode(args[1]), int(args[2])
        try:
            vmtype = GuestType(env.get("VMTYPE", ""))
        except ValueError:
            log.warning("%s %d: VMTYPE %r unknown, assuming qemu (the latest resume point)", name, vmid, env.get("VMTYPE"))
            vmtype = GuestType.QEMU
    job = JobId.current()
    cfg: Config | None
    try:
        cfg = configuration.load(env.get(configuration.CONFIG_ENV))
        settings = cfg.hook
    except ConfigError as e:
        cfg, settings = None, HookSettings()
        if phase is Phase.JOB_START:
            log.error("config: %s", e)
            return orchestrator.exit_status(phase, Outcome(config_error=True))
        if phase in (Phase.JOB_INIT, Phase.BACKUP_START):
            log.warning("config: %s: guests are backed up without quiescing", e)
    settings = settings_with_env(settings, env)
    _watchdog(settings.phase_timeout + HARD_GRACE, name)
    try:
        return PhaseRunner(cfg, settings, job).run(phase, vmtype, mode, vmid)
    except Exception as e:
        # Only the policies above fail a backup. An error that got this far (host state unwritable,
        # a bug) is reported loudly; whatever was stopped is in the marker and the host record and
        # is started by the next phase, job-end or `recover`.
        what = describe(e) if isinstance(e, HookError) else f"internal error, please report: {type(e).__name__}: {e}"
        log.error("%s%s: %s", name, f" {vmid}" if vmid is not None else "", what)
        log.debug("traceback", exc_info=True)
        return 0


def setup_logging(debug: bool = False) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_Formatter())
    root = logging.getLogger("vzdump_hook")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
    if not debug:
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)


class _Formatter(logging.Formatter):
    """`vzdump-hook: [LEVEL: ]message`, one line per record: every argument (guest text: labels,
    command output, marker fields) is escaped; the message templates and the node's config errors
    are our own text."""

    def format(self, record: logging.LogRecord) -> str:
        from .text import escape

        level = "" if record.levelno < logging.WARNING else f"{record.levelname}: "
        msg = record.msg if isinstance(record.msg, str) else escape(str(record.msg))
        args = record.args
        if isinstance(args, tuple) and args:
            args = tuple(escape(a) if isinstance(a, str) else escape(str(a)) if isinstance(a, Exception) and not isinstance(a, ConfigError) else a for a in args)
            msg = msg % args
        elif args:
            msg = record.getMessage()  # a mapping: rare, and only ever with our own values
        return f"vzdump-hook: {level}{msg}"
