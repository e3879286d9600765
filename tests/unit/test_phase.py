"""phase/ in-process (runner.py and its steps): vzdump's phase order played with run_phase (one call
per phase, as vzdump calls the hook), the guest being a FakeGuest behind a patched open_transport, config
and host state in tmp_path."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest.mock import MagicMock

import pytest
from pytest_mock import MockerFixture

from vzdump_hook import config as configuration
from vzdump_hook.guest import marker as markers
from vzdump_hook.guest.marker import Marker, StackRecord
from vzdump_hook.node.job import JobId, _boot_id, node_name, process_start
from vzdump_hook.node.state import HostState, Status
from vzdump_hook.phase import runner as hookmod
from vzdump_hook.phase.runner import RUN_DIR_ENV, STATE_DIR_ENV, PhaseRunner, run_phase, settings_with_env
from vzdump_hook.vzdump.phases import GuestType, Mode, Phase, backup_order
from vzdump_hook.vzdump.rules import Outcome

from .fakes import FakeGuest, transport_factory

MARKER = "/var/lib/vzdump-hook/marker.json"
LXC, QEMU = GuestType.LXC, GuestType.QEMU
ALL = [(t, m) for t in GuestType for m in Mode]
FIRST_RESUME = {  # docs/how-it-works.md "What happens when"
    (LXC, Mode.SNAPSHOT): "pre-restart",
    (LXC, Mode.SUSPEND): "post-restart",
    (LXC, Mode.STOP): "post-restart",
    (QEMU, Mode.SNAPSHOT): "backup-end",
    (QEMU, Mode.SUSPEND): "backup-end",
    (QEMU, Mode.STOP): "backup-end",
}
ALL_UP = ["db", "monitoring", "web"]
APP_DOWN = ["monitoring"]  # monitoring is not configured: never touched

CONFIG = """
[hook]
resident = {resident}  # false: the phases alone (the resident: tests/unit/test_resident.py, tests/integration/test_resident.py)
pve_dir = "{pve_dir}"
qmp_dir = "{qmp_dir}"
phase_timeout = 30
sweep_timeout = 10

[defaults]
resume_wait = 0
command_timeout = 10
stop_timeout = 5

[guests.101]
ssh = {{ host = "10.0.0.101" }}
stacks = ["web", "db"]
{extra}

[guests.102]
ssh = {{ host = "10.0.0.102" }}
enabled = false
"""  # noqa: E501


class Hook:
    """Calls the hook as vzdump does (argv + VMTYPE), one run_phase per phase, all of one job."""

    def __init__(self, tmp_path: Path, mocker: MockerFixture) -> None:
        self.tmp = tmp_path
        self.cfg_path = tmp_path / "config.toml"
        self.pve_dir = tmp_path / "pve"  # no nodes/ in it: not a PVE node, every guest is local and runs
        self.qmp_dir = tmp_path / "qmp"  # no QMP socket in it: no early resume for QEMU guests
        self.resident = False  # [hook] resident: True where a test spawns (or stands in for) residents
        self.env = {
            configuration.CONFIG_ENV: str(self.cfg_path),
            RUN_DIR_ENV: str(tmp_path / "run"),
            STATE_DIR_ENV: str(tmp_path / "state"),
        }
        self.guests = {101: FakeGuest(), 102: FakeGuest()}
        g = self.guests[101]
        g.add_project("db", 2)
        g.add_project("web", 1)
        g.add_project("monitoring", 1)
        self.open: MagicMock = mocker.patch("vzdump_hook.guest.session.open_transport",
                                            side_effect=transport_factory(self.guests))
        self.watchdog: MagicMock = mocker.patch("vzdump_hook.phase.runner._watchdog")
        self.configure()

    @property
    def g(self) -> FakeGuest:
        return self.guests[101]

    def configure(self, extra: str = "", text: str | None = None) -> None:
        self.cfg_path.write_text(text if text is not None
                                 else CONFIG.format(pve_dir=self.pve_dir, qmp_dir=self.qmp_dir, extra=extra,
                                                    resident=str(self.resident).lower()))

    def __call__(self, phase: str, mode: Mode | str | None = None, vmid: int = 101,
                 vmtype: GuestType | str = LXC) -> int:
        env = dict(self.env)
        args = [phase]
        if mode is not None:
            args += [Mode(mode).value, str(vmid)]
            env["VMTYPE"] = GuestType(vmtype).value
        return run_phase(args, env)

    def runner(self, job: JobId) -> PhaseRunner:
        """A PhaseRunner of another job (a different vzdump worker)."""
        cfg = configuration.load(str(self.cfg_path))
        return PhaseRunner(cfg, settings_with_env(cfg.hook, self.env), job)

    def state(self) -> HostState:
        return HostState(settings_with_env(configuration.HookSettings(), self.env), JobId.current())


@pytest.fixture
def hook(tmp_path: Path, mocker: MockerFixture, caplog: pytest.LogCaptureFixture) -> Hook:
    caplog.set_level(logging.INFO, logger="vzdump_hook")
    return Hook(tmp_path, mocker)


class _CurrentStdout:
    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


@pytest.fixture
def task_log(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """The hook's own logging setup (stdout, `vzdump-hook: ` prefix), restored afterwards."""
    root = logging.getLogger("vzdump_hook")
    saved = (root.handlers[:], root.level, root.propagate)
    hookmod.setup_logging()
    # setup_logging binds sys.stdout as it is now (pytest swaps it between setup and call): follow it
    (handler,) = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(_CurrentStdout())
    yield capsys
    root.handlers[:], root.level, root.propagate = saved


def lines_about(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [m for m in caplog.messages if text in m]


def stale_marker(g: FakeGuest, job: JobId, deadline: float | None = None,
                 names: tuple[str, ...] = ("web", "db")) -> Marker:
    """Stop `names` in the guest as an earlier job would have, and leave its marker."""
    recs = []
    for n in names:
        p = g.projects[n]
        recs.append(StackRecord(n, ("docker", "compose"), p.workdir, p.files, tuple(p.containers), True))
        for c in p.containers.values():
            c.running = False
    now = time.time()
    m = Marker(job, 101, "qemu", "snapshot", now - 3600, deadline if deadline is not None else now + 3600, "stopped",
               tuple(recs))
    g.files[MARKER] = m.to_json()
    return m


def running_job() -> JobId:
    """A job whose worker still runs (this very test process), on this node."""
    pid = os.getpid()
    return JobId(node_name(), _boot_id(), pid, process_start(pid) or 0)


def dead_job() -> JobId:
    """A job of this node from before a reboot: provably over."""
    return JobId(node_name(), "boot-before-the-last-reboot", 4242, 1)


# -- the success path, every type and mode --------------------------------------------------------


@pytest.mark.parametrize(("vmtype", "mode"), ALL)
def test_success_path_stops_before_and_starts_after_the_point_in_time(hook: Hook, vmtype: GuestType, mode: Mode,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    g = hook.g
    assert hook("job-init") == 0
    assert hook("job-start") == 0
    assert g.running_stacks() == ALL_UP
    down = False
    seen = []
    for step in backup_order(vmtype, mode):
        if step == "[point in time]":
            assert g.running_stacks() == APP_DOWN, "the backup would capture a running app"
            # inside the backup: a restore knows
            assert [s.name for s in markers.parse(g.files[MARKER]).stacks] == ["web", "db"]
            if mode is Mode.STOP:
                g.unreachable = True  # vzdump shut the guest down
            continue
        if step == "[data transfer]":
            if vmtype is QEMU and mode is Mode.STOP:
                g.unreachable = False  # the VM boots while QEMU's backup job transfers
            continue
        if vmtype is LXC and mode is Mode.STOP and step == "post-restart":
            g.unreachable = False  # vzdump started the CT between pre-restart and post-restart
        assert hook(step, mode, 101, vmtype) == 0, step
        seen.append(step)
        if step == "pre-stop":
            down = True
        if step == FIRST_RESUME[(vmtype, mode)]:
            down = False
        assert g.running_stacks() == (APP_DOWN if down else ALL_UP), f"after {step}"
    assert hook("job-end") == 0
    assert seen[-1] == "log-end"
    assert g.refused == 0  # never talked to a guest that was off
    assert g.stops() == ["web", "db"] and g.starts() == ["db", "web"]
    assert MARKER not in g.files
    assert hook.state().records()[0].status is Status.RESUMED
    summary = [m for m in caplog.messages if m.startswith("101 ")]
    assert len(summary) == 1 and summary[0].split()[1:] == ["web,db", summary[0].split()[2], "ok"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_log_lines_carry_the_prefix_and_timings(hook: Hook, task_log: pytest.CaptureFixture[str]) -> None:
    for step in ("job-start", "backup-start", "pre-stop", "pre-restart", "post-restart", "backup-end", "log-end",
                 "job-end"):
        mode = None if step.startswith("job") else Mode.SNAPSHOT
        assert hook(step, mode, 101, LXC) == 0
    out = task_log.readouterr().out.splitlines()
    assert out and all(line.startswith("vzdump-hook: ") for line in out), out
    text = "\n".join(out)
    assert "vzdump-hook: backup-start 101: fake 101 answers, will stop web, db (docker compose)" in text
    assert any(line.startswith("vzdump-hook: pre-stop 101: stopped web, db in ") and line.endswith(" s")
               for line in out)
    assert any(line.startswith("vzdump-hook: pre-restart 101: started db, web in ") and ", down " in line
               for line in out)
    assert not any(line.startswith("vzdump-hook: post-restart 101:") for line in out), out  # nothing left to do there
    assert "vzdump-hook: guest  stacks  down s  result" in text


def test_every_phase_arms_the_watchdog(hook: Hook) -> None:
    hook("job-start")
    hook("backup-start", Mode.SNAPSHOT)
    assert [c.args for c in hook.watchdog.call_args_list] == [(30 + hookmod.HARD_GRACE, "job-start"),
                                                              (30 + hookmod.HARD_GRACE, "backup-start")]


@pytest.mark.parametrize("policy", ["continue", "abort"])
@pytest.mark.parametrize("mode", [Mode.SNAPSHOT, Mode.STOP])
def test_the_step_under_way_tells_the_watchdog_what_an_overrun_means(hook: Hook, policy: str, mode: Mode) -> None:
    """The watchdog ends an overrunning phase with the policy table's status for the step's failure:
    a preflight or a quiesce that never ends is a failed one (issue 22: no `exit 1` at pre-stop
    whatever on_quiesce_error says)."""
    hook.configure(f'on_quiesce_error = "{policy}"')
    abort = policy == "abort"
    hook.watchdog.return_value = SimpleNamespace(if_overrun=Outcome(), cancel=lambda: None)
    hook("job-start")
    assert hook.watchdog.return_value.if_overrun == Outcome()  # no step set it: a job phase
    hook("backup-start", mode)
    # stop mode is also how vzdump backs up a guest that is off: an unanswered preflight fails nothing
    assert hook.watchdog.return_value.if_overrun == Outcome(preflight_failed=True,
                                                            abort_policy=abort and mode is not Mode.STOP)
    hook("pre-stop", mode)
    assert hook.watchdog.return_value.if_overrun == Outcome(quiesce_failed=True, abort_policy=abort)


@pytest.mark.parametrize(("phase", "outcome", "status"), [
    ("pre-stop", Outcome(quiesce_failed=True), 0),
    ("pre-stop", Outcome(quiesce_failed=True, abort_policy=True), 1),
    ("backup-start", Outcome(preflight_failed=True), 0),
    ("backup-start", Outcome(preflight_failed=True, abort_policy=True), 1),
    ("backup-end", Outcome(), 0),
    ("job-end", Outcome(), 0),
    ("a-future-phase", Outcome(), 0),
])
def test_an_overrun_phase_ends_with_the_policy_tables_status(mocker: MockerFixture, capsys: pytest.CaptureFixture[str],
                                                             phase: str, outcome: Outcome, status: int) -> None:
    ended: list[int] = []
    fired = threading.Event()

    def exit_process(code: int) -> None:  # the process boundary: os._exit in the program
        ended.append(code)
        fired.set()

    mocker.patch("vzdump_hook.phase.runner.exit_process", side_effect=exit_process)
    dog = hookmod.Watchdog(0.05, phase)
    dog.if_overrun = outcome
    assert fired.wait(10)
    assert ended == [status]
    assert f"vzdump-hook: {phase}: phase deadline of 0 s exceeded, giving up" in capsys.readouterr().out


# -- guests the hook must leave alone -----------------------------------------------------------


@pytest.mark.parametrize("vmid", [999, 102])  # not in the config / enabled = false
def test_unconfigured_guest_gets_one_line_and_no_connection(hook: Hook, vmid: int,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    for step in backup_order(QEMU, Mode.SNAPSHOT):
        if not step.startswith("["):
            assert hook(step, Mode.SNAPSHOT, vmid, QEMU) == 0
    about = lines_about(caplog, str(vmid))
    assert len(about) == 1
    assert about[0] == f"backup-start {vmid}: not in {hook.cfg_path} (or not enabled): left alone"
    assert hook.open.call_count == 0


@pytest.mark.parametrize("vmtype", list(GuestType))
def test_guest_not_running_nothing_is_stopped(hook: Hook, mocker: MockerFixture, vmtype: GuestType,
                                              caplog: pytest.LogCaptureFixture) -> None:
    mocker.patch("vzdump_hook.node.pve.guest_running", return_value=False)
    hook.configure('on_quiesce_error = "abort"')
    hook("job-start")
    hook.open.reset_mock()
    for step in backup_order(vmtype, Mode.STOP, running=False):
        if not step.startswith("["):
            assert hook(step, Mode.STOP, 101, vmtype) == 0
    assert hook("job-end") == 0
    assert hook.open.call_count == 0
    assert hook.g.stops() == [] and hook.g.starts() == []
    assert "backup-start 101: guest not running: nothing to stop" in caplog.messages
    assert any(m.startswith("101 ") and m.endswith("guest not running") for m in caplog.messages)


def test_guest_off_and_unreachable_in_stop_mode_is_no_failure(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    """Not a PVE node here: the hook cannot tell the guest is off, it just does not answer."""
    hook.configure('on_quiesce_error = "abort"')
    hook.g.unreachable = True
    assert hook("backup-start", Mode.STOP, 101, QEMU) == 0
    assert any("if the guest is off, its backup is consistent anyway" in m for m in caplog.messages)
    assert hook("backup-end", Mode.STOP, 101, QEMU) == 0
    assert hook("job-end") == 0


# -- quiesce failures and on_quiesce_error --------------------------------------------------------


def test_abort_with_a_stubborn_stack_fails_pre_stop_and_starts_everything_again(
        hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    hook.configure('on_quiesce_error = "abort"')
    hook.g.projects["db"].stubborn = True
    assert hook("job-start") == 0
    assert hook("backup-start", Mode.SNAPSHOT, 101, QEMU) == 0
    assert hook("pre-stop", Mode.SNAPSHOT, 101, QEMU) == 1
    assert hook.g.running_stacks() == ALL_UP
    assert MARKER not in hook.g.files
    assert any("KILLED" in m and "crash-consistent" in m for m in caplog.messages)
    # vzdump fails this guest: backup-abort, log-end; nothing is started twice
    assert hook("backup-abort", Mode.SNAPSHOT, 101, QEMU) == 0
    assert hook("log-end", Mode.SNAPSHOT, 101, QEMU) == 0
    assert hook("job-end") == 0
    assert hook.g.starts() == ["db", "web"]


def test_continue_with_a_stubborn_stack_warns_crash_consistent(hook: Hook,
                                                               task_log: pytest.CaptureFixture[str]) -> None:
    hook.g.projects["db"].stubborn = True
    assert hook("backup-start", Mode.SNAPSHOT, 101, LXC) == 0
    assert hook("pre-stop", Mode.SNAPSHOT, 101, LXC) == 0
    out = task_log.readouterr().out.splitlines()
    warnings = [line for line in out if line.startswith("vzdump-hook: WARNING: ")]
    assert any("crash-consistent" in line and "pre-stop 101" in line for line in warnings), out
    assert hook.g.running_stacks() == APP_DOWN  # the backup goes on with the stacks down
    assert hook("post-restart", Mode.SNAPSHOT, 101, LXC) == 0
    assert hook.g.running_stacks() == ALL_UP
    assert hook("job-end") == 0
    assert "ok, crash-consistent" in task_log.readouterr().out


@pytest.mark.parametrize(("policy", "code"), [("continue", 0), ("abort", 1)])
def test_unreachable_at_pre_stop(hook: Hook, policy: str, code: int, caplog: pytest.LogCaptureFixture) -> None:
    hook.configure(f'on_quiesce_error = "{policy}"')
    assert hook("backup-start", Mode.SNAPSHOT, 101, QEMU) == 0
    hook.g.unreachable = True
    assert hook("pre-stop", Mode.SNAPSHOT, 101, QEMU) == code
    hook.g.unreachable = False
    assert hook.g.running_stacks() == ALL_UP and hook.g.stops() == []
    assert any(r.levelno == logging.WARNING and "pre-stop 101" in r.getMessage() for r in caplog.records)
    assert hook("backup-end", Mode.SNAPSHOT, 101, QEMU) == 0
    assert hook("job-end") == 0
    assert hook.g.starts() == []


@pytest.mark.parametrize(("policy", "code"), [("continue", 0), ("abort", 1)])
def test_failed_preflight_then_pre_stop_does_nothing(hook: Hook, policy: str, code: int,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    hook.configure(f'on_quiesce_error = "{policy}"')
    hook.g.hang = True
    assert hook("backup-start", Mode.SNAPSHOT, 101, LXC) == code
    hook.g.hang = False
    hook.open.reset_mock()
    assert hook("pre-stop", Mode.SNAPSHOT, 101, LXC) == 0
    assert hook.open.call_count == 0 and hook.g.stops() == []
    assert "pre-stop 101: preflight failed: nothing is stopped, the backup is crash-consistent" in caplog.messages
    assert hook("job-end") == 0
    assert any(m.startswith("101 ") and "not quiesced (guest not ready)" in m for m in caplog.messages)


def test_docker_missing_at_backup_start(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    hook.g.compose = "none"
    assert hook("backup-start", Mode.SNAPSHOT, 101, QEMU) == 0
    assert any("guest not ready" in m and "docker-compose" in m for m in caplog.messages)


# -- exactly once ---------------------------------------------------------------------------------


def test_resume_happens_exactly_once(hook: Hook) -> None:
    for step in ("backup-start", "pre-stop", "pre-restart", "post-restart", "backup-end", "backup-end", "log-end",
                 "backup-abort", "log-end"):
        assert hook(step, Mode.SNAPSHOT, 101, QEMU) == 0
    assert hook("job-end") == 0
    assert hook("job-abort") == 0
    assert hook.g.starts() == ["db", "web"]
    assert hook.g.stops() == ["web", "db"]


def test_concurrent_resumes_start_once(hook: Hook) -> None:
    """Two processes decide to resume at the same time (a watcher and backup-end): the per-guest
    lock and the record re-read under it let only one of them start the stacks."""
    for step in ("backup-start", "pre-stop"):
        hook(step, Mode.SNAPSHOT, 101, QEMU)

    def slow_start(verb: str, detail: str) -> None:
        if verb == "compose-start":
            time.sleep(0.2)

    hook.g.on_call = slow_start
    with ThreadPoolExecutor(max_workers=2) as pool:
        codes = list(pool.map(lambda _: hook("backup-end", Mode.SNAPSHOT, 101, QEMU), range(2)))
    assert codes == [0, 0]
    assert hook.g.starts() == ["db", "web"]
    assert hook.g.running_stacks() == ALL_UP


def test_pre_stop_twice_stops_once(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    hook("backup-start", Mode.SNAPSHOT, 101, QEMU)
    hook("pre-stop", Mode.SNAPSHOT, 101, QEMU)
    assert hook("pre-stop", Mode.SNAPSHOT, 101, QEMU) == 0
    assert hook.g.stops() == ["web", "db"]
    assert "pre-stop 101: already quiesced by this job" in caplog.messages


def test_phases_without_backup_start(hook: Hook) -> None:
    """A hook that missed backup-start (config broken then) still quiesces and resumes."""
    assert hook("pre-stop", Mode.SNAPSHOT, 101, QEMU) == 0
    assert hook.g.running_stacks() == APP_DOWN
    assert hook("backup-end", Mode.SNAPSHOT, 101, QEMU) == 0
    assert hook.g.running_stacks() == ALL_UP


# -- resume failures ------------------------------------------------------------------------------


def test_resume_failure_is_retried_and_fails_job_end(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    assert hook("job-start") == 0
    for step in ("backup-start", "pre-stop", "pre-restart", "post-restart"):
        assert hook(step, Mode.SNAPSHOT, 101, QEMU) == 0
    hook.g.projects["db"].start_fails = True
    assert hook("backup-end", Mode.SNAPSHOT, 101, QEMU) == 0
    assert any("backup-end 101: STILL DOWN: db" in m for m in caplog.messages)
    assert hook("log-end", Mode.SNAPSHOT, 101, QEMU) == 0
    caplog.clear()
    assert hook("job-end") == 1
    row = [m for m in caplog.messages if m.startswith("101 ")]
    assert len(row) == 1 and "STILL DOWN" in row[0]
    assert any("stacks still DOWN in guest(s) 101" in m and "vzdump-hook recover" in m for m in caplog.messages)
    assert hook.g.starts().count("db") == 3  # backup-end, log-end, job-end
    assert hook.g.running_stacks() == ["monitoring", "web"]
    assert [s.name for s in markers.parse(hook.g.files[MARKER]).stacks] == ["db"]  # the guest still knows
    assert hook("job-abort") == 1


def test_resume_failure_recovers_at_a_later_phase(hook: Hook) -> None:
    for step in ("backup-start", "pre-stop"):
        hook(step, Mode.SNAPSHOT, 101, QEMU)
    hook.g.unreachable = True
    assert hook("backup-end", Mode.SNAPSHOT, 101, QEMU) == 0
    assert hook.state().records()[0].status is Status.RESUME_FAILED
    hook.g.unreachable = False
    assert hook("log-end", Mode.SNAPSHOT, 101, QEMU) == 0
    assert hook.g.running_stacks() == ALL_UP
    assert hook("job-end") == 0


def test_job_end_makes_a_last_attempt(hook: Hook) -> None:
    for step in ("backup-start", "pre-stop"):
        hook(step, Mode.SNAPSHOT, 101, QEMU)
    hook.g.unreachable = True
    hook("backup-end", Mode.SNAPSHOT, 101, QEMU)
    hook("log-end", Mode.SNAPSHOT, 101, QEMU)
    hook.g.unreachable = False
    assert hook("job-end") == 0
    assert hook.g.running_stacks() == ALL_UP


def test_error_path_backup_abort_resumes(hook: Hook) -> None:
    """QEMU snapshot: an error after pre-stop skips the rest of the main path."""
    for step in ("backup-start", "pre-stop"):
        hook(step, Mode.SNAPSHOT, 101, QEMU)
    assert hook("backup-abort", Mode.SNAPSHOT, 101, QEMU) == 0
    assert hook.g.running_stacks() == ALL_UP
    assert hook("log-end", Mode.SNAPSHOT, 101, QEMU) == 0
    assert hook.g.starts() == ["db", "web"]


def test_error_path_log_end_resumes(hook: Hook) -> None:
    for step in ("backup-start", "pre-stop"):
        hook(step, Mode.SUSPEND, 101, LXC)
    assert hook("log-end", Mode.SUSPEND, 101, LXC) == 0
    assert hook.g.running_stacks() == ALL_UP


# -- stale markers --------------------------------------------------------------------------------


def test_sweep_resumes_the_marker_of_a_job_that_is_over(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    m = stale_marker(hook.g, dead_job())
    assert hook.g.running_stacks() == APP_DOWN
    assert hook("job-start") == 0
    assert hook.g.running_stacks() == ALL_UP and MARKER not in hook.g.files
    assert f"job-start 101: marker of job {m.job} (its job is over): started db, web" in caplog.messages
    assert any(msg.startswith("job-start: 1 guest(s) checked for leftover markers in ") for msg in caplog.messages)


def test_sweep_leaves_the_marker_of_a_job_that_still_runs(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    m = stale_marker(hook.g, running_job())
    assert hook("job-start") == 0
    assert hook.g.running_stacks() == APP_DOWN and hook.g.files[MARKER] == m.to_json()
    assert hook.g.starts() == []
    assert any("left alone (that job may still run, deadline not passed)" in msg for msg in caplog.messages)


def test_sweep_leaves_another_nodes_marker_until_its_deadline(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    other = JobId("some-other-node", "b", 1, 1)
    stale_marker(hook.g, other)
    assert hook("job-start") == 0
    assert hook.g.running_stacks() == APP_DOWN
    stale_marker(hook.g, other, deadline=time.time() - 1)
    assert hook("job-start") == 0
    assert hook.g.running_stacks() == ALL_UP
    assert any("(its deadline passed): started db, web" in msg for msg in caplog.messages)


def test_sweep_only_touches_guests_on_this_node(hook: Hook) -> None:
    (hook.pve_dir / "nodes" / "other-node" / "qemu-server").mkdir(parents=True)
    (hook.pve_dir / "nodes" / "other-node" / "qemu-server" / "101.conf").write_text("")
    stale_marker(hook.g, dead_job())
    assert hook("job-start") == 0
    assert hook.open.call_count == 0
    assert hook.g.running_stacks() == APP_DOWN
    # once the guest lives here (and runs: QEMU's pid file names a live process), it is swept
    (hook.pve_dir / "nodes" / node_name() / "qemu-server").mkdir(parents=True)
    (hook.pve_dir / "nodes" / node_name() / "qemu-server" / "101.conf").write_text("")
    hook.qmp_dir.mkdir(exist_ok=True)
    (hook.qmp_dir / "101.pid").write_text(f"{os.getpid()}\n")
    assert hook("job-start") == 0
    assert hook.g.running_stacks() == ALL_UP


def test_sweep_survives_an_unreachable_guest(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    hook.g.unreachable = True
    assert hook("job-start") == 0
    assert any(m.startswith("job-start 101: not reachable") for m in caplog.messages)


@pytest.mark.parametrize("job", [dead_job(), running_job()], ids=["job-over", "job-still-running"])
def test_backup_start_resumes_another_jobs_marker(hook: Hook, job: JobId, caplog: pytest.LogCaptureFixture) -> None:
    """vzdump holds the guest's backup lock at backup-start: any other job's marker is stale,
    even one whose worker still runs."""
    m = stale_marker(hook.g, job)
    assert hook("backup-start", Mode.SNAPSHOT, 101, QEMU) == 0
    assert hook.g.running_stacks() == ALL_UP and MARKER not in hook.g.files
    assert any(r.levelno == logging.WARNING and f"backup-start 101: marker left by job {m.job}" in r.getMessage()
               for r in caplog.records)
    # and the backup goes on normally
    assert hook("pre-stop", Mode.SNAPSHOT, 101, QEMU) == 0
    assert hook.g.running_stacks() == APP_DOWN


def test_stale_marker_that_cannot_be_resumed_fails_preflight(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    hook.configure('on_quiesce_error = "abort"')
    stale_marker(hook.g, dead_job())
    hook.g.projects["db"].start_fails = True
    assert hook("backup-start", Mode.SNAPSHOT, 101, QEMU) == 1
    assert hook("pre-stop", Mode.SNAPSHOT, 101, QEMU) == 0
    assert hook.g.stops() == []
    assert [s.name for s in markers.parse(hook.g.files[MARKER]).stacks] == ["db"]


def test_crashed_job_is_recovered_by_the_next_job(hook: Hook) -> None:
    """Job A stops the stacks and dies (node reboot); job B's sweep starts them again."""
    job_a = dead_job()
    a = hook.runner(job_a)
    assert a.run(Phase.BACKUP_START, QEMU, Mode.SNAPSHOT, 101) == 0
    assert a.run(Phase.PRE_STOP, QEMU, Mode.SNAPSHOT, 101) == 0
    assert hook.g.running_stacks() == APP_DOWN
    assert markers.parse(hook.g.files[MARKER]).job == job_a
    assert hook("job-start") == 0
    assert hook.g.running_stacks() == ALL_UP and MARKER not in hook.g.files


def test_marker_of_this_job_is_not_stale_at_backup_start(hook: Hook) -> None:
    r = hook.runner(running_job())
    r.run(Phase.BACKUP_START, QEMU, Mode.SNAPSHOT, 101)
    r.run(Phase.PRE_STOP, QEMU, Mode.SNAPSHOT, 101)
    assert r.run(Phase.BACKUP_START, QEMU, Mode.SNAPSHOT, 101) == 0
    assert hook.g.running_stacks() == APP_DOWN  # not resumed before the point in time
    assert r.run(Phase.BACKUP_END, QEMU, Mode.SNAPSHOT, 101) == 0


# -- config problems ------------------------------------------------------------------------------


def test_unknown_phase_is_ignored(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    assert run_phase(["backup-teleport", "snapshot", "101"], hook.env) == 0
    assert run_phase(["job-frobnicate"], hook.env) == 0
    assert "ignoring unknown phase 'backup-teleport' (a newer vzdump?)" in caplog.messages
    assert hook.open.call_count == 0


def test_guest_phase_without_mode_and_vmid(hook: Hook) -> None:
    assert run_phase(["pre-stop"], hook.env) == 2
    assert run_phase(["pre-stop", "fast", "101"], hook.env) == 2
    assert run_phase(["pre-stop", "snapshot", "abc"], hook.env) == 2


def test_unknown_vmtype_assumes_qemu(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    env = dict(hook.env)  # no VMTYPE
    assert run_phase(["backup-start", "snapshot", "101"], env) == 0
    assert run_phase(["pre-stop", "snapshot", "101"], env) == 0
    assert run_phase(["post-restart", "snapshot", "101"], env) == 0
    assert hook.g.running_stacks() == APP_DOWN  # qemu: not before backup-end
    assert run_phase(["backup-end", "snapshot", "101"], env) == 0
    assert hook.g.running_stacks() == ALL_UP


def test_config_broken_at_job_start_goes_on_and_job_end_fails(hook: Hook, task_log: pytest.CaptureFixture[str]) -> None:
    hook.configure(text='[guests.101]\nssh = { host = "h", port = 0 }\n[guests.102]\nstop_timeout = "x"\n')
    assert hook("job-start") == 0  # the job goes on: every guest backed up, crash-consistent
    out = task_log.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("vzdump-hook: ERROR: config ")]
    assert [line.split(": ", 3)[3] for line in lines] == [
        "guests.101.ssh.port: must be 1-65535 (got 0)",
        "guests.102.stop_timeout: must be a number (got 'x')",
        "guests.102.ssh: missing (transport is ssh: give at least ssh.host)",
    ]
    assert "backed up WITHOUT quiescing" in out
    for step in ("backup-start", "pre-stop", "backup-end", "log-end"):
        assert hook(step, Mode.SNAPSHOT, 101, QEMU) == 0
    assert hook.open.call_count == 0
    assert hook("job-end") == 1  # the job's notification says it failed
    out = task_log.readouterr().out
    assert "vzdump-hook: ERROR: job-end: the config was unusable" in out
    assert "101    -       -       not quiesced (config unusable)" in out


def test_config_missing_at_job_start_goes_on_and_job_end_fails(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    hook.cfg_path.unlink()
    assert hook("job-start") == 0
    assert any(r.levelno == logging.ERROR and "no such file" in r.getMessage() for r in caplog.records)
    assert hook("job-end") == 1


def test_config_fixed_during_the_job_still_fails_job_end(hook: Hook) -> None:
    good = hook.cfg_path.read_text()
    hook.configure(text="[guests.101\n")
    assert hook("job-start") == 0
    hook.cfg_path.write_text(good)
    assert hook("job-end") == 1  # guests of this job were not quiesced


def test_config_broken_at_backup_start_backs_up_without_quiescing(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    hook.configure(text="[guests.101\n")
    for step in ("backup-start", "pre-stop", "backup-end", "log-end"):
        assert hook(step, Mode.SNAPSHOT, 101, QEMU) == 0
    assert hook("job-end") == 1
    assert hook.open.call_count == 0
    assert any(r.levelno == logging.ERROR and "backup-start 101: the config is unusable" in r.getMessage()
               and "WITHOUT quiescing" in r.getMessage() for r in caplog.records)


def test_valid_config_job_end_exits_0(hook: Hook) -> None:
    assert hook("job-start") == 0
    for step in ("backup-start", "pre-stop", "backup-end", "log-end"):
        assert hook(step, Mode.SNAPSHOT, 101, QEMU) == 0
    assert hook("job-end") == 0


@pytest.mark.parametrize("breakage", ["invalid", "deleted", "guest-removed"])
def test_config_broken_after_pre_stop_still_resumes(hook: Hook, breakage: str) -> None:
    assert hook("job-start") == 0
    for step in ("backup-start", "pre-stop"):
        assert hook(step, Mode.SNAPSHOT, 101, QEMU) == 0
    assert hook.g.running_stacks() == APP_DOWN
    if breakage == "invalid":
        hook.configure(text="[guests.101]\nssh = 5\n")
    elif breakage == "deleted":
        hook.cfg_path.unlink()
    else:
        hook.configure(text="")
    for step in ("pre-restart", "post-restart"):
        assert hook(step, Mode.SNAPSHOT, 101, QEMU) == 0
        assert hook.g.running_stacks() == APP_DOWN
    assert hook("backup-end", Mode.SNAPSHOT, 101, QEMU) == 0
    assert hook.g.running_stacks() == ALL_UP
    assert hook("log-end", Mode.SNAPSHOT, 101, QEMU) == 0
    # this job was quiesced; an unusable config at job-end still fails it: the notification is the
    # admin's only warning before the next job runs without quiescing
    assert hook("job-end") == (0 if breakage == "guest-removed" else 1)
    assert hook.g.starts() == ["db", "web"]


def test_resume_uses_the_settings_recorded_at_quiesce(hook: Hook) -> None:
    hook.configure('marker_path = "/var/lib/other/m.json"')
    for step in ("backup-start", "pre-stop"):
        hook(step, Mode.SNAPSHOT, 101, QEMU)
    assert "/var/lib/other/m.json" in hook.g.files
    hook.configure('marker_path = "/somewhere/else.json"\nstacks = ["monitoring"]')
    hook("backup-end", Mode.SNAPSHOT, 101, QEMU)
    assert hook.g.running_stacks() == ALL_UP
    assert hook.g.files == {}


# -- history --------------------------------------------------------------------------------------


def test_history_records_the_downtime(hook: Hook) -> None:
    for step in ("backup-start", "pre-stop", "backup-end"):
        hook(step, Mode.SNAPSHOT, 101, QEMU)
    rows = hook.state().history(101)
    assert len(rows) == 1
    row: dict[str, Any] = rows[0]
    assert row["stacks"] == "web,db" and row["status"] == "resumed" and row["downtime"] >= 0
    assert row["vmtype"] == "qemu" and row["mode"] == "snapshot"


# -- bugs -----------------------------------------------------------------------------------------


def test_backup_start_again_after_pre_stop_keeps_the_pending_resume(hook: Hook) -> None:
    assert hook("job-start") == 0
    for step in ("backup-start", "pre-stop", "backup-start", "backup-abort", "log-end"):
        hook(step, Mode.SNAPSHOT, 101, QEMU)
    code = hook("job-end")
    assert hook.g.running_stacks() == ALL_UP or code == 1


def test_unreadable_marker_at_pre_stop_is_reported(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    hook.g.files[MARKER] = b"{broken"
    assert hook("pre-stop", Mode.SNAPSHOT, 101, QEMU) == 0  # no backup-start: nobody looked at it before
    assert any(r.levelno >= logging.WARNING and "marker" in r.getMessage() for r in caplog.records)
    assert hook.g.files[MARKER] == b"{broken"  # never overwritten: what it listed is not lost
    assert hook.g.stops() == []


def test_hostile_marker_does_not_crash_backup_start(hook: Hook) -> None:
    hook.g.files[MARKER] = b"[" * 30000 + b"]" * 30000
    assert hook("backup-start", Mode.SNAPSHOT, 101, QEMU) == 0


def test_admin_commands_are_all_known_to_the_fast_entry_point() -> None:
    """cli.py routes by a fixed word list (no click import for vzdump phases): every click command
    must be in it, or it would be taken for an unknown vzdump phase."""
    from vzdump_hook.admin.cli import cli as group
    from vzdump_hook.cli import ADMIN_COMMANDS

    assert set(group.commands) == set(ADMIN_COMMANDS)


def test_job_start_shows_contradicting_settings(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    hook.configure('max_downtime = 10\nstop_timeout = 3600\nexclude = ["x"]')
    assert hook("job-start") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("guests.101.stop_timeout: the stop timeouts of its stacks add up to 7200 s, "
               "longer than max_downtime (10 s)" in w for w in warnings), warnings
    assert any("guests.101.exclude: ignored" in w for w in warnings), warnings


@pytest.mark.parametrize("config", ["broken", "guest-removed"])
def test_job_start_resumes_a_dead_jobs_stacks_with_its_recorded_settings(hook: Hook, config: str,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """A job died after its pre-stop; since then the config broke (or lost the guest). The next
    job's job-start still starts the stacks: the node recorded how to reach the guest."""
    dead = hook.runner(dead_job())
    dead.ctx.state.write_job_info()
    assert dead.run(Phase.BACKUP_START, LXC, Mode.SNAPSHOT, 101) == 0
    assert dead.run(Phase.PRE_STOP, LXC, Mode.SNAPSHOT, 101) == 0
    assert hook.g.running_stacks() == APP_DOWN and MARKER in hook.g.files
    hook.configure(text="[guests.101\n" if config == "broken" else "")
    assert hook("job-start") == 0
    assert hook.g.running_stacks() == ALL_UP and MARKER not in hook.g.files
    assert any(m.startswith("job-start 101: marker of job") and "started db, web" in m
               for m in caplog.messages), caplog.messages
    assert not os.path.exists(dead.ctx.state.job_dir)  # its guest runs again: the record goes


def test_job_start_keeps_a_dead_jobs_record_while_its_guest_is_unreachable(hook: Hook) -> None:
    dead = hook.runner(dead_job())
    dead.ctx.state.write_job_info()
    dead.run(Phase.BACKUP_START, LXC, Mode.SNAPSHOT, 101)
    dead.run(Phase.PRE_STOP, LXC, Mode.SNAPSHOT, 101)
    hook.configure(text="")
    hook.g.unreachable = True
    assert hook("job-start") == 0
    assert os.path.exists(dead.ctx.state.job_dir)  # tried again at the next job
    hook.g.unreachable = False
    assert hook("job-start") == 0
    assert hook.g.running_stacks() == ALL_UP and not os.path.exists(dead.ctx.state.job_dir)


# -- one guest's hostile marker (issue 9) ------------------------------------------------------------

HOSTILE_MARKERS = {
    "services-int": b'"services": 5',
    "services-null": b'"services": null',
    "services-true": b'"services": true',
    "deadline-400-digits": b'"deadline": ' + b"9" * 400,
}


def _hostile(data: bytes, case: str) -> bytes:
    """`data` with the value of one key (a list or a number) replaced as HOSTILE_MARKERS says."""
    repl = HOSTILE_MARKERS[case]
    key = repl.split(b":")[0]
    return re.sub(re.escape(key) + rb": (\[[^]]*\]|[0-9.]+)", repl, data, count=1)


@pytest.mark.parametrize("case", sorted(HOSTILE_MARKERS))
def test_a_hostile_marker_of_one_guest_changes_nothing_for_another(hook: Hook, case: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """101 is really down at job-end; 103 (also in this job) has replaced its marker with a hostile
    one: job-end still fails, with 101's row and the still-DOWN warning."""
    hook.guests[103] = FakeGuest()
    hook.guests[103].add_project("app", 1)
    hook.configure(extra='[guests.103]\nssh = { host = "10.0.0.103" }\nstacks = ["app"]\n')
    assert hook("job-start") == 0
    for vmid in (101, 103):
        for step in ("backup-start", "pre-stop"):
            assert hook(step, Mode.SNAPSHOT, vmid, QEMU) == 0
    bad = _hostile(hook.guests[103].files[MARKER], case)
    assert bad != hook.guests[103].files[MARKER]
    hook.guests[103].files[MARKER] = bad
    hook.g.projects["db"].start_fails = True
    for vmid in (101, 103):
        hook("backup-end", Mode.SNAPSHOT, vmid, QEMU)
        hook("log-end", Mode.SNAPSHOT, vmid, QEMU)
    caplog.clear()
    assert hook("job-end") == 1
    assert not [m for m in caplog.messages if "internal error" in m]
    assert len([m for m in caplog.messages if m.startswith("101 ") and "STILL DOWN" in m]) == 1
    assert len([m for m in caplog.messages if m.startswith("103 ")]) == 1
    assert any("stacks still DOWN in guest(s) 101" in m for m in caplog.messages)



# -- guest text in the task log (security issue 20, finding 5) -------------------------------------

# NEL, CSI, LINE SEPARATOR and RLO pass the marker's parser (JSON \u escapes, control-free in its
# sense); ESC and a newline do not, so they come through the guest's command output
FORGED = "vzdump-hook: all stacks running"
THROUGH_THE_MARKER = f"x\x85\x9b2J\u2028{FORGED}\u202e"
THROUGH_OUTPUT = f"port\x1b[2K\r\x9b1G\u202e taken\n{FORGED}\x85{FORGED}"
RAW = "\x85\x9b\u2028\u202e\x1b\r"


def _assert_task_log_is_ours(out: str) -> None:
    """Every line of `out` is one of the hook's: prefixed, none forged, nothing raw."""
    assert out.endswith("\n")
    for line in out[:-1].split("\n"):
        assert line.startswith("vzdump-hook: ") and not line.startswith(f"vzdump-hook: {FORGED}"), line
        assert line.splitlines() == [line], line  # no other character that breaks a line
        assert not [c for c in line if c in RAW], line


def test_a_hostile_marker_and_output_reach_the_task_log_escaped(hook: Hook, task_log: pytest.CaptureFixture[str],
                                                                mocker: MockerFixture) -> None:
    """The marker's job (node, boot), vmtype and mode, and the guest's stderr, carry NEL, CSI, LINE
    SEPARATOR, RLO, ESC, CR and newlines: backup-start's lines show them escaped, one line each."""
    hook.configure('on_quiesce_error = "abort"')
    m = stale_marker(hook.g, JobId(THROUGH_THE_MARKER, THROUGH_THE_MARKER, 4242, 1))
    hook.g.files[MARKER] = dataclasses.replace(m, vmtype=THROUGH_THE_MARKER, mode=THROUGH_THE_MARKER).to_json()
    assert markers.parse(hook.g.files[MARKER]).job.node == THROUGH_THE_MARKER  # the node reads it as it is
    hook.g.projects["db"].start_fails = True
    compose = hook.g._compose

    def hostile_stderr(argv: list[str], stdin: bytes, timeout: float) -> tuple[int, bytes, bytes]:
        status, out, err = compose(argv, stdin, timeout)
        return status, out, (THROUGH_OUTPUT.encode() if status else err)

    mocker.patch.object(hook.g, "_compose", side_effect=hostile_stderr)
    task_log.readouterr()
    assert hook("backup-start", Mode.SNAPSHOT, 101, QEMU) == 1  # the stale marker's db does not start: abort
    out = task_log.readouterr().out
    _assert_task_log_is_ours(out)
    shown = "x\\x85\\x9b2J\\u2028vzdump-hook: all stacks running\\u202e"
    assert f"vzdump-hook: WARNING: backup-start 101: marker left by job {shown}/4242 (" in out, out
    assert "port\\x1b[2K" in out and "\\x9b1G\\u202e taken" in out, out  # what docker said, escaped


@pytest.mark.parametrize("field", ["node", "boot", "vmtype", "mode"])
def test_a_marker_with_raw_control_characters_is_refused_and_not_shown(hook: Hook, task_log: pytest.CaptureFixture[str],
                                                                       field: str) -> None:
    m = stale_marker(hook.g, dead_job())
    hook.g.files[MARKER] = m.to_json().replace(f'"{field}": "'.encode(),
                                               f'"{field}": "\\u001b[2J\\r\\n{FORGED}'.encode(), 1)
    assert FORGED.encode() in hook.g.files[MARKER]
    task_log.readouterr()
    hook("backup-start", Mode.SNAPSHOT, 101, QEMU)
    out = task_log.readouterr().out
    _assert_task_log_is_ours(out)
    assert "has a control character" in out, out  # the marker is refused, naming the field
