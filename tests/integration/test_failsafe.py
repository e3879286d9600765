"""Never block a backup: broken states of the config, the install and chained scripts, each played
through the vzdump stand-in (tests/infra/vzdump.py) with the hook started by its sh launcher
(examples/node/vzdump-hook, under dash: Debian's /bin/sh) exactly as vzdump starts it. In every case
each guest's archive is made, no stack is left down, and the job's result and task log say what is
wrong."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.infra import compose
from tests.infra.vzdump import BackupStatus, Context, GuestSpec, GuestType, JobResult, JobStatus, Mode, Moment, run_job
from tests.integration.hookenv import HookSetup, running

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "examples" / "node" / "vzdump-hook"
VMID, OTHER = 101, 102  # 101 is handled (a compose stack), 102 is not in the config
GUESTS = [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT, hostname="app"),
          GuestSpec(OTHER, GuestType.QEMU, Mode.SNAPSHOT, hostname="plain")]


def launcher(tmp: Path, python: str) -> str:
    """The launcher as scripts/install.sh installs it, with PYTHON set to `python`."""
    text = LAUNCHER.read_text()
    assert "\nPYTHON=/opt/vzdump-hook/bin/python\n" in text
    path = tmp / "vzdump-hook"
    path.write_text(text.replace("\nPYTHON=/opt/vzdump-hook/bin/python\n", f"\nPYTHON={python}\n"))
    path.chmod(0o755)
    return str(path)


def script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def stack(tmp_path: Path, test_guest: Any, compose_project: Any) -> tuple[HookSetup, compose.ComposeProject]:
    db = compose_project("db", {"app": "sleeper"})
    compose.up(db)
    setup = HookSetup(tmp_path)
    setup.write({VMID: (test_guest, {"stacks": [db.name], "stop_timeout": 5})})
    return setup, db


def job(hook: str, setup: HookSetup, **kwargs: Any) -> JobResult:
    return run_job(hook, GUESTS, extra_env=setup.env, timeout=120, **kwargs)


def assert_backed_up_and_running(result: JobResult, db: compose.ComposeProject) -> None:
    log = result.task_log()
    for g in result.guests:
        assert g.status is BackupStatus.OK, (g.spec.vmid, g.error, log)
    assert running([db]) == {db.name: True}, log


# -- the config -----------------------------------------------------------------------------------


@pytest.mark.parametrize("breakage", ["invalid", "missing", "dangling-symlink"])
def test_unusable_config_backs_up_every_guest_unquiesced_and_fails_the_job(breakage: str, stack: Any,
                                                                           tmp_path: Path) -> None:
    setup, db = stack
    if breakage == "invalid":
        setup.config.write_text(setup.config.read_text() + "max_downtime = 1\n")
        problem = f"guests.{VMID}.max_downtime: must be 10-604800 (got 1)"
    elif breakage == "missing":
        setup.config.unlink()
        problem = "no such file"
    else:  # the cluster's shared config is gone (or this node never got the symlink's target)
        setup.config.rename(tmp_path / "elsewhere.toml")
        setup.config.symlink_to(tmp_path / "shared" / "vzdump-hook.toml")
        problem = "no such file"
    result = job(launcher(tmp_path, sys.executable), setup)
    log = result.task_log()
    assert_backed_up_and_running(result, db)
    assert result.status is JobStatus.FAILED, log  # job-end exits 1: the notification says so
    start = next(r for r in result.records if r.phase == "job-start")
    assert start.returncode == 0, log  # the job is not aborted
    assert any("vzdump-hook: ERROR: config " in line and problem in line for line in log.splitlines()), log
    for vmid in (VMID, OTHER):
        assert f"backup-start {vmid}: the config is unusable" in log, log
    assert "job-end: the config was unusable, guests were backed up WITHOUT quiescing" in log
    assert not setup.marker_path(VMID).exists()


def test_config_broken_after_the_stop_still_starts_the_stacks(stack: Any, tmp_path: Path) -> None:
    setup, db = stack
    seen: dict[str, bool] = {}

    def on_phase(phase: str, ctx: Context) -> None:
        if (ctx.moment is Moment.AFTER_PHASE and phase == "pre-stop" and ctx.record is not None
                and ctx.record.vmid == VMID):
            seen["down"] = not running([db])[db.name]
            setup.config.write_text("[guests.101\n")

    result = job(launcher(tmp_path, sys.executable), setup, on_phase=on_phase)
    log = result.task_log()
    assert seen == {"down": True}, log  # it was really stopped
    assert_backed_up_and_running(result, db)
    assert f"pre-restart {VMID}: started {db.name}" in log  # lxc snapshot: the CT is thawed there
    assert result.status is JobStatus.FAILED  # broken at job-end: the next job would run unquiesced


# -- the install --------------------------------------------------------------------------------


def broken_pythons(tmp: Path) -> dict[str, str]:
    venv_py = sys.executable
    return {
        "interpreter-gone": str(tmp / "gone" / "bin" / "python"),  # the venv's python after a PVE upgrade
        "module-missing": script(tmp / "py-nosite", f'exec "{venv_py}" -S "$@"\n'),  # no site-packages: no vzdump_hook
        "syntax-error": script(tmp / "py-syntax", f'exec "{venv_py}" -c "def broken(:" "$@"\n'),
    }


@pytest.mark.parametrize("breakage", ["interpreter-gone", "module-missing", "syntax-error"])
def test_a_hook_that_cannot_start_fails_no_backup(breakage: str, stack: Any, tmp_path: Path) -> None:
    setup, db = stack
    result = job(launcher(tmp_path, broken_pythons(tmp_path)[breakage]), setup)
    log = result.task_log()
    assert_backed_up_and_running(result, db)
    assert result.status is JobStatus.FAILED, log  # job-end: 1
    for r in result.records:
        assert r.returncode == (1 if r.phase == "job-end" else 0), (r.phase, log)
    lines = [line for line in log.splitlines()
             if "vzdump-hook: ERROR: " in line and "the hook program could not run" in line]
    assert len(lines) == len(result.records), log  # one loud line per phase
    assert "the backup goes on WITHOUT quiescing" in lines[0]


def test_the_launcher_passes_policy_exits_through(stack: Any, tmp_path: Path, test_guest: Any) -> None:
    """A real policy exit (guest unreachable, on_quiesce_error = abort) still fails that guest's backup."""
    setup, db = stack
    setup.write({VMID: (test_guest, {"stacks": [db.name], "on_quiesce_error": "abort"})})
    test_guest.stop_sshd()
    result = job(launcher(tmp_path, sys.executable), setup)
    start = next(r for r in result.records if r.phase == "backup-start" and r.vmid == VMID)
    assert start.returncode == 1, result.task_log()
    assert result.guest(VMID).status is BackupStatus.FAILED
    assert result.guest(OTHER).status is BackupStatus.OK
    assert "could not run" not in result.task_log()


def test_launcher_under_dash_with_a_broken_interpreter(tmp_path: Path) -> None:
    hook = launcher(tmp_path, str(tmp_path / "nothing" / "python"))
    for argv, code in ((["job-start"], 0), (["pre-stop", "snapshot", "101"], 0), (["job-end"], 1), (["job-abort"], 0)):
        r = subprocess.run(["/bin/dash", hook, *argv], env={}, capture_output=True, text=True, cwd="/")
        assert r.returncode == code, (argv, r)
        assert r.stdout.startswith(f"vzdump-hook: ERROR: {argv[0]}: the hook program could not run"), r.stdout
        assert "status 127" in r.stdout
    # admin commands: as they are
    r = subprocess.run(["/bin/dash", hook, "check"], env={}, capture_output=True, text=True)
    assert r.returncode == 127 and r.stdout == ""


def test_launcher_admin_words_are_the_programs() -> None:
    from vzdump_hook.cli import ADMIN_COMMANDS

    case = next(line for line in LAUNCHER.read_text().splitlines() if "| check |" in line)
    words = {w.strip().rstrip(")") for w in case.split("|")} - {'""', "-*"}
    assert words == set(ADMIN_COMMANDS)


# -- chained scripts ------------------------------------------------------------------------------


def recorder(tmp: Path, fail: str = "", code: int = 3, hang: str = "") -> tuple[str, Path]:
    """A hook script of the admin's own: logs each call (argv, environment), fails with `code` when
    called with the arguments `fail`, hangs (with a child holding stdout) in phase `hang`."""
    log = tmp / "chain.log"
    body = f"""
echo "CALL $* | $(env | sort | tr '\\n' ' ')" >> {log}
echo "chained script says hello in $1"
[ "$1" = "{hang}" ] && {{ sleep 6061 & wait; }}
[ "$*" = "{fail}" ] && exit {code}
exit 0
"""
    return script(tmp / "admin-hook", body), log


def assert_called_as_vzdump_calls_the_hook(log: Path, result: JobResult) -> None:
    """The recorder was called once per hook process, with its arguments and its environment."""
    calls = [line.removeprefix("CALL ").split(" | ") for line in log.read_text().splitlines()]
    assert [c[0] for c in calls] == [" ".join(r.argv[1:]) for r in result.records], result.task_log()
    for (_, env), r in zip(calls, result.records, strict=True):
        got = dict(kv.split("=", 1) for kv in env.split())
        got.pop("PWD", None)  # dash sets it
        assert got == dict(r.env), r.phase


def chain_config(setup: HookSetup, db: compose.ComposeProject, test_guest: Any, scripts: list[str],
                 timeout: float = 30) -> None:
    setup.hook_table = {"chain": scripts, "chain_timeout": timeout}
    setup.write({VMID: (test_guest, {"stacks": [db.name], "stop_timeout": 5})})


def test_chained_script_gets_vzdumps_arguments_and_environment(stack: Any, tmp_path: Path, test_guest: Any) -> None:
    setup, db = stack
    path, log = recorder(tmp_path)
    chain_config(setup, db, test_guest, [path])
    states: dict[str, bool] = {}

    def on_log(line: Any) -> None:  # when the chained script speaks, is the stack up?
        if "chained script says hello in" in line.text:
            states[line.text.rsplit(" ", 1)[1]] = running([db])[db.name]

    result = job(launcher(tmp_path, sys.executable), setup, on_log=on_log)
    out = result.task_log()
    assert result.status is JobStatus.OK, out
    assert_called_as_vzdump_calls_the_hook(log, result)
    assert states["pre-stop"] is True  # before the stop: the app is not kept down while it runs
    assert states["post-restart"] is True  # after the start (lxc snapshot resumes at post-restart)
    assert_backed_up_and_running(result, db)


def test_chained_script_failing_at_pre_stop_fails_that_backup_before_anything_stops(stack: Any, tmp_path: Path,
                                                                                    test_guest: Any) -> None:
    setup, db = stack
    path, _ = recorder(tmp_path, fail=f"pre-stop snapshot {VMID}")
    chain_config(setup, db, test_guest, [path])
    ups: list[bool] = []
    result = job(launcher(tmp_path, sys.executable), setup,
                 on_point_in_time=lambda ctx: ups.append(running([db])[db.name]))
    out = result.task_log()
    assert result.guest(VMID).status is BackupStatus.FAILED, out  # as the script alone would have
    assert result.guest(OTHER).status is BackupStatus.OK
    assert result.status is JobStatus.ERRORS
    assert f"chain: admin-hook pre-stop snapshot {VMID} exited 3" in out
    assert ups == [True], out  # 102's point in time only: 101 never got one, and was never stopped
    assert running([db]) == {db.name: True}


def test_chained_script_failing_at_pre_restart_is_reported_and_not_passed_on(stack: Any, tmp_path: Path,
                                                                             test_guest: Any) -> None:
    """vzdump skips what follows a failing pre-restart (an LXC guest in suspend mode stays frozen):
    the hook says so in an ERROR line and exits 0, so vzdump thaws the guest and goes on."""
    setup, db = stack
    path, _ = recorder(tmp_path, fail=f"pre-restart suspend {VMID}")
    chain_config(setup, db, test_guest, [path])
    result = run_job(launcher(tmp_path, sys.executable), [GuestSpec(VMID, GuestType.LXC, Mode.SUSPEND)],
                     extra_env=setup.env, timeout=120)
    out = result.task_log()
    pre_restart = next(r for r in result.records if r.phase == "pre-restart")
    assert pre_restart.returncode == 0, out
    # vzdump thawed it
    assert "post-restart" in result.phases(VMID) and result.guest(VMID).status is BackupStatus.OK, out
    assert f"chain: admin-hook pre-restart suspend {VMID} exited 3" in out
    assert f"ERROR: pre-restart {VMID}: a chained script failed (exit 3); not passed on to vzdump" in out, out
    assert running([db]) == {db.name: True}, out


def test_chained_script_failing_at_job_end_fails_the_job(stack: Any, tmp_path: Path, test_guest: Any) -> None:
    setup, db = stack
    path, _ = recorder(tmp_path, fail="job-end", code=4)
    chain_config(setup, db, test_guest, [path])
    result = job(launcher(tmp_path, sys.executable), setup)
    out = result.task_log()
    assert_backed_up_and_running(result, db)
    assert result.status is JobStatus.FAILED, out
    assert "chain: admin-hook job-end exited 4" in out


def test_chained_script_hanging_is_killed_with_its_children(stack: Any, tmp_path: Path, test_guest: Any) -> None:
    setup, db = stack
    path, _ = recorder(tmp_path, hang="log-end")
    chain_config(setup, db, test_guest, [path], timeout=2)
    result = job(launcher(tmp_path, sys.executable), setup)  # the stand-in's timeout (120 s) would catch a hang
    out = result.task_log()
    assert_backed_up_and_running(result, db)
    assert "still running after chain_timeout (2 s): killed, counts as failed" in out
    ends = [r for r in result.records if r.phase == "log-end"]
    assert [r.returncode for r in ends] == [1, 1]  # log-end: a warning in vzdump
    assert all(r.end - r.start < 30 for r in ends)
    assert result.status is JobStatus.OK, out  # log-end never fails a backup
    assert not any(p.startswith("sleep 6061") for p in _processes())


def _processes() -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out.append(f.read().replace(b"\0", b" ").decode())
        except (OSError, ValueError):
            continue
    return out


@pytest.mark.parametrize("breakage", ["interpreter-gone", "syntax-error"])
def test_a_broken_install_still_runs_the_admins_chained_scripts(breakage: str, stack: Any, tmp_path: Path,
                                                                test_guest: Any) -> None:
    """The program ran before (its job-start kept the chain in the state dir), then the install broke:
    the launcher runs the chained scripts itself, with vzdump's arguments and environment, in every
    phase; one failing at pre-stop fails that guest's backup as it would on its own, and at pre-restart
    it is not passed on."""
    setup, db = stack
    path, log = recorder(tmp_path, fail=f"pre-stop snapshot {OTHER}")
    chain_config(setup, db, test_guest, [path])
    first = job(launcher(tmp_path, sys.executable), setup)  # a good night: the chain is kept
    assert first.guest(OTHER).status is BackupStatus.FAILED, first.task_log()  # the script alone fails it
    log.unlink()
    result = job(launcher(tmp_path, broken_pythons(tmp_path)[breakage]), setup)
    out = result.task_log()
    assert_called_as_vzdump_calls_the_hook(log, result)
    assert result.guest(OTHER).status is BackupStatus.FAILED, out  # as the script alone would have
    assert result.guest(VMID).status is BackupStatus.OK, out
    assert f"vzdump-hook: chain: {path} pre-stop snapshot {OTHER} exited 3" in out, out
    assert running([db]) == {db.name: True}, out  # the program never ran: nothing was stopped


def test_the_launcher_does_not_pass_on_a_chained_failure_at_pre_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    hook = launcher(tmp_path, str(tmp_path / "nothing" / "python"))
    failing = script(tmp_path / "fails", "exit 5\n")
    (state / "chain.list").write_text(f"30\n{failing}\n")
    env = {"VZDUMP_HOOK_STATE_DIR": str(state)}
    for argv, code in ((["pre-stop", "snapshot", "101"], 5), (["pre-restart", "suspend", "101"], 0),
                       (["job-end"], 5), (["backup-end", "snapshot", "101"], 5)):
        r = subprocess.run(["/bin/dash", hook, *argv], env=env, capture_output=True, text=True, cwd="/", timeout=60)
        assert r.returncode == code, (argv, r)
        assert f"vzdump-hook: chain: {failing} {' '.join(argv)} exited 5" in r.stdout, r.stdout
