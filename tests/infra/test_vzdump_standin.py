"""Tests of the vzdump stand-in itself, with throw-away sh hooks that log argv and environment."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.infra.vzdump import (
    BackupStatus,
    Context,
    FailPoint,
    GuestSpec,
    GuestState,
    GuestType,
    HookHang,
    JobResult,
    JobStatus,
    Mode,
    Moment,
    run_job,
    run_phase,
)

# PVE's command runner adds these to every command vzdump runs (pve-common PVE/Cmd.pm run, no keeplocale)
RUNNER = {"LC_ALL": "C", "LVM_SUPPRESS_FD_WARNINGS": "1"}

LXC, QEMU = GuestType.LXC, GuestType.QEMU
STOP, SUSPEND, SNAPSHOT = Mode.STOP, Mode.SUSPEND, Mode.SNAPSHOT
REPO = Path(__file__).resolve().parents[2]

# Logs "=== PID PPID ARGV..." and the exact environment it was exec'd with; the exit code of
# phase P comes from $d/exit.P, a sleep from $d/sleep.P, a stdout-holding child from $d/bg.P.
HOOK = r"""#!/bin/sh
d='{dir}'
{{ printf '=== %s %s %s\n' "$$" "$PPID" "$*"; /usr/bin/tr '\000' '\n' < /proc/$$/environ; }} >> "$d/calls.log"
echo "out $1"
echo "err $1" >&2
echo
if [ -f "$d/bg.$1" ]; then /bin/sleep 5 & fi
if [ -f "$d/sleep.$1" ]; then read s < "$d/sleep.$1"; /bin/sleep "$s"; fi
code=0
if [ -f "$d/exit.$1" ]; then read code < "$d/exit.$1"; fi
exit "$code"
"""


@dataclass(frozen=True)
class Call:
    pid: int
    ppid: int
    argv: tuple[str, ...]
    env: dict[str, str]


class Hook:
    """A hook script in tmp_path and what it logged."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.path = tmp_path / "hook"
        self.path.write_text(HOOK.format(dir=tmp_path))
        self.path.chmod(0o755)

    def exit(self, phase: str, code: int) -> None:
        (self.dir / f"exit.{phase}").write_text(f"{code}\n")

    def touch(self, kind: str, phase: str, value: str = "") -> None:
        (self.dir / f"{kind}.{phase}").write_text(value + "\n")

    def calls(self) -> list[Call]:
        log = self.dir / "calls.log"
        calls: list[Call] = []
        for line in log.read_text().splitlines() if log.exists() else []:
            if line.startswith("=== "):
                pid, ppid, *argv = line[4:].split(" ")
                calls.append(Call(int(pid), int(ppid), tuple(argv), {}))
            elif line:
                key, _, value = line.partition("=")
                calls[-1].env[key] = value
        return calls


@pytest.fixture
def hook(tmp_path: Path) -> Hook:
    return Hook(tmp_path)


def guest_phases(hook: Hook) -> list[str]:
    """Guest phases the hook actually saw, as 'phase' (argv checked separately)."""
    return [c.argv[0] for c in hook.calls() if len(c.argv) == 3]


def job_phases(result: JobResult) -> list[str]:
    return [p for p in result.phases() if p.startswith("job-")]


# -- phase order --------------------------------------------------------------------------

ORDER = {
    (LXC, SNAPSHOT): [
        "backup-start",
        "pre-stop",
        "pre-restart",
        "post-restart",
        "backup-end",
        "log-end",
    ],
    (LXC, SUSPEND): [
        "backup-start",
        "pre-stop",
        "pre-restart",
        "post-restart",
        "backup-end",
        "log-end",
    ],
    (LXC, STOP): [
        "backup-start",
        "pre-stop",
        "backup-end",
        "pre-restart",
        "post-restart",
        "log-end",
    ],
    (QEMU, SNAPSHOT): [
        "backup-start",
        "pre-stop",
        "pre-restart",
        "post-restart",
        "backup-end",
        "log-end",
    ],
    (QEMU, SUSPEND): [
        "backup-start",
        "pre-stop",
        "backup-end",
        "pre-restart",
        "post-restart",
        "log-end",
    ],
    (QEMU, STOP): [
        "backup-start",
        "pre-stop",
        "backup-end",
        "pre-restart",
        "post-restart",
        "log-end",
    ],
}


@pytest.mark.parametrize(("vmtype", "mode"), list(ORDER))
def test_phase_order_running_guest(hook: Hook, vmtype: GuestType, mode: Mode) -> None:
    result = run_job(hook.path, [GuestSpec(101, vmtype, mode, hostname="g1")])

    assert result.status is JobStatus.OK
    calls = hook.calls()
    assert [c.argv for c in calls] == [
        ("job-init",),
        ("job-start",),
        *[(phase, str(mode), "101") for phase in ORDER[vmtype, mode]],
        ("job-end",),
    ]
    assert result.phases() == [c.argv[0] for c in calls]
    # a new process per phase, all children of the job's one "vzdump worker", which is not pytest
    assert len({c.pid for c in calls}) == len(calls)
    (worker,) = {c.ppid for c in calls}
    assert worker != os.getpid()
    assert result.guest(101).status is BackupStatus.OK
    assert result.guest(101).guest_state is GuestState.RUNNING
    assert result.point_in_time[101] is not None


def test_each_job_has_its_own_worker_which_is_gone_after_the_job(hook: Hook) -> None:
    seen: list[int | None] = []
    run_job(hook.path, [GuestSpec(101, GuestType.LXC, Mode.SNAPSHOT)],
            on_phase=lambda phase, ctx: seen.append(ctx.worker_pid))
    first = {c.ppid for c in hook.calls()}
    assert set(seen) == first  # the callbacks name the hooks' parent
    run_job(hook.path, [GuestSpec(101, GuestType.LXC, Mode.SNAPSHOT)])
    second = {c.ppid for c in hook.calls()} - first
    assert len(first) == 1 and len(second) == 1  # one worker per job, another for the next job
    for pid in first | second:
        assert not os.path.exists(f"/proc/{pid}")  # a job that is over: its worker is gone (and reaped)


@pytest.mark.parametrize("after", ["job-start", "pre-stop", "pre-restart"])
def test_a_worker_killed_between_two_hooks_runs_nothing_more(hook: Hook, after: str) -> None:
    from tests.infra.vzdump import WorkerKilled

    workers: list[int] = []

    def on_phase(phase: str, ctx: Context) -> None:
        if ctx.moment is Moment.AFTER_PHASE and phase == after:
            assert ctx.worker_pid is not None
            workers.append(ctx.worker_pid)
            raise WorkerKilled

    result = run_job(hook.path, [GuestSpec(101, GuestType.LXC, Mode.SNAPSHOT),
                                 GuestSpec(102, GuestType.LXC, Mode.SNAPSHOT)], on_phase=on_phase)
    assert result.status is JobStatus.KILLED
    assert [c.argv[0] for c in hook.calls()][-1] == after  # no abort, no log-end, no job-end
    assert not os.path.exists(f"/proc/{workers[0]}")


@pytest.mark.parametrize("vmtype", [LXC, QEMU])
@pytest.mark.parametrize("mode", [STOP, SUSPEND, SNAPSHOT])
def test_not_running_guest_is_backed_up_in_stop_mode(
    hook: Hook, vmtype: GuestType, mode: Mode
) -> None:
    result = run_job(hook.path, [GuestSpec(101, vmtype, mode, running=False)])

    assert result.status is JobStatus.OK
    assert [c.argv for c in hook.calls() if len(c.argv) == 3] == [
        ("backup-start", "stop", "101"),
        ("backup-end", "stop", "101"),
        ("log-end", "stop", "101"),
    ]
    assert result.guest(101).guest_state is GuestState.STOPPED


def test_lxc_snapshot_fallback_to_suspend(hook: Hook) -> None:
    result = run_job(hook.path, [GuestSpec(101, LXC, SNAPSHOT, snapshot_supported=False)])

    assert [c.argv for c in hook.calls() if len(c.argv) == 3] == [
        (phase, "suspend", "101") for phase in ORDER[LXC, SUSPEND]
    ]
    assert result.guest(101).mode is SUSPEND
    assert "INFO: trying 'suspend' mode instead" in result.task_log()


def test_multi_volume_lxc_snapshot_keeps_the_order(hook: Hook) -> None:
    run_job(hook.path, [GuestSpec(101, LXC, SNAPSHOT, volumes=2)])
    assert guest_phases(hook) == ORDER[LXC, SNAPSHOT]


def test_guests_run_one_after_another_in_vmid_order(hook: Hook) -> None:
    result = run_job(hook.path, [GuestSpec(202, QEMU, SNAPSHOT), GuestSpec(101, LXC, STOP)])

    assert result.phases() == [
        "job-init",
        "job-start",
        *ORDER[LXC, STOP],
        *ORDER[QEMU, SNAPSHOT],
        "job-end",
    ]
    records = [r for r in result.records if r.vmid is not None]
    assert [r.vmid for r in records] == [101] * 6 + [202] * 6
    assert all(a.end <= b.start for a, b in zip(result.records, result.records[1:], strict=False))


# -- environment --------------------------------------------------------------------------


def test_environment_holds_only_vzdumps_variables(hook: Hook) -> None:
    run_job(
        hook.path,
        [GuestSpec(101, LXC, SNAPSHOT, hostname="web")],
        storeid="nas",
        dumpdir="/mnt/pve/nas/dump",
    )

    calls = {c.argv[0]: c for c in hook.calls()}
    assert calls["job-init"].env == {**RUNNER, "STOREID": "nas"}  # DUMPDIR is resolved after job-init
    for phase in ("job-start", "job-end"):
        assert calls[phase].env == {**RUNNER, "STOREID": "nas", "DUMPDIR": "/mnt/pve/nas/dump"}
    for phase in ORDER[LXC, SNAPSHOT]:
        env = calls[phase].env
        assert set(env) == {*RUNNER, "STOREID", "DUMPDIR", "VMTYPE", "HOSTNAME", "TARGET", "LOGFILE"}
        assert env["VMTYPE"] == "lxc"
        assert env["HOSTNAME"] == "web"
        assert env["TARGET"].startswith("/mnt/pve/nas/dump/vzdump-lxc-101-")
        assert env["TARGET"].endswith(".tar.zst")
        assert env["LOGFILE"] == env["TARGET"].removesuffix(".tar.zst") + ".log"
    assert not any({"PATH", "HOME", "LANG", "USER"} & set(c.env) for c in calls.values())


def test_environment_pbs_storage_and_unnamed_vm(hook: Hook) -> None:
    run_job(hook.path, [GuestSpec(101, QEMU, SNAPSHOT)], storeid="pbs", dumpdir=None)

    calls = {c.argv[0]: c for c in hook.calls()}
    assert calls["job-start"].env == {**RUNNER, "STOREID": "pbs"}
    env = calls["backup-start"].env
    assert set(env) == {*RUNNER, "STOREID", "VMTYPE", "TARGET"}  # no DUMPDIR/LOGFILE, VM has no name
    assert env["TARGET"].startswith("vm/101/")


def test_environment_dumpdir_given_directly_and_default_ct_name(hook: Hook) -> None:
    run_job(hook.path, [GuestSpec(105, LXC, STOP)], storeid=None, dumpdir="/backup")

    calls = {c.argv[0]: c for c in hook.calls()}
    assert calls["job-init"].env == {**RUNNER, "DUMPDIR": "/backup"}
    assert calls["backup-start"].env["HOSTNAME"] == "CT105"
    assert "STOREID" not in calls["backup-start"].env


def test_extra_env_is_added_but_may_not_shadow_vzdump(hook: Hook) -> None:
    result = run_job(
        hook.path, [GuestSpec(101, LXC, SNAPSHOT)], extra_env={"VZDUMP_HOOK_CONFIG": "/x.toml"}
    )
    assert all(c.env["VZDUMP_HOOK_CONFIG"] == "/x.toml" for c in hook.calls())
    assert all(r.env["VZDUMP_HOOK_CONFIG"] == "/x.toml" for r in result.records)
    with pytest.raises(ValueError, match="HOSTNAME"):
        run_job(hook.path, [], extra_env={"HOSTNAME": "node"})


# -- task log -----------------------------------------------------------------------------


def test_hook_output_becomes_info_lines_with_their_phase(hook: Hook) -> None:
    result = run_job(hook.path, [GuestSpec(101, QEMU, SNAPSHOT)])

    hook_lines = [(line.phase, line.stream, line.text) for line in result.log if line.phase]
    assert ("pre-stop", "stdout", "INFO: out pre-stop") in hook_lines
    assert ("pre-stop", "stderr", "INFO: err pre-stop") in hook_lines
    assert ("job-start", "stdout", "INFO: out job-start") in hook_lines
    assert "INFO: " not in [text for *_, text in hook_lines]  # empty lines are dropped
    record = result.guest(101).records[1]
    assert record.phase == "pre-stop"
    assert sorted(record.lines) == ["", "err pre-stop", "out pre-stop"]  # streams interleave
    assert record.argv == (str(hook.path), "pre-stop", "snapshot", "101")
    assert record.returncode == 0 and record.duration >= 0


# -- exit codes ---------------------------------------------------------------------------


def test_backup_start_failure_runs_only_abort_and_log_end(hook: Hook) -> None:
    hook.exit("backup-start", 1)
    result = run_job(hook.path, [GuestSpec(101, LXC, STOP)])

    assert guest_phases(hook) == ["backup-start", "backup-abort", "log-end"]
    guest = result.guest(101)
    assert guest.status is BackupStatus.FAILED
    assert "backup-start stop 101' failed: exit code 1" in (guest.error or "")
    assert guest.point_in_time is None
    # a failed guest does not abort the job: job-end runs, no job-abort
    assert job_phases(result) == ["job-init", "job-start", "job-end"]
    assert result.status is JobStatus.ERRORS


def test_pre_restart_failure_fails_lxc_snapshot(hook: Hook) -> None:
    hook.exit("pre-restart", 2)
    result = run_job(hook.path, [GuestSpec(101, LXC, SNAPSHOT)])

    assert guest_phases(hook) == [
        "backup-start",
        "pre-stop",
        "pre-restart",
        "backup-abort",
        "log-end",
    ]
    assert result.guest(101).status is BackupStatus.FAILED


def test_pre_restart_failure_multi_volume_lxc_snapshot_runs_it_again_in_cleanup(hook: Hook) -> None:
    hook.exit("pre-restart", 2)
    result = run_job(hook.path, [GuestSpec(101, LXC, SNAPSHOT, volumes=2)])

    # main-path pre-restart fails; the clean-up runs pre-restart again, which fails too: a warning,
    # and vzdump skips its resume and post-restart. The CT runs anyway: snapshot_create thawed it
    # after the volume snapshots (pve-guest-common), so vzdump's skipped thaw changes nothing
    assert guest_phases(hook) == [
        "backup-start",
        "pre-stop",
        "pre-restart",
        "pre-restart",
        "backup-abort",
        "log-end",
    ]
    guest = result.guest(101)
    assert guest.status is BackupStatus.FAILED
    assert guest.guest_state is GuestState.RUNNING
    assert [r.fatal for r in guest.records if r.phase == "pre-restart"] == [True, False]


def test_pre_restart_failure_in_lxc_suspend_leaves_ct_frozen(hook: Hook) -> None:
    hook.exit("pre-restart", 2)
    result = run_job(hook.path, [GuestSpec(101, LXC, SUSPEND)])

    assert guest_phases(hook) == [
        "backup-start",
        "pre-stop",
        "pre-restart",
        "backup-abort",
        "log-end",
    ]
    assert result.guest(101).guest_state is GuestState.SUSPENDED


@pytest.mark.parametrize("vmtype", [LXC, QEMU])
def test_pre_restart_failure_in_stop_mode_only_warns(hook: Hook, vmtype: GuestType) -> None:
    hook.exit("pre-restart", 2)
    started: list[Context] = []
    result = run_job(hook.path, [GuestSpec(101, vmtype, STOP)], on_guest_start=started.append)

    # one eval in vzdump's clean-up: the failure skips the start and post-restart
    assert guest_phases(hook) == [
        "backup-start",
        "pre-stop",
        "backup-end",
        "pre-restart",
        "log-end",
    ]
    guest = result.guest(101)
    assert guest.status is BackupStatus.OK
    assert result.status is JobStatus.OK
    assert any("pre-restart stop 101' failed: exit code 2" in w for w in guest.warnings)
    assert result.warnings == [f"WARN: {w}" for w in guest.warnings]
    if vmtype is LXC:  # the CT is left down
        assert guest.guest_state is GuestState.STOPPED and started == []
    else:  # the VM was already booted when the backup job started
        assert guest.guest_state is GuestState.RUNNING and len(started) == 1


def test_pre_restart_failure_fails_qemu_snapshot(hook: Hook) -> None:
    hook.exit("pre-restart", 1)
    result = run_job(hook.path, [GuestSpec(101, QEMU, SNAPSHOT)])

    assert guest_phases(hook) == [
        "backup-start",
        "pre-stop",
        "pre-restart",
        "backup-abort",
        "log-end",
    ]
    assert result.guest(101).point_in_time is None


@pytest.mark.parametrize(("vmtype", "mode"), list(ORDER))
def test_pre_stop_failure(hook: Hook, vmtype: GuestType, mode: Mode) -> None:
    hook.exit("pre-stop", 1)
    result = run_job(hook.path, [GuestSpec(101, vmtype, mode)])

    # nothing was suspended or stopped yet: no restart phases
    assert guest_phases(hook) == ["backup-start", "pre-stop", "backup-abort", "log-end"]
    assert result.guest(101).guest_state is GuestState.RUNNING


def test_backup_end_failure_fails_backup_but_stop_mode_still_restarts(hook: Hook) -> None:
    hook.exit("backup-end", 1)
    result = run_job(hook.path, [GuestSpec(101, LXC, STOP)])

    assert guest_phases(hook) == [
        "backup-start",
        "pre-stop",
        "backup-end",
        "pre-restart",
        "post-restart",
        "backup-abort",
        "log-end",
    ]
    assert result.guest(101).status is BackupStatus.FAILED
    assert result.guest(101).guest_state is GuestState.RUNNING


@pytest.mark.parametrize("phase", ["log-end", "pre-restart", "post-restart"])
def test_cleanup_positions_only_warn(hook: Hook, phase: str) -> None:
    hook.exit(phase, 3)
    result = run_job(hook.path, [GuestSpec(101, QEMU, SUSPEND)])

    assert result.guest(101).warnings
    assert result.guest(101).status is BackupStatus.OK
    assert result.status is JobStatus.OK


def test_backup_abort_failure_only_warns(hook: Hook) -> None:
    hook.exit("backup-start", 1)
    hook.exit("backup-abort", 3)
    result = run_job(hook.path, [GuestSpec(101, QEMU, SUSPEND)])

    assert guest_phases(hook) == ["backup-start", "backup-abort", "log-end"]
    assert result.guest(101).warnings
    assert result.status is JobStatus.ERRORS
    assert "job-abort" not in result.phases()


def test_job_start_failure_aborts_job_without_guests(hook: Hook) -> None:
    hook.exit("job-start", 1)
    result = run_job(hook.path, [GuestSpec(101, LXC, SNAPSHOT)])

    assert result.phases() == ["job-init", "job-start", "job-abort"]
    assert result.status is JobStatus.FAILED
    assert result.guest(101).status is BackupStatus.NOT_RUN
    assert "ERROR: Backup job failed - command" in result.task_log()


def test_job_end_failure_fails_job_and_runs_job_abort(hook: Hook) -> None:
    hook.exit("job-end", 1)
    result = run_job(hook.path, [GuestSpec(101, LXC, SNAPSHOT)])

    assert result.phases() == [
        "job-init",
        "job-start",
        *ORDER[LXC, SNAPSHOT],
        "job-end",
        "job-abort",
    ]
    assert result.status is JobStatus.FAILED
    assert result.guest(101).status is BackupStatus.OK


def test_job_init_failure_stops_before_the_job(hook: Hook) -> None:
    hook.exit("job-init", 1)
    result = run_job(hook.path, [GuestSpec(101, LXC, SNAPSHOT)])

    assert result.phases() == ["job-init"]
    assert result.status is JobStatus.FAILED


def test_hook_not_executable_fails_job(tmp_path: Path) -> None:
    script = tmp_path / "hook"
    script.write_text("#!/bin/sh\nexit 0\n")
    result = run_job(script, [GuestSpec(101, LXC, SNAPSHOT)])
    assert result.status is JobStatus.FAILED
    assert result.records == ()


# -- failure injection --------------------------------------------------------------------

FAILS = [
    (LXC, SNAPSHOT, 1, FailPoint.PREPARE, ["backup-abort", "log-end"]),
    (
        LXC,
        SNAPSHOT,
        1,
        FailPoint.BEFORE_POINT_IN_TIME,
        ["backup-start", "pre-stop", "backup-abort", "log-end"],
    ),
    (
        LXC,
        SNAPSHOT,
        1,
        FailPoint.AFTER_POINT_IN_TIME,
        ["backup-start", "pre-stop", "backup-abort", "log-end"],
    ),
    (
        LXC,
        SNAPSHOT,
        2,
        FailPoint.GUEST_STOP,
        ["backup-start", "pre-stop", "backup-abort", "log-end"],
    ),
    (
        LXC,
        SNAPSHOT,
        2,
        FailPoint.BEFORE_POINT_IN_TIME,
        ["backup-start", "pre-stop", "pre-restart", "post-restart", "backup-abort", "log-end"],
    ),
    (
        LXC,
        SNAPSHOT,
        1,
        FailPoint.TRANSFER,
        ["backup-start", "pre-stop", "pre-restart", "post-restart", "backup-abort", "log-end"],
    ),
    (
        LXC,
        SUSPEND,
        1,
        FailPoint.GUEST_STOP,
        ["backup-start", "pre-stop", "backup-abort", "log-end"],
    ),
    (
        LXC,
        SUSPEND,
        1,
        FailPoint.BEFORE_POINT_IN_TIME,
        ["backup-start", "pre-stop", "pre-restart", "post-restart", "backup-abort", "log-end"],
    ),
    (LXC, STOP, 1, FailPoint.GUEST_STOP, ["backup-start", "pre-stop", "backup-abort", "log-end"]),
    (
        LXC,
        STOP,
        1,
        FailPoint.TRANSFER,
        ["backup-start", "pre-stop", "pre-restart", "post-restart", "backup-abort", "log-end"],
    ),
    (
        QEMU,
        SNAPSHOT,
        1,
        FailPoint.BEFORE_POINT_IN_TIME,
        ["backup-start", "pre-stop", "pre-restart", "post-restart", "backup-abort", "log-end"],
    ),
    (
        QEMU,
        SNAPSHOT,
        1,
        FailPoint.TRANSFER,
        ["backup-start", "pre-stop", "pre-restart", "post-restart", "backup-abort", "log-end"],
    ),
    (
        QEMU,
        SUSPEND,
        1,
        FailPoint.GUEST_STOP,
        ["backup-start", "pre-stop", "backup-abort", "log-end"],
    ),
    (
        QEMU,
        SUSPEND,
        1,
        FailPoint.BEFORE_POINT_IN_TIME,
        ["backup-start", "pre-stop", "pre-restart", "post-restart", "backup-abort", "log-end"],
    ),
    (
        QEMU,
        STOP,
        1,
        FailPoint.AFTER_POINT_IN_TIME,
        ["backup-start", "pre-stop", "pre-restart", "post-restart", "backup-abort", "log-end"],
    ),
]


@pytest.mark.parametrize(("vmtype", "mode", "volumes", "point", "phases"), FAILS)
def test_fail_at(
    hook: Hook, vmtype: GuestType, mode: Mode, volumes: int, point: FailPoint, phases: list[str]
) -> None:
    result = run_job(hook.path, [GuestSpec(101, vmtype, mode, volumes=volumes, fail_at=point)])

    assert guest_phases(hook) == phases
    guest = result.guest(101)
    assert guest.status is BackupStatus.FAILED
    assert guest.error and "simulated failure" in guest.error
    assert guest.guest_state is GuestState.RUNNING
    assert result.status is JobStatus.ERRORS


def test_prepare_failure_hooks_see_requested_mode_and_no_hostname(hook: Hook) -> None:
    run_job(
        hook.path,
        [GuestSpec(101, LXC, SNAPSHOT, running=False, hostname="x", fail_at=FailPoint.PREPARE)],
    )
    calls = [c for c in hook.calls() if len(c.argv) == 3]
    assert [c.argv for c in calls] == [
        ("backup-abort", "snapshot", "101"),
        ("log-end", "snapshot", "101"),
    ]
    assert all("HOSTNAME" not in c.env and c.env["VMTYPE"] == "lxc" for c in calls)


def test_fail_at_guest_stop_needs_vzdump_to_stop_the_guest() -> None:
    with pytest.raises(ValueError):
        GuestSpec(101, QEMU, SNAPSHOT, fail_at=FailPoint.GUEST_STOP)
    with pytest.raises(ValueError):
        GuestSpec(101, QEMU, SNAPSHOT, snapshot_supported=False)


# -- callbacks ----------------------------------------------------------------------------

EVENTS = {
    (LXC, SNAPSHOT): [
        "backup-start",
        "pre-stop",
        "SUSPEND",  # snapshot_create's freeze around the volume snapshots
        "PIT",
        "RESUME",
        "pre-restart",
        "post-restart",
        "TRANSFER",
        "backup-end",
        "log-end",
    ],
    (LXC, SUSPEND): [
        "backup-start",
        "pre-stop",
        "SUSPEND",
        "PIT",
        "pre-restart",
        "RESUME",
        "post-restart",
        "TRANSFER",
        "backup-end",
        "log-end",
    ],
    (LXC, STOP): [
        "backup-start",
        "pre-stop",
        "SHUTDOWN",
        "PIT",
        "TRANSFER",
        "backup-end",
        "pre-restart",
        "START",
        "post-restart",
        "log-end",
    ],
    (QEMU, SNAPSHOT): [
        "backup-start",
        "pre-stop",
        "pre-restart",
        "post-restart",
        "PIT",
        "TRANSFER",
        "backup-end",
        "log-end",
    ],
    (QEMU, SUSPEND): [
        "backup-start",
        "pre-stop",
        "SUSPEND",
        "PIT",
        "RESUME",
        "TRANSFER",
        "backup-end",
        "pre-restart",
        "post-restart",
        "log-end",
    ],
    (QEMU, STOP): [
        "backup-start",
        "pre-stop",
        "SHUTDOWN",
        "PIT",
        "START",
        "TRANSFER",
        "backup-end",
        "pre-restart",
        "post-restart",
        "log-end",
    ],
}


class Recorder:
    """Collects callback events as strings; phases appear once, checked before/after pairing."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.contexts: list[Context] = []

    def on_phase(self, phase: str, ctx: Context) -> None:
        self.contexts.append(ctx)
        if ctx.moment is Moment.BEFORE_PHASE:
            self.events.append(f"<{phase}")
        else:
            assert ctx.record is not None and ctx.record.phase == phase
            self.events.append(f"{phase}>")

    def callback(self, name: str) -> Callable[[Context], None]:
        def record(ctx: Context) -> None:
            self.contexts.append(ctx)
            self.events.append(name)

        return record

    def run(self, hook: Hook, spec: GuestSpec) -> JobResult:
        return run_job(
            hook.path,
            [spec],
            on_phase=self.on_phase,
            on_point_in_time=self.callback("PIT"),
            transfer=self.callback("TRANSFER"),
            on_guest_shutdown=self.callback("SHUTDOWN"),
            on_guest_start=self.callback("START"),
            on_guest_suspend=self.callback("SUSPEND"),
            on_guest_resume=self.callback("RESUME"),
        )


@pytest.mark.parametrize(("vmtype", "mode"), list(EVENTS))
def test_callbacks_fire_between_the_right_hooks(hook: Hook, vmtype: GuestType, mode: Mode) -> None:
    rec = Recorder()
    result = rec.run(hook, GuestSpec(101, vmtype, mode))

    expected = []
    for event in ["job-init", "job-start", *EVENTS[vmtype, mode], "job-end"]:
        expected += [event] if event.isupper() else [f"<{event}", f"{event}>"]
    assert rec.events == expected
    pit = result.point_in_time[101]
    pit_ctx = next(c for c in rec.contexts if c.moment is Moment.POINT_IN_TIME)
    assert pit is not None and pit <= pit_ctx.time
    assert pit_ctx.guest is not None and pit_ctx.guest.vmid == 101 and pit_ctx.mode is mode


def test_callback_context_tracks_guest_state(hook: Hook) -> None:
    rec = Recorder()
    rec.run(hook, GuestSpec(101, QEMU, STOP))
    state = {(c.moment, c.phase): c.guest_state for c in rec.contexts if c.guest}
    assert state[Moment.BEFORE_PHASE, "pre-stop"] is GuestState.RUNNING
    assert state[Moment.POINT_IN_TIME, None] is GuestState.STOPPED  # started paused, not booted
    assert state[Moment.TRANSFER, None] is GuestState.RUNNING
    job_ctx = next(c for c in rec.contexts if c.phase == "job-start")
    assert job_ctx.guest is None and job_ctx.mode is None


def test_qemu_stop_failure_before_job_start_boots_vm_before_cleanup(hook: Hook) -> None:
    rec = Recorder()
    rec.run(hook, GuestSpec(101, QEMU, STOP, fail_at=FailPoint.BEFORE_POINT_IN_TIME))
    assert [e for e in rec.events if not e.endswith(">")] == [
        "<job-init",
        "<job-start",
        "<backup-start",
        "<pre-stop",
        "SHUTDOWN",
        "START",
        "<pre-restart",
        "<post-restart",
        "<backup-abort",
        "<log-end",
        "<job-end",
    ]


def test_lxc_stop_failure_after_shutdown_starts_ct_in_cleanup(hook: Hook) -> None:
    rec = Recorder()
    rec.run(hook, GuestSpec(101, LXC, STOP, fail_at=FailPoint.BEFORE_POINT_IN_TIME))
    assert [e for e in rec.events if e.isupper() or e.startswith("<")][2:] == [
        "<backup-start",
        "<pre-stop",
        "SHUTDOWN",
        "<pre-restart",
        "START",
        "<post-restart",
        "<backup-abort",
        "<log-end",
        "<job-end",
    ]


@pytest.mark.parametrize(("spec", "events"), [
    # vzdump freezes a multi-volume CT after pre-stop; snapshot_create's thaw ends that freeze
    (GuestSpec(101, LXC, SNAPSHOT, volumes=2),
     ["<pre-stop", "SUSPEND", "PIT", "RESUME", "<pre-restart", "<post-restart"]),
    # snapshot_create thaws the CT also when the volume snapshots fail
    (GuestSpec(101, LXC, SNAPSHOT, fail_at=FailPoint.BEFORE_POINT_IN_TIME),
     ["<pre-stop", "SUSPEND", "RESUME", "<backup-abort"]),
    # the failure before the copy was complete: vzdump's clean-up thaws between its two restart phases
    (GuestSpec(101, LXC, SUSPEND, fail_at=FailPoint.BEFORE_POINT_IN_TIME),
     ["<pre-stop", "SUSPEND", "<pre-restart", "RESUME", "<post-restart", "<backup-abort"]),
    (GuestSpec(101, QEMU, SUSPEND, fail_at=FailPoint.BEFORE_POINT_IN_TIME),
     ["<pre-stop", "SUSPEND", "RESUME", "<pre-restart", "<post-restart", "<backup-abort"]),
])
def test_suspend_and_resume_on_other_paths(hook: Hook, spec: GuestSpec, events: list[str]) -> None:
    rec = Recorder()
    rec.run(hook, spec)
    got = [e for e in rec.events if e.isupper() or e.startswith("<")]
    assert got[got.index("<pre-stop"):got.index(events[-1]) + 1] == events
    states = [(c.moment, c.guest_state) for c in rec.contexts
              if c.moment in (Moment.GUEST_SUSPEND, Moment.GUEST_RESUME)]
    assert states == [(Moment.GUEST_SUSPEND, GuestState.SUSPENDED), (Moment.GUEST_RESUME, GuestState.RUNNING)]


def test_lxc_suspend_with_a_failing_pre_restart_is_never_resumed(hook: Hook) -> None:
    hook.exit("pre-restart", 2)
    rec = Recorder()
    rec.run(hook, GuestSpec(101, LXC, SUSPEND))
    assert "SUSPEND" in rec.events and "RESUME" not in rec.events  # vzdump leaves it frozen


def test_transfer_default_sleeps_and_callbacks_can_fail_vzdump(hook: Hook) -> None:
    from tests.infra.vzdump import VzdumpError

    result = run_job(hook.path, [GuestSpec(101, LXC, SNAPSHOT)], transfer_seconds=0.3)
    records = {r.phase: r for r in result.records}
    assert records["backup-end"].start - records["post-restart"].end >= 0.3

    def broken(ctx: Context) -> None:
        raise VzdumpError("archive write failed")

    result = run_job(hook.path, [GuestSpec(102, QEMU, SNAPSHOT)], transfer=broken)
    assert result.guest(102).error == "archive write failed"
    assert result.phases(102)[-2:] == ["backup-abort", "log-end"]


# -- hangs --------------------------------------------------------------------------------


def test_hang_is_reported_and_the_hook_killed(hook: Hook) -> None:
    hook.touch("sleep", "pre-stop", "30")
    with pytest.raises(HookHang) as info:
        run_job(hook.path, [GuestSpec(101, LXC, SNAPSHOT)], timeout=0.5)

    assert info.value.record.phase == "pre-stop"
    assert info.value.record.hung and info.value.record.duration < 5
    result = info.value.result
    assert result is not None and result.status is JobStatus.HUNG
    assert result.phases() == ["job-init", "job-start", "backup-start", "pre-stop"]
    assert result.guest(101).status is BackupStatus.FAILED


def test_child_holding_stdout_keeps_the_phase_running(hook: Hook) -> None:
    # vzdump reads the hook's output until EOF: a background child that inherits stdout
    # keeps the phase (and the whole backup job) waiting
    hook.touch("bg", "post-restart")
    result = run_job(hook.path, [GuestSpec(101, LXC, SNAPSHOT)], timeout=1.0, raise_on_hang=False)
    assert result.status is JobStatus.HUNG
    assert result.hang is not None and result.hang.phase == "post-restart"


# -- single phases and CLI ----------------------------------------------------------------


def test_run_phase_unknown_phase(hook: Hook) -> None:
    record = run_phase(
        hook.path, "backup-frobnicate", GuestSpec(101, LXC, SNAPSHOT, snapshot_supported=False)
    )
    assert record.argv[1:] == ("backup-frobnicate", "suspend", "101")
    assert record.env["HOSTNAME"] == "CT101"
    hook.exit("job-foo", 7)
    assert run_phase(hook.path, "job-foo").returncode == 7


def test_cli_prints_task_log(hook: Hook) -> None:
    hook.exit("backup-end", 1)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.infra.vzdump",
            str(hook.path),
            "101",
            "--type",
            "lxc",
            "--mode",
            "stop",
            "--env",
            "FOO=bar",
        ],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert "INFO: out backup-start" in lines
    assert "INFO: backup mode: stop" in lines
    assert any(line.startswith("ERROR: Backup of VM 101 failed - command") for line in lines)
    assert lines[-1] == "INFO: Backup job finished with errors"
    assert hook.calls()[0].env == {**RUNNER, "STOREID": "local", "FOO": "bar"}
