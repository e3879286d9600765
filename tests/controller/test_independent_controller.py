"""The hook against a controller written independently from docs/controller-api.md
(tests/controller/independent_controller.py, not the reference one): a real process reached with its
command over ssh (a test guest's sshd) or over HTTPS with a pinned certificate, driven by the installed
hook as vzdump runs it (one process per phase, `env -i` plus vzdump's variables), LXC snapshot mode.

Each test reads what the controller received (its messages.jsonl: time, carrier, phase, job, in the
order they arrived) and whether its app (a real process) runs; never the hook's own account of it.
The rule under test (stacks/conversation.py): a quiesce that is not confirmed is followed by `abort`
and nothing else for that job; a job is closed once the controller confirmed its end, also when
vzdump's worker dies; a refused token is a config error and nothing is stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.controller.conftest import openssl_cert
from tests.infra.guest import TestGuest
from tests.infra.vzdump import Context, GuestSpec, GuestType, JobStatus, Mode, Moment, WorkerKilled, run_job
from tests.integration.hookenv import installed_hook, toml_value, wait_until

pytestmark = pytest.mark.integration

CONTROLLER = Path(__file__).with_name("independent_controller.py")
VMID = 101
TOKEN = "indep-" + "0123456789abcdef0123"
CLOSE_WITHIN = 10.0  # issue 23: after a worker crash, the controller's job is closed within this


@dataclass
class Indep:
    state: Path
    token_file: Path
    cert: Path
    key: Path
    fingerprint: str
    url: str = ""
    proc: subprocess.Popen[str] | None = None

    def messages(self, job: str | None = None) -> list[dict[str, Any]]:
        path = self.state / "messages.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        out = [json.loads(line) for line in lines]
        return [m for m in out if job is None or m["job"] == job]

    def phases(self, job: str) -> list[str]:
        return [m["phase"] for m in self.messages(job)]

    def jobs(self) -> list[str]:
        """The jobs the hook sent messages for, in order (status has none)."""
        seen: list[str] = []
        for m in self.messages():
            if m["job"] and m["job"] not in seen:
                seen.append(m["job"])
        return seen

    def state_json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.state / "state.json").read_text())
        return data

    def app_runs(self) -> bool:
        try:
            pid = int((self.state / "app.pid").read_text())
            os.kill(pid, 0)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return False
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"

    def misbehave(self, how: str) -> None:
        (self.state / "misbehave").write_text(how)

    def serve(self, token_file: Path | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, str(CONTROLLER), "--state", str(self.state), "serve",
                                      "--token-file", str(token_file or self.token_file), "--tls-cert", str(self.cert),
                                      "--tls-key", str(self.key)], stdout=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until it listens (or it died: "")
        assert line.startswith("listening on https://"), line
        self.url = line.split()[-1]


@pytest.fixture
def indep(tmp_path: Path) -> Iterator[Indep]:
    state = tmp_path / "ctl"
    state.mkdir()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    cert, key, fingerprint = openssl_cert(tmp_path, "indep")
    c = Indep(state, token_file, cert, key, fingerprint)
    _start_app(c)
    yield c
    if c.proc is not None and c.proc.poll() is None:
        c.proc.send_signal(signal.SIGTERM)
        try:
            c.proc.wait(15)
        except subprocess.TimeoutExpired:
            c.proc.kill()
            c.proc.wait(10)
    if (state / "app.pid").exists():
        try:
            os.kill(int((state / "app.pid").read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["pkill", "-f", f"{CONTROLLER} --state {state} "], check=False, timeout=30)


def _start_app(c: Indep) -> None:
    """The app runs before the backup (as the controller would have started it)."""
    proc = subprocess.Popen(["sleep", "1000000"], start_new_session=True, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (c.state / "app.pid").write_text(str(proc.pid))
    assert c.app_runs()


def write_config(tmp: Path, stack: dict[str, Any], guest: TestGuest | None = None, extra: str = "",
                 hook: str = "") -> dict[str, str]:
    cfg = tmp / "hook.toml"
    lines = ["[hook]", f"pve_dir = {toml_value(str(tmp / 'pve'))}", hook, f"[guests.{VMID}]"]
    if guest is None:
        lines.append('transport = "none"')
    else:
        ssh = {"host": guest.host, "port": guest.port, "user": guest.user, "identity_file": guest.identity_file,
               "known_hosts": guest.known_hosts_file, "connect_timeout": 5}
        lines += [f"ssh = {toml_value(ssh)}", f"marker_path = {toml_value(str(guest.workdir / 'marker.json'))}"]
    lines += [f"stacks = [{toml_value(stack)}]", "max_downtime = 120", "stop_timeout = 5", extra]
    cfg.write_text("\n".join(lines) + "\n")
    return {"VZDUMP_HOOK_CONFIG": str(cfg), "VZDUMP_HOOK_RUN_DIR": str(tmp / "run"),
            "VZDUMP_HOOK_STATE_DIR": str(tmp / "state")}


def command_stack(c: Indep, answer_within: float = 3) -> dict[str, Any]:
    return {"kind": "controller", "name": "appctl", "answer_within": answer_within,
            "command": [sys.executable, str(CONTROLLER), "--state", str(c.state)]}


def https_stack(c: Indep, token_file: Path | None = None) -> dict[str, Any]:
    return {"kind": "controller", "name": "appctl", "url": c.url, "token_file": str(token_file or c.token_file),
            "fingerprint": c.fingerprint, "answer_within": 3}


def lines_of(result: Any, phase: str) -> list[str]:
    return [line.text for line in result.log if line.phase == phase]


class AppAtPointInTime:
    def __init__(self, c: Indep) -> None:
        self.c = c
        self.runs: bool | None = None

    def __call__(self, ctx: Context) -> None:
        self.runs = self.c.app_runs()


def test_https_pinned_a_good_job_is_quiesce_snapshotted_done_in_order(indep: Indep, tmp_path: Path) -> None:
    indep.serve()
    pit = AppAtPointInTime(indep)
    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)],
                     extra_env=write_config(tmp_path, https_stack(indep)), on_point_in_time=pit, timeout=120)
    log = result.task_log()
    assert result.status is JobStatus.OK, log
    (job,) = indep.jobs()
    got = indep.messages(job)
    assert [m["phase"] for m in got] == ["quiesce", "snapshotted", "done"], got
    assert [m["t"] for m in got] == sorted(m["t"] for m in got)
    assert pit.runs is False and indep.app_runs(), (pit.runs, log)
    assert indep.state_json()["open"] is None and indep.state_json()["closed"][-1]["state"] == "done"


@pytest.mark.parametrize("how", ["not-json", "exit-mismatch", "hang", "stop-failed"])
def test_a_quiesce_not_confirmed_is_followed_by_abort_and_nothing_else(indep: Indep, test_guest: TestGuest,
                                                                       tmp_path: Path, how: str) -> None:
    """Over the command carrier through ssh: whatever went wrong with the quiesce, the controller gets
    abort (its app runs again) and never snapshotted, done or failed for that job."""
    indep.misbehave(how)
    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)],
                     extra_env=write_config(tmp_path, command_stack(indep), guest=test_guest), timeout=120)
    log = result.task_log()
    assert result.status is JobStatus.OK, log  # on_quiesce_error = continue: the backup goes on
    (job,) = indep.jobs()
    assert indep.phases(job) == ["quiesce", "abort"], (indep.messages(job), log)
    assert indep.app_runs(), log
    st = indep.state_json()
    assert st["open"] is None and st["closed"][-1] == {"job": job, "vmid": VMID, "state": "aborted", "known": True}
    pre_stop = lines_of(result, "pre-stop")
    assert not any("stopped appctl" in t for t in pre_stop), pre_stop  # no "stopped" line for a failed stop
    assert any("stop failed" in t and "appctl" in t for t in pre_stop), pre_stop
    assert any("controller appctl told abort (its quiesce was not confirmed)" in line.text for line in result.log), log


def test_abort_policy_after_a_failed_quiesce_sends_abort_at_once(indep: Indep, test_guest: TestGuest,
                                                                 tmp_path: Path) -> None:
    indep.misbehave("stop-failed")
    seen: dict[str, Any] = {}

    def on_phase(phase: str, ctx: Context) -> None:
        if phase == "pre-stop" and ctx.moment is Moment.AFTER_PHASE:
            seen["phases"] = [m["phase"] for m in indep.messages() if m["phase"] != "status"]
            seen["app"] = indep.app_runs()

    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)],
                     extra_env=write_config(tmp_path, command_stack(indep), guest=test_guest,
                                            extra='on_quiesce_error = "abort"'),
                     on_phase=on_phase, timeout=120)
    log = result.task_log()
    assert result.guest(VMID).status.value == "failed", log
    assert seen == {"phases": ["quiesce", "abort"], "app": True}, (seen, log)
    (job,) = indep.jobs()
    assert indep.phases(job) == ["quiesce", "abort"], indep.messages()


@pytest.mark.parametrize(("crash_after", "expected"), [("pre-stop", ["quiesce", "abort"]),
                                                       ("pre-restart", ["quiesce", "snapshotted", "abort"])])
def test_worker_crash_the_resident_closes_the_controllers_job_within_10_s(indep: Indep, tmp_path: Path,
                                                                        crash_after: str, expected: list[str]) -> None:
    """vzdump's worker is SIGKILLed right after pre-stop (app down, point in time not passed: the
    hook gives up on the job, abort instead of snapshotted) or after pre-restart (the app runs
    again, the job is open as resumed): the resident tells the controller abort within
    CLOSE_WITHIN seconds, without any later job."""
    indep.serve()
    killed: dict[str, float] = {}

    def on_phase(phase: str, ctx: Context) -> None:
        if phase == crash_after and ctx.moment is Moment.AFTER_PHASE:
            killed["at"] = time.time()
            raise WorkerKilled

    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)],
                     extra_env=write_config(tmp_path, https_stack(indep)), on_phase=on_phase, timeout=120)
    assert result.status is JobStatus.KILLED, result.task_log()
    (job,) = indep.jobs()
    assert wait_until(lambda: indep.state_json()["open"] is None, CLOSE_WITHIN + 5), indep.messages()
    got = indep.messages(job)
    assert [m["phase"] for m in got] == expected, got
    assert got[-1]["t"] - killed["at"] < CLOSE_WITHIN, got
    assert indep.app_runs()
    assert indep.state_json()["closed"][-1] == {"job": job, "vmid": VMID, "state": "aborted", "known": True}


def test_a_refused_token_is_a_config_error_and_nothing_is_stopped(indep: Indep, tmp_path: Path) -> None:
    indep.serve()
    bad = tmp_path / "bad-token"
    bad.write_text("x" * 32 + "\n")
    bad.chmod(0o600)
    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)],
                     extra_env=write_config(tmp_path, https_stack(indep, bad)), timeout=120)
    log = result.task_log()
    # asked its status (job-start's sweep, backup-start), never told anything
    assert {m["phase"] for m in indep.messages()} == {"status"}, indep.messages()
    assert indep.app_runs(), log
    start = lines_of(result, "backup-start")
    assert any("config error" in t and "403" in t and str(bad) in t for t in start), start
    assert not any("not reachable" in t for t in start), start
    sweep = lines_of(result, "job-start")
    assert any("CONFIG ERROR" in t and "403" in t and str(bad) in t for t in sweep), sweep
    assert any("not quiesced (config unusable)" in t for t in lines_of(result, "job-end")), log


def test_without_a_resident_the_next_job_start_closes_a_job_left_open_after_the_resume(indep: Indep,
                                                                                      tmp_path: Path) -> None:
    """No resident; the worker dies after pre-restart, when the app runs again and the controller holds
    the job open as resumed. The ledger still lists the guest (its controller did not confirm the job's
    end), `status` says so, and the next job-start asks the controller and tells it abort."""
    indep.serve()
    hook_env = write_config(tmp_path, https_stack(indep), hook="resident = false")

    def on_phase(phase: str, ctx: Context) -> None:
        if phase == "pre-restart" and ctx.moment is Moment.AFTER_PHASE:
            raise WorkerKilled

    first = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=hook_env,
                    on_phase=on_phase, timeout=120)
    assert first.status is JobStatus.KILLED, first.task_log()
    (job,) = indep.jobs()
    assert indep.phases(job) == ["quiesce", "snapshotted"] and indep.app_runs()
    assert indep.state_json()["open"]["state"] == "resumed"
    shown = subprocess.run([installed_hook(), "status"], env=hook_env, capture_output=True, text=True, timeout=120)
    assert "controller job open: appctl (not told its end yet)" in shown.stdout, shown.stdout + shown.stderr
    assert "1 entry for guest(s) 101" in shown.stdout, shown.stdout  # kept: the job-start below asks the guest
    second = run_job(installed_hook(), [], extra_env=hook_env, timeout=120)
    text = second.task_log()
    assert "its job is over" in text and "told abort" in text, text
    assert indep.phases(job) == ["quiesce", "snapshotted", "abort"], indep.messages()
    assert indep.state_json()["open"] is None and indep.app_runs()
