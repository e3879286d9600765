"""Pure decisions: given the phase, guest type, mode and what this job already did to the guest,
what to do now and what exit status a failure earns. No I/O here; phase/runner.py carries the plans out.

Where the backup's point in time is decides the earliest safe resume (docs/design.md §1):
- LXC snapshot/suspend: the snapshot (or the frozen rsync pass) is done before `pre-restart`. In
  suspend mode vzdump calls `pre-restart` while the container is still FROZEN (it thaws it right
  after), and a command sent into a frozen container blocks until its timeout: the resume happens
  at `post-restart`. In snapshot mode the container is thawed at `pre-restart` (pve-guest-common
  AbstractConfig::snapshot_create freezes and thaws it around the volume snapshots, with the same
  cgroup freezer vzdump uses for several volumes, so vzdump's own freeze is undone there too):
  the resume happens at `pre-restart`.
- LXC stop: the archive is written from the stopped container; the container runs again only at
  `post-restart`, which vzdump calls after `backup-end`.
- QEMU (every mode): the point in time is the start of QEMU's backup job, after `post-restart` in
  snapshot mode and with no hook of its own; `backup-end` is the first hook certainly after it.
  In suspend mode `pre-restart` follows `backup-end` on success but precedes the VM's resume after
  an error (the VM is paused then), so only `post-restart` is used there.
- QEMU early resume (`early_resume`, qemu/watcher.py): `pre-stop` notes QEMU's current backup job
  before anything stops (a leftover must not count); the last hook before the job starts arms a
  detached watcher that starts the stacks once QMP reports the new job: `post-restart` in snapshot
  mode, `pre-stop` (after the stop) in suspend and stop mode. `backup-end`, `backup-abort` and
  `log-end` end it; whichever resumes first wins (per-guest lock), backup-end stays the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..node.state import GuestRecord, Status
from ..stacks.conversation import ENDING_PHASES
from .phases import GuestType, Mode, Phase

# The phases by which a guest's backup is over (or about to be), well or not.
BACKUP_OVER = frozenset({Phase.BACKUP_END, Phase.BACKUP_ABORT, Phase.LOG_END})

RESUME_POINTS: dict[tuple[GuestType, Mode], frozenset[Phase]] = {
    (GuestType.LXC, Mode.SNAPSHOT): BACKUP_OVER | {Phase.PRE_RESTART, Phase.POST_RESTART},
    (GuestType.LXC, Mode.SUSPEND): BACKUP_OVER | {Phase.POST_RESTART},
    # backup-end comes while the container is still stopped: wait for post-restart
    (GuestType.LXC, Mode.STOP): frozenset({Phase.POST_RESTART, Phase.BACKUP_ABORT, Phase.LOG_END}),
    (GuestType.QEMU, Mode.SNAPSHOT): BACKUP_OVER,
    (GuestType.QEMU, Mode.SUSPEND): BACKUP_OVER | {Phase.POST_RESTART},
    (GuestType.QEMU, Mode.STOP): BACKUP_OVER | {Phase.POST_RESTART},
}

# The phases a guest's resident is told as soon as the hook runs (resident/client.py, before anything
# else is imported): every phase that is a resume point for some type and mode. client.py keeps these
# names as strings for its start-up cost; tests/unit/test_rules.py ties the two.
TOLD_TO_RESIDENT: frozenset[Phase] = frozenset().union(*RESUME_POINTS.values())


# The last hook before QEMU's backup job starts, per mode (docs/design.md §1): where the watcher is armed.
WATCHER_ARMED_AT: dict[Mode, Phase] = {Mode.SNAPSHOT: Phase.POST_RESTART, Mode.SUSPEND: Phase.PRE_STOP,
                                       Mode.STOP: Phase.PRE_STOP}
# The phases that end a guest's watcher: this guest's backup is over (or about to be) there.
WATCHER_ENDS = BACKUP_OVER
# the guest's backup ended, well or not: its controllers are told done / failed (stacks/conversation.py)
CONTROLLER_ENDS = frozenset(p for p in Phase if p.value in ENDING_PHASES)


class Step(Enum):
    NONE = "none"
    SWEEP = "sweep"  # job-start: resume markers left by jobs that are provably over
    PREFLIGHT = "preflight"  # backup-start: guest answers, stacks listed, stale marker resumed
    QUIESCE = "quiesce"  # pre-stop: marker first, then stop
    RESUME = "resume"  # start what this job stopped
    ARM_WATCHER = "arm-watcher"  # QEMU: start the stacks once the backup job has started (qemu/watcher.py)
    FINISH = "finish"  # job-end/job-abort: last resume attempts, summary


@dataclass(frozen=True)
class Plan:
    step: Step
    wait_for_guest: bool = False  # the guest may be (re)booting: retry connecting up to resume_wait
    note: str = ""  # why nothing happens, for the task log
    note_backup_job: bool = False  # QUIESCE: ask QEMU for its backup job before anything stops
    arm_watcher: bool = False  # QUIESCE: arm the early-resume watcher right after the stop


def first_resume_point(vmtype: GuestType, mode: Mode) -> Phase:
    """The earliest hook at which resuming is safe on the success path (for messages)."""
    if vmtype is GuestType.LXC:
        return Phase.PRE_RESTART if mode is Mode.SNAPSHOT else Phase.POST_RESTART
    return Phase.BACKUP_END


def plan(phase: Phase, vmtype: GuestType | None, mode: Mode | None, record: GuestRecord | None,
         early_resume: bool = False) -> Plan:
    """What to do in `phase` for a configured guest (job phases: for the job). `early_resume`: the
    guest's setting; it only applies to QEMU guests."""
    if phase is Phase.JOB_INIT:
        return Plan(Step.NONE)
    if phase is Phase.JOB_START:
        return Plan(Step.SWEEP)
    if phase in (Phase.JOB_END, Phase.JOB_ABORT):
        return Plan(Step.FINISH)
    assert vmtype is not None and mode is not None
    if phase is Phase.BACKUP_START:
        return Plan(Step.PREFLIGHT)
    if phase is Phase.PRE_STOP:
        if record is not None and record.status in (Status.PREFLIGHT_FAILED, Status.CONFIG_ERROR, Status.SKIPPED):
            return Plan(Step.NONE, note="preflight failed: nothing is stopped, the backup is crash-consistent")
        if record is not None and record.status.pending:
            return Plan(Step.NONE, note="already quiesced by this job")
        watch = early_resume and vmtype is GuestType.QEMU
        return Plan(Step.QUIESCE, note_backup_job=watch, arm_watcher=watch and WATCHER_ARMED_AT[mode] is Phase.PRE_STOP)
    if record is None or not record.status.pending:
        return Plan(Step.NONE)
    if phase not in RESUME_POINTS[(vmtype, mode)]:
        until = first_resume_point(vmtype, mode).value
        if early_resume and vmtype is GuestType.QEMU:
            if phase is WATCHER_ARMED_AT[mode]:
                return Plan(Step.ARM_WATCHER)
            until = f"QEMU's backup job has started (or {until})"
        return Plan(Step.NONE, note=f"stacks stay down until {until}: the backup's point in time is still ahead")
    restarted = mode is Mode.STOP or phase in (Phase.BACKUP_ABORT, Phase.LOG_END)
    return Plan(Step.RESUME, wait_for_guest=restarted)


@dataclass(frozen=True)
class Outcome:
    """What happened in a phase, as far as the exit status is concerned."""

    preflight_failed: bool = False
    quiesce_failed: bool = False  # a stack would not stop, was killed, or the guest was unreachable
    abort_policy: bool = False  # the guest's on_quiesce_error is "abort"
    still_down: bool = False  # job-end: stacks of this job are still down
    config_error: bool = False  # the job ran without a usable config (not quiesced): job-end fails


# A call vzdump never makes (a guest phase without MODE and VMID): a usage error, as for any command.
USAGE_ERROR = 2


def exit_status(phase: Phase, outcome: Outcome) -> int:
    """The exit status for vzdump (README's policy table). Resume problems never fail a backup."""
    if phase is Phase.BACKUP_START and outcome.preflight_failed and outcome.abort_policy:
        return 1
    if phase is Phase.PRE_STOP and outcome.quiesce_failed and outcome.abort_policy:
        return 1
    if phase in (Phase.JOB_END, Phase.JOB_ABORT) and (outcome.still_down or outcome.config_error):
        return 1
    return 0


def fails_backup(phase: Phase, vmtype: GuestType, mode: Mode) -> bool:
    """Whether vzdump fails the guest's backup when `phase` exits non-zero on the success path
    (docs/design.md §1): the phases before the archive is written, and backup-end. pre-restart and
    post-restart come before the archive in LXC snapshot/suspend and QEMU snapshot mode only."""
    if phase in (Phase.BACKUP_START, Phase.PRE_STOP, Phase.BACKUP_END):
        return True
    before_archive = ((vmtype is GuestType.LXC and mode is not Mode.STOP)
                      or (vmtype is GuestType.QEMU and mode is Mode.SNAPSHOT))
    return phase in (Phase.PRE_RESTART, Phase.POST_RESTART) and before_archive


# -- chained scripts ([hook] chain, vzdump/chain.py) ----------------------------------------------

# Chained scripts run before the hook's own work in these phases (the stop stays right before the
# point in time, and a failing script fails the backup before anything is down), after it elsewhere.
CHAIN_FIRST = frozenset({Phase.PRE_STOP})


def chained_status(phase: Phase | None, code: int) -> int:
    """The exit status a chained script's `code` adds to the phase's. A failing pre-restart is not
    passed on: vzdump would skip what follows it, and an LXC guest in suspend mode would stay frozen,
    one in stop mode stopped (pve-container's VZDump/LXC.pm, PVE/VZDump.pm)."""
    return 0 if phase is Phase.PRE_RESTART else code
