"""Carries out one vzdump phase: `vzdump-hook PHASE [MODE VMID]`, one process per phase.

The decisions come from rules.py; this module does the I/O (config, host state, guest
controller), prints the task log lines and returns the exit status for vzdump.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from .. import config as configuration
from ..config import Config, GuestConfig, HookSettings, QuiescePolicy
from ..errors import ConfigError, HookError
from ..guest import fanout
from ..guest.marker import Marker
from ..guest.resume import Resumer
from ..guest.session import GuestSession, NothingStopped, Resume, describe
from ..logs import setup_logging as setup_logging  # re-exported: hookmod.setup_logging in tests
from ..node import pve, tags
from ..node.job import LAUNCHER_ENV, JobId
from ..node.state import (
    GuestRecord,
    HostState,
    Status,
    forget_recovery_answers,
    keep_recovery_answer,
    recovery_answer,
    remember_settings,
    remembered_settings,
)
from ..resident import process as resident
from ..resident.client import RUN_DIR_ENV  # overrides for tests and development; vzdump passes no environment
from ..vzdump import rules
from ..vzdump.phases import GuestType, Mode, Phase, parse_phase
from ..vzdump.rules import Outcome, Step

if TYPE_CHECKING:
    from ..node.ledger import Ledger

log = logging.getLogger("vzdump_hook")

STATE_DIR_ENV = "VZDUMP_HOOK_STATE_DIR"
HARD_GRACE = 15.0  # seconds past the phase deadline before the watchdog ends the process
RECOVERY_CHECK = 10.0  # backup-start: at most this long asking whether the guest's recovery program is current
LAUNCHER_OFFSET = 100  # exit_process(): the program's non-zero statuses as the launcher receives them


def settings_with_env(settings: HookSettings, env: Mapping[str, str]) -> HookSettings:
    from dataclasses import replace

    return replace(
        settings,
        run_dir=env.get(RUN_DIR_ENV) or settings.run_dir,
        state_dir=env.get(STATE_DIR_ENV) or settings.state_dir,
    )


def _watchdog(seconds: float, phase: str) -> threading.Timer:
    """End the process if a phase overruns every per-operation timeout: vzdump has no timeout."""

    def fire() -> None:
        print(f"vzdump-hook: {phase}: phase deadline of {seconds:.0f} s exceeded, giving up", flush=True)
        exit_process(1 if phase == "pre-stop" else 0)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


class PhaseRunner:
    """One phase of one job. `cfg` is None when the config could not be read."""

    def __init__(self, cfg: Config | None, settings: HookSettings, job: JobId, problem: ConfigError | None = None) -> None:
        self.cfg = cfg
        self.problem = problem  # why cfg is None
        self.settings = settings
        self.job = job
        self.state = HostState(settings, job)
        self.deadline = time.monotonic() + settings.phase_timeout
        self.resumer = Resumer(settings, job, self.state, self.deadline)

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    @property
    def ledger(self) -> Ledger:
        return self.resumer.ledger

    # -- entry ---------------------------------------------------------------------------------

    def run(self, phase: Phase, vmtype: GuestType | None, mode: Mode | None, vmid: int | None) -> int:
        if phase.is_job_phase:
            step = rules.plan(phase, None, None, None).step
            if step is Step.SWEEP:
                self.report_config()
                self.report_node()
                self.sweep()
                if self.settings.notify is not None:
                    self.tell_outside(ending=False)  # what earlier jobs could not deliver
            elif step is Step.FINISH:
                down = self.finish(phase)
                why = _first_line(self.problem) if self.problem is not None else self.state.config_error()
                if why is not None:
                    log.error("%s: the config was unusable, guests were backed up WITHOUT quiescing: %s", phase.value, why)
                if (self.settings.metrics_file or self.settings.notify) and (phase is Phase.JOB_END or not self.state.flag("reported")):
                    self.tell_outside(ending=True, config_problem=why)  # job-abort: only when job-end did not
                return rules.exit_status(phase, Outcome(still_down=down, config_error=why is not None))
            return 0
        assert vmtype is not None and mode is not None and vmid is not None
        if phase.value in resident.TOLD_PHASES:
            self.hear_resident(vmid, phase)  # before the record is read: the resident may be starting the stacks
        if vmtype is GuestType.QEMU and phase in rules.WATCHER_ENDS:
            from ..qemu import watcher

            watcher.forget(self.state, vmid)  # this guest's backup is over: no job start to wait for
        rec = self.state.load(vmid)
        guest = self._guest(vmid, rec)
        if guest is None:
            if phase is Phase.BACKUP_START and self.problem is not None:
                log.error("backup-start %d: the config is unusable (%s): backed up WITHOUT quiescing (crash-consistent)", vmid, _first_line(self.problem))
                self.state.save(GuestRecord(vmid, vmtype.value, mode.value, {}, status=Status.CONFIG_ERROR, crash_consistent=True))
            elif phase is Phase.BACKUP_START:
                log.info("%s %d: not in %s (or not enabled): left alone", phase.value, vmid, self.cfg.source if self.cfg else "the config")
            return 0
        plan = rules.plan(phase, vmtype, mode, rec, guest.early_resume)
        if plan.note and (rec is None or rec.status.pending or phase is Phase.PRE_STOP):
            log.info("%s %d: %s", phase.value, vmid, plan.note)
        if plan.step is Step.PREFLIGHT:
            return self.preflight(guest, vmtype, mode)
        if plan.step is Step.QUIESCE:
            code = self.quiesce(guest, vmtype, mode, rec, plan.note_backup_job)
            if plan.arm_watcher:  # suspend, stop: the resident watches once the stop is done
                self._say_watching(vmid, phase)
            return code
        if plan.step is Step.ARM_WATCHER:
            self.arm_resident(guest, vmtype, mode, phase, watching=True)
            self._say_watching(vmid, phase)
        if plan.step is Step.RESUME:
            self.resume(guest, phase, plan.wait_for_guest)
        if phase in rules.CONTROLLER_ENDS and rec is not None:
            self.close_controllers(vmid, phase, rules.CONTROLLER_ENDS[phase])
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
        if mode is Mode.STOP and pve.guest_running(vmtype.value, vmid, self.settings.pve_dir, self.settings.qmp_dir) is False:
            rec.status = Status.SKIPPED
            self.state.save(rec)
            log.info("backup-start %d: guest not running: nothing to stop", vmid)
            return 0
        start = time.monotonic()
        ctl = GuestSession(guest, self.job)
        try:
            with self.state.guest_lock(vmid, self.left()):
                seen = self.resumer.entries(vmid)
                p = ctl.preflight(self.deadline, end_stale=True)
                if p.marker is None or (p.marker.job != self.job and not self._resume_stale(ctl, p.marker, "backup-start").marker_left):
                    self.resumer.forget(seen)
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
            return rules.exit_status(Phase.BACKUP_START, Outcome(preflight_failed=True, abort_policy=abort))
        finally:
            ctl.close()
        for note in p.notes:
            log.warning("backup-start %d: %s", vmid, note)
        compose = " ".join(p.compose) or "no compose"
        will = ", ".join(p.selected) if p.selected else "nothing (no selected stack is running)"
        extra = f"; not running: {', '.join(p.missing)}" if p.missing else ""
        log.info("backup-start %d: %s answers, will stop %s (%s)%s in %.1f s", vmid, ctl.t.target, will, compose, extra, time.monotonic() - start)
        if p.selected:
            self._recovery_note(ctl, p.selected)
        return 0

    def _recovery_note(self, ctl: GuestSession, stacks: tuple[str, ...]) -> None:
        """Say when a restore of this backup would come up with its stacks down: the backup holds
        them stopped, and docker does not start a container stopped by hand when the restored guest
        boots; only the guest's recovery program does. The guest is asked only when the node has no
        trusted answer (state.recovery_answer). Bounded; never fails the backup."""
        vmid, now = ctl.guest.vmid, time.time()
        answer = recovery_answer(self.settings.state_dir, vmid, now)
        if answer is None:
            from ..guest import install as guest_install

            try:
                answer = guest_install.inspect(ctl.t, ctl.guest, guest_install.Layout.from_env(), min(self.deadline, time.monotonic() + RECOVERY_CHECK)).recovery
                keep_recovery_answer(self.settings.state_dir, vmid, answer, now)
            except (HookError, OSError) as e:
                log.debug("backup-start %d: guest side not checked: %s", vmid, e)
                return
        if answer != "current":
            log.warning("backup-start %d: guest side: recovery %s: a restore of this backup comes up with %s stopped "
                        "(docker does not start containers stopped by hand): `vzdump-hook guest install %d`", vmid, answer, ", ".join(stacks), vmid)

    def _resume_stale(self, ctl: GuestSession, m: Marker, where: str) -> Resume:
        """Start what a marker of another job lists. At backup-start vzdump holds this guest's backup
        lock, so no other job can be working on it: any other job's marker is stale."""
        r = ctl.resume(self.deadline)
        started = ", ".join(r.started) or "nothing"
        log.warning("%s %d: marker left by job %s (%s) found: started %s", where, ctl.guest.vmid, m.job, time.strftime("%Y-%m-%d %H:%M", time.localtime(m.written_at)), started)
        if r.failed:
            raise HookError(f"stale marker: could not start {', '.join(r.failed)}: {'; '.join(r.problems)}")
        return r

    # -- the ledger (node/ledger.py) ------------------------------------------------------------------

    def _ledger_entry(self, guest: GuestConfig, vmtype: GuestType) -> Callable[[], None]:
        """The guest's entry, to be written right before its marker. When the ledger cannot be
        written, the guest is noted as unknown locally (the next job-start asks it); when that fails
        too, nothing is stopped: a marker the sweeps cannot learn of must not be written."""

        from ..node.ledger import QUIESCE, LedgerError

        def write() -> None:
            try:
                self.ledger.add(guest.vmid, QUIESCE, self.job, guest.table, vmtype.value)
            except LedgerError as e:
                try:
                    self.ledger.mark_uncovered(guest.vmid)
                except OSError as e2:
                    raise LedgerError(f"{e}; not noted locally either ({e2})") from None
                log.warning("pre-stop %d: %s; the next job-start asks this guest", guest.vmid, e)

        return write

    # -- pre-stop ------------------------------------------------------------------------------

    def quiesce(self, guest: GuestConfig, vmtype: GuestType, mode: Mode, rec: GuestRecord | None, note_backup_job: bool = False) -> int:
        vmid = guest.vmid
        if note_backup_job:
            self._note_backup_job(vmid, mode)
        if rec is None:
            rec = GuestRecord(vmid, vmtype.value, mode.value, dict(guest.table))
        abort = guest.on_quiesce_error is QuiescePolicy.ABORT
        ctl = GuestSession(guest, self.job)
        if ctl.driver.compose is None and rec.compose:
            ctl.driver.compose = tuple(rec.compose)
        try:
            with self.state.guest_lock(vmid, self.left()):
                rec.status = Status.QUIESCING
                self.state.save(rec)
                self.arm_resident(guest, vmtype, mode, Phase.PRE_STOP)
                try:
                    q = ctl.quiesce(vmtype.value, mode.value, self.deadline, before_marker=self._ledger_entry(guest, vmtype))
                except NothingStopped as e:
                    rec.status = Status.NOTHING_STOPPED
                    rec.crash_consistent = True
                    rec.problems.append(f"quiesce: {e}")
                    self.state.save(rec)
                    log.warning("pre-stop %d: %s -> %s", vmid, e, "failing this guest's backup (on_quiesce_error = abort)" if abort else "nothing stopped, the backup is crash-consistent")
                    return rules.exit_status(Phase.PRE_STOP, Outcome(quiesce_failed=True, abort_policy=abort))
                except HookError as e:
                    rec.problems.append(f"quiesce: {describe(e)}")
                    self.state.save(rec)  # still QUIESCING: later phases start what the marker lists
                    log.warning("pre-stop %d: quiesce failed: %s; whatever the marker lists is started again later", vmid, describe(e))
                    return rules.exit_status(Phase.PRE_STOP, Outcome(quiesce_failed=True, abort_policy=abort))
                rec.stacks = list(q.stacks)
                rec.stop_started, rec.stop_ended, rec.app_down_at = q.started, q.ended, q.down_at
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
                    self.resumer.resume_locked(ctl, rec, "pre-stop", wait=False)
                else:
                    log.warning("pre-stop %d: backup goes on crash-consistent (on_quiesce_error = continue)", vmid)
                return rules.exit_status(Phase.PRE_STOP, Outcome(quiesce_failed=True, abort_policy=abort))
        except HookError as e:  # the lock
            log.warning("pre-stop %d: %s: nothing stopped", vmid, describe(e))
            return rules.exit_status(Phase.PRE_STOP, Outcome(quiesce_failed=True, abort_policy=abort))
        finally:
            ctl.close()

    # -- QEMU: the early-resume watcher (qemu/watcher.py) ----------------------------------------

    def _note_backup_job(self, vmid: int, mode: Mode) -> None:
        """Before anything stops: the backup job QEMU knows now (a leftover must not count later)."""
        from ..qemu import watcher

        try:
            watcher.note_backup_job(self.state, vmid, mode.value, self.deadline)
        except HookError as e:
            log.info("pre-stop %d: early resume off (%s): the stacks start at backup-end", vmid, describe(e))

    # -- the resident (resident/process.py) --------------------------------------------------------------

    def arm_resident(self, guest: GuestConfig, vmtype: GuestType, mode: Mode, phase: Phase, watching: bool = False) -> None:
        """Start the guest's resident (pre-stop: before the stop), or, where a QEMU guest's watch is
        armed, one that watches at once if the first one is gone. Never fails the phase."""
        if not self.settings.resident:
            return
        rec = self.state.load(guest.vmid)
        if rec is None or not rec.status.pending:
            return
        try:
            info = resident.arm(self.state, guest, vmtype.value, mode.value, (rec.stop_started or time.time()) + guest.max_downtime, watching=watching)
        except HookError as e:
            log.warning("%s %d: no resident (%s): the phases start the stacks themselves", phase.value, guest.vmid, describe(e))
            return
        if info.pid and watching and not info.watching:
            log.debug("%s %d: resident %d already running (told this phase)", phase.value, guest.vmid, info.pid)

    def _say_watching(self, vmid: int, phase: Phase) -> None:
        from ..qemu import watcher

        rec = self.state.load(vmid)
        try:
            w = watcher.load(watcher._paths(self.state, vmid))
        except HookError:
            w = None
        if w is not None and rec is not None and rec.status.pending and self.settings.resident:
            log.info("%s %d: %s", phase.value, vmid, watcher.watching(w))

    def hear_resident(self, vmid: int, phase: Phase | str) -> bool:
        """Tell the guest's resident this phase (cli.py may have done it already) and log what it
        says, and what an ended one left. True when it answered."""
        name = phase.value if isinstance(phase, Phase) else phase
        answer = resident.EARLY.pop(vmid) if vmid in resident.EARLY else resident.tell(self.state.job_dir, vmid, name)
        lines = [(int(lv), str(t)) for lv, t in answer.get("lines", ())] if answer else []
        lines += resident.leftover_lines(self.state.job_dir, vmid)
        for level, text in lines:
            log.log(level, "%s", text)  # its lines: escaped like any argument
        return answer is not None

    # -- resume --------------------------------------------------------------------------------

    def resume(self, guest: GuestConfig, phase: Phase, wait: bool) -> bool:
        """Start what this job stopped in `guest`, exactly once. True when nothing of it is down."""
        ctl = GuestSession(guest, self.job)
        try:
            return self.resumer.resume_with(ctl, phase.value, wait)
        finally:
            ctl.close()

    # -- the guest's controllers (stacks/controller.py) ------------------------------------------

    def close_controllers(self, vmid: int, phase: Phase, message: str = "") -> None:
        """Tell the guest's controllers that this job is over for them (`message`: done, failed; ""
        at job-end: what backup-end/abort recorded, else abort), once the hook's resume went
        through. One that does not confirm is told again at job-end, and a job it keeps open is
        ended by the next job-start's sweep (or its own deadline)."""
        rec = self.state.load(vmid)
        if rec is None or not rec.unclosed_controllers:
            return
        if message and not rec.ended:
            rec.ended = message
            self.state.save(rec)
        if rec.status.pending:
            return  # `snapshotted` is not confirmed yet: the resume paths keep at it
        guest = self._recorded_guest(rec, phase)
        if guest is None:
            return
        word = rec.ended or ("failed" if phase is Phase.JOB_ABORT else "abort")
        ctl = GuestSession(guest, self.job)
        try:
            with self.state.guest_lock(vmid, self.left()):
                rec = self.state.load(vmid) or rec
                for s in rec.unclosed_controllers:
                    try:
                        ctl.driver.controllers.close(s, word, max(0.1, min(self.left(), guest.command_timeout)))
                    except HookError as e:
                        later = "job-end tells it again" if phase in rules.CONTROLLER_ENDS else "the next job-start's sweep ends the job (or the controller at its deadline)"
                        log.warning("%s %d: controller %s not told %s: %s; %s", phase.value, vmid, s.name, word, describe(e), later)
                        continue
                    rec.closed.append(s.name)
                    log.info("%s %d: controller %s told %s", phase.value, vmid, s.name, word)
                self.state.save(rec)
        except HookError as e:  # the lock
            log.warning("%s %d: controllers not told %s: %s", phase.value, vmid, word, describe(e))
        finally:
            ctl.close()

    # -- job-start -----------------------------------------------------------------------------

    def report_config(self) -> None:
        """job-start: every problem of an unusable config as an ERROR line (the job goes on without
        quiescing, job-end fails), or the config's contradictions as WARNING lines."""
        self.state.write_job_info()
        if self.problem is not None:
            source = self.problem.source or configuration.config_path(None)
            for p in self.problem.problems:
                log.error("config %s: %s", source, p)
            log.error("job-start: the config is unusable: every guest is backed up WITHOUT quiescing (crash-consistent); "
                      "job-end will report the job failed. Fix it, then run `vzdump-hook check`")
            self.state.note_config_error(f"{source}: {_first_line(self.problem)}")
            return
        assert self.cfg is not None
        for w in configuration.warnings(self.cfg) + tags.warnings(self.cfg):
            log.warning("config %s: %s", self.cfg.source, w)

    def report_node(self) -> None:
        """What this node runs, for `check --cluster` on any node (cluster.py); after an upgrade, the
        answers about guests' recovery programs are stale (the guest files changed)."""
        from ..node import cluster

        version = cluster.installed_version()
        try:
            forget_recovery_answers(self.settings.state_dir, unless_version=version)
            cluster.report(self.settings.pve_dir, self.job.node, version=version)
        except OSError as e:
            log.debug("job-start: node report not written: %s", e)

    def sweep(self) -> None:
        """Resume what jobs that are over left down: first from this node's records of them (with
        the settings recorded at their quiesce, so a config broken since cannot strand stacks),
        then the markers the ledger lists, and the guests it does not cover yet (unknown). Only
        guests of this node that run are asked, all at once, within sweep_timeout."""
        start = time.monotonic()
        budget = min(self.left(), self.settings.sweep_timeout)
        sweep_deadline = time.monotonic() + budget
        import shutil

        recorded: dict[int, GuestConfig] = {}  # guests whose stacks an over job may have left down
        kept: dict[str, set[int]] = {}  # those jobs' directories, kept until their guests are up
        for job, directory in self.state.other_jobs():
            if job is None or job.is_over() is not True:
                continue
            try:
                pending = [r for r in self.state.records(directory) if r.status.pending]
            except HookError as e:
                log.warning("job-start: %s", e)
                pending = []
            for r in pending:
                if (g := self._recorded_guest(r)) is not None:
                    recorded[g.vmid] = g
                    kept.setdefault(directory, set()).add(g.vmid)
            if directory not in kept:
                shutil.rmtree(directory, ignore_errors=True)
        from ..guest.recovery import Recovery, guest_of_entries, recover_guest
        from ..node.ledger import LedgerError

        members = {m.vmid: m.guest for m in tags.members(self.cfg, self.job.node) if m.guest is not None} if self.cfg is not None else {}
        try:
            entries, known = self.ledger.entries(), self.ledger.known()
        except LedgerError as e:
            log.warning("job-start: %s: every configured guest is asked", e)
            entries, known = {}, set()
        candidates = {vmid: g for vmid, g in members.items() if vmid not in known}
        for vmid, es in entries.items():
            if (g := guest_of_entries(es) or members.get(vmid)) is not None:
                candidates[vmid] = g
            else:
                log.warning("job-start %d: in the ledger %s, but neither the config nor its entry says how to reach it: `vzdump-hook status`", vmid, self.ledger.dir)
        candidates.update(recorded)
        guests: list[GuestConfig] = []
        waiting: set[int] = set()
        for vmid, g in sorted(candidates.items()):
            if vmid not in recorded and pve.guest_is_local(self.settings.pve_dir, self.job.node, vmid) is False:
                continue  # another node's guest: that node asks it
            vmtype = pve.local_type(self.settings.pve_dir, self.job.node, vmid) or next((e.vmtype for e in entries.get(vmid, ()) if e.vmtype), "")
            if vmtype and pve.guest_running(vmtype, vmid, self.settings.pve_dir, self.settings.qmp_dir) is False:
                log.info("job-start %d: not running (PVE), not asked: a marker in it waits for the guest-side recovery at boot, or for its next backup's backup-start", vmid)
                waiting.add(vmid)
                continue
            guests.append(g)
        if not guests:
            log.info("job-start: no guest of this node may hold a marker (%d configured, ledger %s): none asked", len(members), self.ledger.dir)
            return
        outcomes = fanout.run_all(lambda g: recover_guest(g, self.job, self.state, sweep_deadline, ledger=self.ledger, seen=entries.get(g.vmid, [])), guests, sweep_deadline + 1.0)
        results = [o if o is not None else Recovery(f"{g.vmid}: no answer within the sweep's {budget:.0f} s", True, False) for g, o in zip(guests, outcomes, strict=True)]
        try:
            self.ledger.mark_known(g.vmid for g, r in zip(guests, results, strict=True) if r.covered)
        except LedgerError as e:
            log.warning("job-start: %s: the next job-start asks those guests again", e)
        down = {g.vmid for g, r in zip(guests, results, strict=True) if r.down} | waiting
        for directory, vmids in kept.items():
            if not vmids & down:  # kept while a recorded guest is down
                shutil.rmtree(directory, ignore_errors=True)
        found = [r.text for r in results if r.text]
        for line in found:
            log.info("job-start %s", line)
        unknown = sum(1 for g in guests if g.vmid not in known and g.vmid not in entries)
        why = f" ({len(guests) - unknown} in the ledger, {unknown} not covered by it yet)" if unknown else ""
        log.info("job-start: %d guest(s) checked for leftover markers in %.1f s%s%s", len(guests), time.monotonic() - start, why, "" if found else ", none found")

    @staticmethod
    def _recorded_guest(rec: GuestRecord, phase: Phase = Phase.JOB_START) -> GuestConfig | None:
        """The guest's settings as this job's record keeps them (those of its quiesce), or None."""
        try:
            return configuration.validate_guest(rec.vmid, rec.guest_table)
        except ConfigError as e:
            log.warning("%s %d: recorded settings unusable (%s)", phase.value, rec.vmid, e)
            return None

    # -- job-end / job-abort -------------------------------------------------------------------

    def finish(self, phase: Phase) -> bool:
        """Last resume attempts for this job's guests, then the summary table. True if anything is down."""
        for r in self.state.records():
            if r.status.pending:
                self.hear_resident(r.vmid, phase)  # its last attempt, with this phase's wait
        records = self.state.records()
        pending = [r for r in records if r.status.pending]
        if pending:
            fanout.run_all(lambda r: self._finish_one(r, phase), pending, self.deadline)
            records = self.state.records()
        awaited = [r for r in records if r.status is Status.RESUMED and r.ready_pending]
        if awaited:  # the table and the history end the downtime when the apps answered
            fanout.run_all(lambda r: self._await_ready(r, phase), awaited, self.deadline)
            records = self.state.records()
        unclosed = [r for r in records if r.unclosed_controllers]
        if unclosed:
            fanout.run_all(lambda r: self.close_controllers(r.vmid, phase), unclosed, self.deadline)
            records = self.state.records()
        if records:
            for line in summary(records):
                log.info("%s", line)
        down = [r.vmid for r in records if r.status.pending]
        for r in records:
            for level, text in resident.leftover_lines(self.state.job_dir, r.vmid):
                log.log(level, "%s", text)  # its lines: escaped like any argument
        for _, info in resident.residents(self.settings.run_dir):
            if JobId.from_dict(info.job) == self.job and info.vmid in down:
                log.warning("%s %d: its resident keeps trying to start the stacks until %s (the marker's deadline)", phase.value, info.vmid,
                            time.strftime("%H:%M:%S", time.localtime(info.deadline)))
        if down:
            log.warning("%s: stacks still DOWN in guest(s) %s: run `vzdump-hook recover` on %s", phase.value, ", ".join(map(str, down)), self.job.node)
        for r in records:
            if r.status is not Status.RESUMED and r.stop_started is not None:
                try:
                    self.state.record_history(r)
                except Exception as e:
                    log.warning("history not written: %s", e)
        return bool(down)

    def tell_outside(self, ending: bool, config_problem: str | None = None) -> None:
        """The metrics textfile and the webhook (node/report.py). `ending` (job-end, after every resume
        attempt): this job's records and message; else only the undelivered notifications of
        earlier jobs are retried. Never raises: reporting does not change a backup's outcome."""
        from ..node import report

        try:
            if not ending:
                report.notify(self.settings, None)
                return
            records = self.state.records()
            if records:
                report.update_metrics(self.settings, records)
            report.notify(self.settings, report.job_message(self.job.node, str(self.job), records, config_problem))
            self.state.set_flag("reported")
        except Exception as e:
            log.warning("report: %s: %s", type(e).__name__, e)

    def _await_ready(self, rec: GuestRecord, phase: Phase) -> None:
        guest = self._recorded_guest(rec, phase)
        if guest is None:
            return
        ctl = GuestSession(guest, self.job)
        try:
            self.resumer.await_ready(ctl, phase.value)
        finally:
            ctl.close()

    def _finish_one(self, rec: GuestRecord, phase: Phase) -> None:
        guest = self._guest(rec.vmid, rec)
        if guest is not None:
            self.resume(guest, phase, wait=True)


def _first_line(e: Exception) -> str:
    lines = str(e).splitlines()
    return lines[0] + (f" (+{len(lines) - 1} more)" if len(lines) > 1 else "") if lines else type(e).__name__


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
            Status.CONFIG_ERROR: "not quiesced (config unusable)",
        }.get(r.status, "STILL DOWN")
        if r.crash_consistent and r.status not in (Status.PREFLIGHT_FAILED, Status.CONFIG_ERROR):
            result += ", crash-consistent"
        if r.not_ready:
            result += f", NOT READY: {','.join(r.not_ready)}"
        rows.append((str(r.vmid), stacks, down, result))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def run_phase(args: list[str], env: Mapping[str, str]) -> int:
    """`vzdump-hook PHASE [MODE VMID]` as vzdump calls it, then the chained scripts (chain.py).
    Returns the exit status for vzdump."""
    name = args[0]
    phase = parse_phase(name)
    cfg, settings, problem = _load_config(env)
    settings = settings_with_env(settings, env)
    if phase is Phase.JOB_START and cfg is not None:
        _remember(settings, env)
    if settings.chain and phase is Phase.PRE_STOP:
        # before the stop: the stop stays right before the point in time, and a failing script
        # fails the backup before anything is down
        code = _run_chain(settings, args, env)
        if code:
            log.warning("%s: a chained script failed (exit %d): vzdump fails this guest's backup; nothing stopped", " ".join(args[:1] + args[2:3]), code)
            return code
    timer = _watchdog(settings.phase_timeout + HARD_GRACE, name)
    code = _own_work(args, phase, env, cfg, settings, problem)
    timer.cancel()
    if settings.chain and phase is not Phase.PRE_STOP:
        chained = _run_chain(settings, args, env)
        if chained and phase is Phase.PRE_RESTART:
            # vzdump would skip what follows a failing pre-restart: an LXC guest in suspend mode stays
            # frozen, one in stop mode stays stopped (pve-container's VZDump/LXC.pm, PVE/VZDump.pm)
            log.error("%s: a chained script failed (exit %d); not passed on to vzdump: a failing pre-restart would leave the guest frozen or stopped",
                      " ".join(args[:1] + args[2:3]), chained)
            chained = 0
        code = code or chained
    return code


def _run_chain(settings: HookSettings, args: list[str], env: Mapping[str, str]) -> int:
    from ..vzdump import chain  # subprocess: only phases with chained scripts pay for its import

    return chain.run(settings.chain, args, env, settings.chain_timeout)


def _load_config(env: Mapping[str, str]) -> tuple[Config | None, HookSettings, ConfigError | None]:
    """The config, or (None, the [hook] settings of the last valid config, why) when it cannot be used."""
    try:
        cfg = configuration.load(env.get(configuration.CONFIG_ENV), cache_dir=settings_with_env(HookSettings(), env).run_dir)
        return cfg, cfg.hook, None
    except ConfigError as e:
        return None, remembered_settings(settings_with_env(HookSettings(), env).state_dir) or HookSettings(), e


def _remember(settings: HookSettings, env: Mapping[str, str]) -> None:
    try:
        remember_settings(settings, settings_with_env(HookSettings(), env).state_dir)
    except OSError as e:
        log.warning("job-start: could not keep the [hook] settings for a phase that finds the config broken: %s", e)


def _own_work(args: list[str], phase: Phase | None, env: Mapping[str, str], cfg: Config | None, settings: HookSettings, problem: ConfigError | None) -> int:
    name = args[0]
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
    try:
        return PhaseRunner(cfg, settings, JobId.current(), problem).run(phase, vmtype, mode, vmid)
    except Exception as e:
        # Only the policies above fail a backup. An error that got this far (host state unwritable,
        # a bug) is reported loudly; whatever was stopped is in the marker and the host record and
        # is started by the next phase, job-end or `recover`.
        what = describe(e) if isinstance(e, HookError) else f"internal error, please report: {type(e).__name__}: {e}"
        log.error("%s%s: %s", name, f" {vmid}" if vmid is not None else "", what)
        log.debug("traceback", exc_info=True)
        return 0


def exit_process(code: int) -> None:
    """End the process with `code` for vzdump, at once (never wait for a thread stuck on a dead
    guest). Under the launcher, the program's own statuses are told apart from a Python that could
    not run: non-zero is sent as 100 + code, which the launcher turns back."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code and os.environ.get(LAUNCHER_ENV):
        code += LAUNCHER_OFFSET
    os._exit(code)
