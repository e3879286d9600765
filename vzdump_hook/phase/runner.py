"""Carries out one vzdump phase: `vzdump-hook PHASE [MODE VMID]`, one process per phase: the
chained scripts around the hook's own work, a watchdog, and the step the phase calls for (the
decisions come from vzdump/rules.py; the steps are the other modules of this folder).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Mapping

from .. import config as configuration
from ..config import Config, HookSettings
from ..errors import ConfigError, HookError
from ..guest.session import describe
from ..logs import setup_logging as setup_logging  # re-exported: hookmod.setup_logging in tests
from ..node.job import LAUNCHER_ENV, JobId
from ..node.state import GuestRecord, Status, remember_settings, remembered_settings
from ..resident.client import RUN_DIR_ENV  # overrides for tests and development; vzdump passes no environment
from ..vzdump import rules
from ..vzdump.phases import GuestType, Mode, Phase, parse_phase
from ..vzdump.rules import Outcome, Step
from . import handover, resume_point
from .context import PhaseContext, first_line

log = logging.getLogger("vzdump_hook")

STATE_DIR_ENV = "VZDUMP_HOOK_STATE_DIR"
HARD_GRACE = 15.0  # seconds past the phase deadline before the watchdog ends the process
LAUNCHER_OFFSET = 100  # exit_process(): the program's non-zero statuses as the launcher receives them


def settings_with_env(settings: HookSettings, env: Mapping[str, str]) -> HookSettings:
    from dataclasses import replace

    return replace(
        settings,
        run_dir=env.get(RUN_DIR_ENV) or settings.run_dir,
        state_dir=env.get(STATE_DIR_ENV) or settings.state_dir,
    )


class Watchdog:
    """Ends the process when a phase overruns every per-operation timeout (vzdump has no timeout),
    with the exit status the policy gives the outcome the running step said an overrun means."""

    def __init__(self, seconds: float, phase: str) -> None:
        self.phase = phase
        self.seconds = seconds
        self.if_overrun = Outcome()  # set by the step under way (preflight, quiesce)
        self.timer = threading.Timer(seconds, self.fire)
        self.timer.daemon = True
        self.timer.start()

    def fire(self) -> None:
        print(f"vzdump-hook: {self.phase}: phase deadline of {self.seconds:.0f} s exceeded, giving up", flush=True)
        phase = parse_phase(self.phase)
        exit_process(rules.exit_status(phase, self.if_overrun) if phase is not None else 0)

    def cancel(self) -> None:
        self.timer.cancel()


def _watchdog(seconds: float, phase: str) -> Watchdog:
    return Watchdog(seconds, phase)


class PhaseRunner:
    """One phase of one job: its steps (phase/job_start.py, preflight.py, quiesce.py, resume_point.py,
    finish.py) share one PhaseContext and return an Outcome; only here does an outcome become the exit
    status for vzdump (vzdump/rules.py). `cfg` is None when the config could not be read."""

    def __init__(self, cfg: Config | None, settings: HookSettings, job: JobId, problem: ConfigError | None = None,
                 watchdog: Watchdog | None = None) -> None:
        self.ctx = PhaseContext(cfg, settings, job, problem, watchdog)

    def run(self, phase: Phase, vmtype: GuestType | None, mode: Mode | None, vmid: int | None) -> int:
        if phase.is_job_phase:
            return rules.exit_status(phase, self._job_phase(phase))
        assert vmtype is not None and mode is not None and vmid is not None
        return rules.exit_status(phase, self._guest_phase(phase, vmtype, mode, vmid))

    def _job_phase(self, phase: Phase) -> Outcome:
        step = rules.plan(phase, None, None, None).step
        if step is Step.SWEEP:
            from . import job_start

            return job_start.run(self.ctx)
        if step is Step.FINISH:
            from . import finish

            return finish.run(self.ctx, phase)
        return Outcome()

    def _guest_phase(self, phase: Phase, vmtype: GuestType, mode: Mode, vmid: int) -> Outcome:
        ctx = self.ctx
        if phase in rules.TOLD_TO_RESIDENT:
            # before the record is read: the resident may be starting the stacks
            handover.hear_resident(ctx, vmid, phase)
        if vmtype is GuestType.QEMU and phase in rules.WATCHER_ENDS:
            from ..qemu import watcher

            watcher.forget(ctx.state, vmid)  # this guest's backup is over: no job start to wait for
        rec = ctx.state.load(vmid)
        guest = ctx.guest(vmid, rec)
        if guest is None:
            self._not_handled(phase, vmtype, mode, vmid)
            return Outcome()
        plan = rules.plan(phase, vmtype, mode, rec, guest.early_resume)
        if plan.note and (rec is None or rec.status.pending or phase is Phase.PRE_STOP):
            log.info("%s %d: %s", phase.value, vmid, plan.note)
        if plan.step is Step.PREFLIGHT:
            from . import preflight

            return preflight.run(ctx, guest, vmtype, mode)
        if plan.step is Step.QUIESCE:
            from . import quiesce

            outcome = quiesce.run(ctx, guest, vmtype, mode, rec, plan.note_backup_job)
            if plan.arm_watcher:  # suspend, stop: the resident watches once the stop is done
                handover.say_watching(ctx, vmid, phase)
            return outcome
        if plan.step is Step.ARM_WATCHER:
            handover.arm_resident(ctx, guest, vmtype, mode, phase, watching=True)
            handover.say_watching(ctx, vmid, phase)
        if plan.step is Step.RESUME:
            resume_point.resume(ctx, guest, phase, plan.wait_for_guest)
        if phase in rules.CONTROLLER_ENDS and rec is not None:
            resume_point.close_controllers(ctx, vmid, phase)
        return Outcome()

    def _not_handled(self, phase: Phase, vmtype: GuestType, mode: Mode, vmid: int) -> None:
        """A guest without settings: a broken config is recorded at backup-start (job-end fails)."""
        ctx = self.ctx
        if phase is Phase.BACKUP_START and ctx.problem is not None:
            log.error("backup-start %d: the config is unusable (%s): backed up WITHOUT quiescing (crash-consistent)",
                      vmid, first_line(ctx.problem))
            ctx.state.save(GuestRecord(vmid, vmtype, mode, {}, status=Status.CONFIG_ERROR,
                                       crash_consistent=True))
        elif phase is Phase.BACKUP_START:
            log.info("%s %d: not in %s (or not enabled): left alone", phase.value, vmid,
                     ctx.cfg.source if ctx.cfg else "the config")


def run_phase(args: list[str], env: Mapping[str, str]) -> int:
    """`vzdump-hook PHASE [MODE VMID]` as vzdump calls it, then the chained scripts (chain.py).
    Returns the exit status for vzdump."""
    name = args[0]
    phase = parse_phase(name)
    cfg, settings, problem = _load_config(env)
    settings = settings_with_env(settings, env)
    if phase is Phase.JOB_START and cfg is not None:
        _remember(settings, env)
    where = " ".join(args[:1] + args[2:3])
    first = phase in rules.CHAIN_FIRST
    if settings.chain and first:
        code = _run_chain(settings, args, env)
        if code:
            log.warning("%s: a chained script failed (exit %d): vzdump fails this guest's backup; nothing stopped",
                        where, code)
            return code
    timer = _watchdog(settings.phase_timeout + HARD_GRACE, name)
    code = _own_work(args, phase, env, cfg, settings, problem, timer)
    timer.cancel()
    if settings.chain and not first:
        chained = _run_chain(settings, args, env)
        if chained and not rules.chained_status(phase, chained):
            log.error("%s: a chained script failed (exit %d); not passed on to vzdump: "
                      "a failing pre-restart would leave the guest frozen or stopped", where, chained)
        code = code or rules.chained_status(phase, chained)
    return code


def _run_chain(settings: HookSettings, args: list[str], env: Mapping[str, str]) -> int:
    from ..vzdump import chain  # subprocess: only phases with chained scripts pay for its import

    return chain.run(settings.chain, args, env, settings.chain_timeout)


def _load_config(env: Mapping[str, str]) -> tuple[Config | None, HookSettings, ConfigError | None]:
    """The config, or (None, the [hook] settings of the last valid config, why) when it cannot be used."""
    try:
        cfg = configuration.load(env.get(configuration.CONFIG_ENV),
                                 cache_dir=settings_with_env(HookSettings(), env).run_dir)
        return cfg, cfg.hook, None
    except ConfigError as e:
        return None, remembered_settings(settings_with_env(HookSettings(), env).state_dir) or HookSettings(), e


def _remember(settings: HookSettings, env: Mapping[str, str]) -> None:
    try:
        remember_settings(settings, settings_with_env(HookSettings(), env).state_dir)
    except OSError as e:
        log.warning("job-start: could not keep the [hook] settings for a phase that finds the config broken: %s", e)


def _own_work(args: list[str], phase: Phase | None, env: Mapping[str, str], cfg: Config | None, settings: HookSettings,
              problem: ConfigError | None, watchdog: Watchdog | None = None) -> int:
    name = args[0]
    if phase is None:
        log.info("ignoring unknown phase %r (a newer vzdump?)", name)
        return 0
    vmtype = mode = None
    vmid: int | None = None
    if not phase.is_job_phase:
        if len(args) < 3 or args[1] not in {m.value for m in Mode} or not args[2].isdigit():
            log.error("%s: expected `%s MODE VMID`, got %r", name, name, " ".join(args))
            return rules.USAGE_ERROR
        mode, vmid = Mode(args[1]), int(args[2])
        try:
            vmtype = GuestType(env.get("VMTYPE", ""))
        except ValueError:
            log.warning("%s %d: VMTYPE %r unknown, assuming qemu (the latest resume point)", name, vmid,
                        env.get("VMTYPE"))
            vmtype = GuestType.QEMU
    try:
        return PhaseRunner(cfg, settings, JobId.current(), problem, watchdog).run(phase, vmtype, mode, vmid)
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
