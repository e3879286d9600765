"""vzdump/rules.py: pure decisions per phase, checked against vzdump's phase order (phases.backup_order)."""

from __future__ import annotations

import itertools
from dataclasses import fields

import pytest

from vzdump_hook.node.state import GuestRecord, Status
from vzdump_hook.vzdump import rules
from vzdump_hook.vzdump.phases import TRANSFER, GuestType, Mode, Phase, backup_order, parse_phase
from vzdump_hook.vzdump.rules import Outcome, Plan, Step, exit_status, first_resume_point, plan

LXC, QEMU = GuestType.LXC, GuestType.QEMU
ALL = [(t, m) for t in GuestType for m in Mode]

# docs/how-it-works.md "What happens when": where the stacks start again on the success path.
FIRST_RESUME = {
    (LXC, Mode.SNAPSHOT): Phase.PRE_RESTART,  # snapshot_create thawed the CT (pve-guest-common)
    (LXC, Mode.SUSPEND): Phase.POST_RESTART,
    (LXC, Mode.STOP): Phase.POST_RESTART,  # the CT runs again only after backup-end
    (QEMU, Mode.SNAPSHOT): Phase.BACKUP_END,  # the point in time is after post-restart
    (QEMU, Mode.SUSPEND): Phase.BACKUP_END,
    (QEMU, Mode.STOP): Phase.BACKUP_END,
}

PENDING = [Status.QUIESCING, Status.QUIESCED, Status.RESUME_FAILED]
NOT_PENDING = [Status.PREFLIGHT_OK, Status.PREFLIGHT_FAILED, Status.SKIPPED, Status.NOTHING_STOPPED, Status.RESUMED]
GUEST_PHASES = [p for p in Phase if not p.is_job_phase]


def record(status: Status, vmtype: GuestType = QEMU, mode: Mode = Mode.SNAPSHOT) -> GuestRecord:
    return GuestRecord(101, vmtype.value, mode.value, {}, status=status)


def success_path(vmtype: GuestType, mode: Mode, running: bool = True) -> list[Phase]:
    return [Phase(p) for p in backup_order(vmtype, mode, running) if not p.startswith("[")]


def play(vmtype: GuestType, mode: Mode, early_resume: bool = False) -> list[tuple[Phase, Plan]]:
    """The plans vzdump's success path gets, with the record a working hook would keep."""
    rec: GuestRecord | None = None
    out = []
    for phase in success_path(vmtype, mode):
        p = plan(phase, vmtype, mode, rec, early_resume=early_resume)
        out.append((phase, p))
        if p.step is Step.PREFLIGHT:
            rec = record(Status.PREFLIGHT_OK, vmtype, mode)
        elif p.step is Step.QUIESCE:
            rec = record(Status.QUIESCED, vmtype, mode)
        elif p.step is Step.RESUME:
            rec = record(Status.RESUMED, vmtype, mode)
    return out


# -- the success path ---------------------------------------------------------------------------


@pytest.mark.parametrize(("vmtype", "mode"), ALL)
def test_first_resume_on_the_success_path(vmtype: GuestType, mode: Mode) -> None:
    plans = play(vmtype, mode)
    resumes = [phase for phase, p in plans if p.step is Step.RESUME]
    assert resumes == [FIRST_RESUME[(vmtype, mode)]]
    steps = [p.step for _, p in plans]
    assert steps[:2] == [Step.PREFLIGHT, Step.QUIESCE]
    assert steps.count(Step.QUIESCE) == 1


@pytest.mark.parametrize(("vmtype", "mode"), ALL)
def test_resume_comes_after_the_point_in_time(vmtype: GuestType, mode: Mode) -> None:
    order = list(backup_order(vmtype, mode))
    first = FIRST_RESUME[(vmtype, mode)].value
    assert order.index(first) > order.index("[point in time]")
    assert order.index("pre-stop") < order.index("[point in time]")


@pytest.mark.parametrize(("vmtype", "mode"), ALL)
def test_first_resume_point_names_the_success_path_resume(vmtype: GuestType, mode: Mode) -> None:
    assert first_resume_point(vmtype, mode) is FIRST_RESUME[(vmtype, mode)]


@pytest.mark.parametrize(("vmtype", "mode"), ALL)
def test_phases_before_the_resume_point_keep_stacks_down_with_a_note(vmtype: GuestType, mode: Mode) -> None:
    order = success_path(vmtype, mode)
    first = FIRST_RESUME[(vmtype, mode)]
    between = order[order.index(Phase.PRE_STOP) + 1 : order.index(first)]
    for phase in between:
        p = plan(phase, vmtype, mode, record(Status.QUIESCED, vmtype, mode))
        assert p.step is Step.NONE, phase
        assert f"until {first.value}" in p.note


@pytest.mark.parametrize(
    ("mode", "phase"),
    [(Mode.SNAPSHOT, Phase.PRE_RESTART), (Mode.SNAPSHOT, Phase.POST_RESTART), (Mode.SUSPEND, Phase.PRE_RESTART),
     (Mode.STOP, Phase.PRE_RESTART)],
)
def test_qemu_never_resumes_before_the_backup_job_started(mode: Mode, phase: Phase) -> None:
    """(qemu suspend/stop: post-restart comes after backup-end, or after an error: allowed there)"""
    for status in PENDING:
        assert plan(phase, QEMU, mode, record(status, QEMU, mode)).step is Step.NONE


@pytest.mark.parametrize("status", PENDING)
def test_qemu_snapshot_pre_and_post_restart_do_nothing(status: Status) -> None:
    for phase in (Phase.PRE_RESTART, Phase.POST_RESTART):
        p = plan(phase, QEMU, Mode.SNAPSHOT, record(status))
        assert p.step is Step.NONE and "backup-end" in p.note


@pytest.mark.parametrize("status", PENDING)
def test_lxc_stop_never_resumes_at_backup_end_or_pre_restart(status: Status) -> None:
    for phase in (Phase.BACKUP_END, Phase.PRE_RESTART):
        assert plan(phase, LXC, Mode.STOP, record(status, LXC, Mode.STOP)).step is Step.NONE


def test_lxc_suspend_never_resumes_at_pre_restart_while_frozen() -> None:
    assert plan(Phase.PRE_RESTART, LXC, Mode.SUSPEND, record(Status.QUIESCED, LXC, Mode.SUSPEND)).step is Step.NONE


def test_lxc_snapshot_resumes_at_pre_restart_the_ct_is_thawed() -> None:
    assert plan(Phase.PRE_RESTART, LXC, Mode.SNAPSHOT, record(Status.QUIESCED, LXC, Mode.SNAPSHOT)).step is Step.RESUME


@pytest.mark.parametrize(("vmtype", "mode"), ALL)
def test_wait_for_guest_only_where_it_was_restarted(vmtype: GuestType, mode: Mode) -> None:
    p = plan(FIRST_RESUME[(vmtype, mode)], vmtype, mode, record(Status.QUIESCED, vmtype, mode))
    assert p.step is Step.RESUME
    assert p.wait_for_guest is (mode is Mode.STOP)


def test_qemu_suspend_error_path_resumes_at_post_restart() -> None:
    """After an error vzdump resumes the paused VM between pre-restart and post-restart."""
    assert plan(Phase.PRE_RESTART, QEMU, Mode.SUSPEND, record(Status.QUIESCED)).step is Step.NONE
    p = plan(Phase.POST_RESTART, QEMU, Mode.SUSPEND, record(Status.QUIESCED))
    assert p.step is Step.RESUME and not p.wait_for_guest


# -- error paths --------------------------------------------------------------------------------


@pytest.mark.parametrize(("vmtype", "mode"), ALL)
@pytest.mark.parametrize("phase", [Phase.BACKUP_ABORT, Phase.LOG_END])
@pytest.mark.parametrize("status", PENDING)
def test_backup_abort_and_log_end_resume_whatever_is_pending(vmtype: GuestType, mode: Mode, phase: Phase,
                                                             status: Status) -> None:
    p = plan(phase, vmtype, mode, record(status, vmtype, mode))
    assert p.step is Step.RESUME
    assert p.wait_for_guest  # after an error the guest may be restarting


@pytest.mark.parametrize(("vmtype", "mode"), ALL)
@pytest.mark.parametrize("phase", [Phase.PRE_RESTART, Phase.POST_RESTART, Phase.BACKUP_END, Phase.BACKUP_ABORT,
                                   Phase.LOG_END])
@pytest.mark.parametrize("status", [*NOT_PENDING, None])
def test_nothing_to_resume_when_nothing_is_pending(vmtype: GuestType, mode: Mode, phase: Phase,
                                                   status: Status | None) -> None:
    rec = None if status is None else record(status, vmtype, mode)
    assert plan(phase, vmtype, mode, rec).step is Step.NONE


@pytest.mark.parametrize(("vmtype", "mode"), ALL)
@pytest.mark.parametrize("status", [Status.PREFLIGHT_FAILED, Status.SKIPPED])
def test_pre_stop_after_failed_preflight_does_nothing(vmtype: GuestType, mode: Mode, status: Status) -> None:
    p = plan(Phase.PRE_STOP, vmtype, mode, record(status, vmtype, mode))
    assert p.step is Step.NONE
    assert "crash-consistent" in p.note


@pytest.mark.parametrize("status", PENDING)
def test_pre_stop_twice_does_not_quiesce_again(status: Status) -> None:
    p = plan(Phase.PRE_STOP, QEMU, Mode.SNAPSHOT, record(status))
    assert p.step is Step.NONE and "already quiesced" in p.note


@pytest.mark.parametrize("rec", [None, record(Status.PREFLIGHT_OK)])
def test_pre_stop_quiesces(rec: GuestRecord | None) -> None:
    assert plan(Phase.PRE_STOP, QEMU, Mode.SNAPSHOT, rec) == Plan(Step.QUIESCE)


@pytest.mark.parametrize("status", [None, *Status])
def test_backup_start_is_always_a_preflight(status: Status | None) -> None:
    rec = None if status is None else record(status)
    assert plan(Phase.BACKUP_START, LXC, Mode.SNAPSHOT, rec).step is Step.PREFLIGHT


def test_job_phases() -> None:
    assert plan(Phase.JOB_INIT, None, None, None).step is Step.NONE
    assert plan(Phase.JOB_START, None, None, None).step is Step.SWEEP
    assert plan(Phase.JOB_END, None, None, None).step is Step.FINISH
    assert plan(Phase.JOB_ABORT, None, None, None).step is Step.FINISH


def test_pending_statuses() -> None:
    assert {s for s in Status if s.pending} == set(PENDING)


def test_resume_points_cover_every_type_and_mode() -> None:
    assert set(rules.RESUME_POINTS) == set(ALL)
    for key, points in rules.RESUME_POINTS.items():
        assert Phase.BACKUP_ABORT in points and Phase.LOG_END in points, key
        assert Phase.PRE_STOP not in points and Phase.BACKUP_START not in points, key


# -- exit status policy (README) ----------------------------------------------------------------


# README's policy table as data: the phases that may exit non-zero, the outcome flag sets of which
# one must be wholly set for it, and the status. Every other phase/outcome exits 0.
NON_ZERO: dict[Phase, tuple[list[frozenset[str]], int]] = {
    Phase.BACKUP_START: ([frozenset({"preflight_failed", "abort_policy"})], 1),
    Phase.PRE_STOP: ([frozenset({"quiesce_failed", "abort_policy"})], 1),
    Phase.JOB_END: ([frozenset({"still_down"}), frozenset({"config_error"})], 1),
    Phase.JOB_ABORT: ([frozenset({"still_down"}), frozenset({"config_error"})], 1),
}


def expected_exit(phase: Phase, o: Outcome) -> int:
    alternatives, code = NON_ZERO.get(phase, ([], 0))
    return code if any(all(getattr(o, f) for f in flags) for flags in alternatives) else 0


OUTCOMES = [Outcome(*flags) for flags in itertools.product((False, True), repeat=len(fields(Outcome)))]


@pytest.mark.parametrize("phase", list(Phase))
def test_exit_status_policy_table(phase: Phase) -> None:
    for o in OUTCOMES:
        assert exit_status(phase, o) == expected_exit(phase, o), (phase, o)


@pytest.mark.parametrize("phase", [Phase.PRE_RESTART, Phase.POST_RESTART, Phase.BACKUP_END, Phase.BACKUP_ABORT,
                                   Phase.LOG_END, Phase.JOB_INIT, Phase.JOB_START])
def test_resume_phases_never_fail(phase: Phase) -> None:
    assert all(exit_status(phase, o) == 0 for o in OUTCOMES)


def test_exit_status_examples() -> None:
    assert exit_status(Phase.JOB_START, Outcome(config_error=True)) == 0  # the job goes on, unquiesced
    assert exit_status(Phase.JOB_END, Outcome(config_error=True)) == 1
    assert exit_status(Phase.BACKUP_START, Outcome(config_error=True)) == 0
    assert exit_status(Phase.BACKUP_START, Outcome(preflight_failed=True)) == 0
    assert exit_status(Phase.BACKUP_START, Outcome(preflight_failed=True, abort_policy=True)) == 1
    assert exit_status(Phase.PRE_STOP, Outcome(quiesce_failed=True)) == 0
    assert exit_status(Phase.PRE_STOP, Outcome(quiesce_failed=True, abort_policy=True)) == 1
    assert exit_status(Phase.PRE_STOP, Outcome(abort_policy=True)) == 0
    assert exit_status(Phase.JOB_END, Outcome(still_down=True)) == 1
    assert exit_status(Phase.JOB_END, Outcome()) == 0
    assert exit_status(Phase.BACKUP_END, Outcome(still_down=True, quiesce_failed=True, abort_policy=True)) == 0


# -- phases.backup_order (the reference the tests above rely on) --------------------------------


def test_backup_order_matches_design_table() -> None:
    assert backup_order(LXC, Mode.SNAPSHOT) == (
        "backup-start",
        "pre-stop",
        "[point in time]",
        "pre-restart",
        "post-restart",
        "[data transfer]",
        "backup-end",
        "log-end",
    )
    assert backup_order(LXC, Mode.STOP) == (
        "backup-start",
        "pre-stop",
        "[point in time]",
        "[data transfer]",
        "backup-end",
        "pre-restart",
        "post-restart",
        "log-end",
    )
    assert backup_order(QEMU, Mode.SNAPSHOT) == (
        "backup-start",
        "pre-stop",
        "pre-restart",
        "post-restart",
        "[point in time]",
        "[data transfer]",
        "backup-end",
        "log-end",
    )
    assert backup_order(QEMU, Mode.SUSPEND) == backup_order(QEMU, Mode.STOP) == backup_order(LXC, Mode.STOP)
    assert backup_order(QEMU, Mode.STOP, running=False) == ("backup-start", "[point in time]", "[data transfer]",
                                                           "backup-end", "log-end")


# -- QEMU early resume (qemu/watcher.py) -----------------------------------------------------------

ARMED_AT = {Mode.SNAPSHOT: Phase.POST_RESTART, Mode.SUSPEND: Phase.PRE_STOP, Mode.STOP: Phase.PRE_STOP}


@pytest.mark.parametrize("mode", list(Mode))
def test_qemu_watcher_is_armed_at_the_last_hook_before_the_job_starts(mode: Mode) -> None:
    plans = play(QEMU, mode, early_resume=True)
    order = list(backup_order(QEMU, mode))
    armed = [phase for phase, p in plans if p.step is Step.ARM_WATCHER or p.arm_watcher]
    assert armed == [ARMED_AT[mode]]
    hooks_before_pit = [p for p in order[: order.index("[point in time]")] if not p.startswith("[")]
    assert hooks_before_pit[-1] == ARMED_AT[mode].value  # the last hook before the job starts
    quiesce = next(p for phase, p in plans if p.step is Step.QUIESCE)
    assert quiesce.note_backup_job  # pre-stop asks QEMU before anything stops, in every mode
    # the fallback is unchanged: backup-end resumes whatever the watcher did not
    assert [phase for phase, p in plans if p.step is Step.RESUME] == [FIRST_RESUME[(QEMU, mode)]]


@pytest.mark.parametrize(("vmtype", "mode"), ALL)
def test_no_watcher_without_early_resume_or_for_lxc(vmtype: GuestType, mode: Mode) -> None:
    for phase, p in play(vmtype, mode):
        assert p.step is not Step.ARM_WATCHER and not p.arm_watcher and not p.note_backup_job, phase
    if vmtype is LXC:
        for phase, p in play(vmtype, mode, early_resume=True):
            assert p.step is not Step.ARM_WATCHER and not p.arm_watcher and not p.note_backup_job, phase


def test_no_watcher_when_nothing_was_stopped() -> None:
    for status in [*NOT_PENDING, None]:
        rec = None if status is None else record(status)
        assert plan(Phase.POST_RESTART, QEMU, Mode.SNAPSHOT, rec, early_resume=True).step is Step.NONE


def test_early_resume_note_before_the_watcher_is_armed() -> None:
    p = plan(Phase.PRE_RESTART, QEMU, Mode.SNAPSHOT, record(Status.QUIESCED), early_resume=True)
    assert p.step is Step.NONE
    assert p.note == ("stacks stay down until QEMU's backup job has started (or backup-end): "
                      "the backup's point in time is still ahead")


def test_watcher_ends_where_this_guests_backup_ends() -> None:
    assert rules.WATCHER_ENDS == {Phase.BACKUP_END, Phase.BACKUP_ABORT, Phase.LOG_END}
    assert rules.WATCHER_ARMED_AT == ARMED_AT


# -- the rest of vzdump's contract (vzdump/rules.py) ----------------------------------------------


def test_the_resident_is_told_every_resume_point_and_its_stdlib_copy_says_the_same() -> None:
    from vzdump_hook.resident import client

    points = set().union(*rules.RESUME_POINTS.values())
    assert rules.TOLD_TO_RESIDENT == points
    assert client.TOLD_PHASES == {p.value for p in points}


@pytest.mark.parametrize(("vmtype", "mode"), ALL)
def test_a_failing_phase_fails_the_backup_before_the_archive_is_written_and_at_backup_end(vmtype: GuestType,
                                                                                          mode: Mode) -> None:
    """Derived from vzdump's order (phases.backup_order, written from docs/design.md §1): the main-path
    phases before the data transfer, and backup-end, fail the guest's backup; the rest do not."""
    order = backup_order(vmtype, mode)
    before_transfer = {Phase(p) for p in order[: order.index(TRANSFER)] if parse_phase(p) is not None}
    expected = before_transfer | {Phase.BACKUP_END}
    assert {p for p in Phase if not p.is_job_phase and rules.fails_backup(p, vmtype, mode)} == expected


def test_a_chained_scripts_failure_is_passed_on_except_at_pre_restart() -> None:
    for phase in Phase:
        assert rules.chained_status(phase, 3) == (0 if phase is Phase.PRE_RESTART else 3)
        assert rules.chained_status(phase, 0) == 0
    assert rules.chained_status(None, 3) == 3  # a phase this version does not know
    assert rules.CHAIN_FIRST == {Phase.PRE_STOP}
