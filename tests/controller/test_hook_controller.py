"""The hook and a guest's own controller: the installed `vzdump-hook`, run by the vzdump stand-in as
vzdump runs it (one process per phase, `env -i` plus vzdump's variables), tells the reference
controller (a real process, tests/controller/conftest.py) the backup's phases over HTTPS (CA file and
pinned fingerprint) and over its command line in a guest reached with `pct exec` (the namespace
stand-in). The controller stops and starts real compose projects; the tests look at the projects and
at what the controller recorded, never at the hook's own account of it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.controller.conftest import CONTROLLER, Env
from tests.infra.pct_standin import NsContainer, make_pct, read_calls
from tests.infra.vzdump import Context, GuestSpec, GuestType, JobStatus, Mode, Moment, WorkerKilled, run_job, run_phase
from tests.integration.hookenv import installed_hook, toml_value, wait_until

pytestmark = pytest.mark.integration

VMID = 101  # the conftest's controller config answers for this guest


def write_config(tmp: Path, stack: dict[str, Any], transport: str = "none", extra: str = "",
                 hook: str = "") -> dict[str, str]:
    """A hook config with one guest whose only stack is the controller; returns the env for the hook."""
    cfg = tmp / "hook.toml"
    lines = ["[hook]", f"pve_dir = {toml_value(str(tmp / 'pve'))}", hook, f"[guests.{VMID}]",
             f'transport = "{transport}"',
             f"stacks = [{toml_value(stack)}]", "max_downtime = 120", "stop_timeout = 5", extra]
    cfg.write_text("\n".join(lines) + "\n")
    return {"VZDUMP_HOOK_CONFIG": str(cfg), "VZDUMP_HOOK_RUN_DIR": str(tmp / "run"),
            "VZDUMP_HOOK_STATE_DIR": str(tmp / "state")}


def https_stack(env: Env, pin: bool = False) -> dict[str, Any]:
    verify = {"fingerprint": env.fingerprint} if pin else {"ca_file": str(env.cert)}
    return {"kind": "controller", "name": "appctl", "url": env.url, "token_file": str(env.token_file), **verify}


def status(env: Env) -> dict[str, Any]:
    """The controller's status: over HTTPS when it serves, else with its command line."""
    return env.status() if env.url else env.cli("status")[1]


def closed_jobs(env: Env) -> list[dict[str, Any]]:
    return list(status(env)["closed"])


class AtPointInTime:
    """What the projects and the controller look like at the backup's point in time."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.seen: dict[str, Any] = {}

    def __call__(self, ctx: Context) -> None:
        self.seen["stopped"] = self.env.all_stopped()
        self.seen["open"] = status(self.env)["open_job"]
        self.seen["marker"] = json.loads(self.env.marker.read_text()) if self.env.marker.exists() else None


@pytest.mark.parametrize("pin", [False, True], ids=["ca-file", "pinned"])
def test_https_lxc_snapshot_stopped_at_the_point_in_time_resumed_and_closed_done(served: Env, tmp_path: Path,
                                                                                  pin: bool) -> None:
    env = served
    pit = AtPointInTime(env)
    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)],
                     extra_env=write_config(tmp_path, https_stack(env, pin)),
                     on_point_in_time=pit, timeout=120)
    log = result.task_log()
    assert result.status is JobStatus.OK and all(r.returncode == 0 for r in result.records), log
    # at the point in time: the controller had stopped its apps, with its marker listing them, for this job
    assert pit.seen["stopped"] is True, log
    assert (pit.seen["open"] is not None and pit.seen["open"]["state"] == "quiesced"
            and pit.seen["open"]["vmid"] == VMID), (pit.seen, log)
    job = pit.seen["open"]["job"]
    assert pit.seen["marker"] is not None and pit.seen["marker"]["job"] == job
    assert sorted(s["name"] for s in pit.seen["marker"]["stacks"]) == ["db", "web"]  # off was not running
    # after the job: everything runs again (off stays off) and the job is closed as done, known to it
    assert env.all_running(), log
    status = env.status()
    assert status["open_job"] is None and status["held"] == [] and status["marker"] is False, status
    assert [(c["job"], c["state"], c["known"]) for c in status["closed"]] == [(job, "done", True)], status
    # the task log says what the controller was told, at the phases that told it
    lines = [line.text for line in result.log if line.phase == "backup-end"]
    assert any(f"{VMID}: controller appctl told done" in t for t in lines), log


def test_failure_after_the_point_in_time_closes_the_job_failed(served: Env, tmp_path: Path) -> None:
    env = served
    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT, fail_at="after-point-in-time")],
                     extra_env=write_config(tmp_path, https_stack(env)), timeout=120)
    log = result.task_log()
    assert "backup-abort" in result.phases(VMID), log
    assert env.all_running(), log
    assert [c["state"] for c in closed_jobs(env)] == ["failed"], (env.status(), log)


def test_unreachable_controller_at_quiesce_gets_the_policy_and_nothing_stops(served: Env, tmp_path: Path) -> None:
    env = served
    stack = {**https_stack(env), "url": "https://127.0.0.1:9"}  # nothing listens there
    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)],
                     extra_env=write_config(tmp_path, stack, extra='on_quiesce_error = "abort"'), timeout=120)
    log = result.task_log()
    guest = result.guest(VMID)
    assert guest.status.value == "failed" and "backup-start" in guest.phases and "pre-stop" not in guest.phases, log
    assert "controller appctl" in log and "not reachable" in log, log
    assert env.all_running() and env.status()["open_job"] is None, log


def test_job_killed_after_the_stop_next_job_start_aborts_the_controllers_job(served: Env, tmp_path: Path) -> None:
    """No resident, the worker dies right after pre-stop: the apps stay stopped until the next job's
    job-start asks the controller, sees that its job's worker is gone, and tells it abort."""
    env = served
    hook_env = write_config(tmp_path, https_stack(env), hook="resident = false")
    seen: dict[str, Any] = {}

    def on_phase(phase: str, ctx: Context) -> None:
        if phase == "pre-stop" and ctx.moment is Moment.AFTER_PHASE:
            seen["stopped"] = env.all_stopped()
            raise WorkerKilled

    first = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=hook_env,
                    on_phase=on_phase, timeout=120)
    assert first.status is JobStatus.KILLED and seen == {"stopped": True}, first.task_log()
    assert env.all_stopped() and env.status()["open_job"]["state"] == "quiesced"  # nothing ran after the kill
    start = run_phase(installed_hook(), "job-start", extra_env=hook_env)
    text = "\n".join(start.lines)
    assert start.returncode == 0, text
    assert "its job is over" in text and "told abort" in text, text
    assert env.all_running(), text
    assert [(c["state"], c["known"]) for c in closed_jobs(env)] == [("aborted", True)], env.status()


def test_recover_ends_an_open_job_whose_deadline_passed(env: Env, tmp_path: Path) -> None:
    """A job the controller holds open past its deadline is ended by `vzdump-hook recover`, even when
    the hook cannot tell whether its job is over (another node's job)."""
    # the controller's own expiry (deadline + grace) is far off: only the hook ends the job here
    env.config.write_text(json.dumps({**json.loads(env.config.read_text()), "deadline_grace": 3600}))
    assert env.serve().poll() is None
    resp = env.post("quiesce", "othernode:0f0f:42-4242", deadline=time.time() + 6, answer_within=60)
    assert resp.status_code == 200 and env.all_stopped(), resp.text
    hook_env = write_config(tmp_path, https_stack(env))
    early = subprocess.run([installed_hook(), "recover", str(VMID)], env=hook_env, capture_output=True, text=True,
                           timeout=120)
    assert "left alone" in early.stdout + early.stderr and env.all_stopped(), early.stdout + early.stderr
    assert wait_until(lambda: time.time() > env.status()["open_job"]["deadline"], 10)
    # `status` shows what the controller holds, and counts it as down
    before = subprocess.run([installed_hook(), "status"], env=hook_env, capture_output=True, text=True, timeout=120)
    assert (before.returncode == 1
            and "controller appctl: job othernode:0f0f:42-4242 open (quiesced)" in before.stdout), (
        before.stdout + before.stderr)
    late = subprocess.run([installed_hook(), "recover", str(VMID)], env=hook_env, capture_output=True, text=True,
                          timeout=120)
    out = late.stdout + late.stderr
    assert late.returncode == 0, out
    assert env.all_running(), out
    assert [(c["job"], c["state"]) for c in closed_jobs(env)] == [("othernode:0f0f:42-4242", "aborted")], env.status()
    after = subprocess.run([installed_hook(), "status"], env=hook_env, capture_output=True, text=True, timeout=120)
    assert (after.returncode == 0 and f"{VMID}: " in after.stdout
            and "controller appctl: holds nothing" in after.stdout), after.stdout + after.stderr


@pytest.fixture
def ct(tmp_path: Path) -> Iterator[NsContainer]:
    c = NsContainer(VMID, tmp_path / "ct")
    yield c
    c.stop()


def test_command_carrier_through_pct_qemu_snapshot(env: Env, ct: NsContainer, tmp_path: Path) -> None:
    """Carrier A: `vzdump-controller signal ...` run in the guest with `pct exec` (no server)."""
    stack = {"kind": "controller", "name": "appctl",
             "command": [sys.executable, str(CONTROLLER), "--config", str(env.config)]}
    hook_env = write_config(tmp_path, stack, transport="pct",
                            extra=f"pct = {{ path = {toml_value(make_pct(tmp_path / 'ct'))} }}")
    pit = AtPointInTime(env)
    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.QEMU, Mode.SNAPSHOT)], extra_env=hook_env,
                     on_point_in_time=pit, timeout=120)
    log = result.task_log()
    assert result.status is JobStatus.OK, log
    # QEMU snapshot: the point in time is after post-restart; without Proxmox's query-backup the
    # stacks start at backup-end, so the controller still holds them at the point in time
    assert pit.seen["stopped"] is True and pit.seen["open"]["state"] == "quiesced", (pit.seen, log)
    assert env.all_running(), log
    assert [c["state"] for c in closed_jobs(env)] == ["done"], env.status()
    phases = [c["argv"][c["argv"].index("signal") + 1] for c in read_calls(tmp_path / "ct") if "signal" in c["argv"]]
    assert phases[phases.index("quiesce"):] == ["quiesce", "snapshotted", "done"], phases


def test_check_reports_a_wrong_token(served: Env, tmp_path: Path) -> None:
    env = served
    bad = tmp_path / "bad-token"
    bad.write_text("x" * 32 + "\n")
    bad.chmod(0o600)
    hook_env = write_config(tmp_path, {**https_stack(env), "token_file": str(bad)})
    out = subprocess.run([installed_hook(), "check", str(VMID)], env=hook_env, capture_output=True, text=True,
                         timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert "403" in text and str(bad) in text, text
    assert env.all_running()


def test_serve_killed_between_quiesce_and_snapshotted_the_hook_resends(served: Env, tmp_path: Path) -> None:
    """The controller's server dies right after it quiesced; it is started again before the point in
    time has passed. The hook's snapshotted reaches the new process, which resumes from its state files."""
    env = served
    proc = env.procs[-1]

    def on_phase(phase: str, ctx: Context) -> None:
        if phase == "pre-stop" and ctx.moment is Moment.AFTER_PHASE:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            # the same address, as its systemd unit would
            restarted = env.serve(listen=env.url.removeprefix("https://"))
            assert restarted.poll() is None, (env.tmp / "controller.log").read_text()

    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)],
                     extra_env=write_config(tmp_path, https_stack(env)),
                     on_phase=on_phase, timeout=120)
    log = result.task_log()
    assert result.status is JobStatus.OK, log
    assert env.all_running(), log
    assert [c["state"] for c in closed_jobs(env)] == ["done"], (env.status(), log)


def test_reference_controller_whose_stop_fails_is_told_abort_and_nothing_else(env: Env, ct: NsContainer,
                                                                             tmp_path: Path) -> None:
    """The reference controller's compose stops the projects but exits 1 (a stop that failed half-way):
    it answers stop_failed (quiesce_failed). The hook tells it abort at the resume and nothing else
    for that job (stacks/conversation.py); the abort starts what it had stopped, and closes the job."""
    wrapper = tmp_path / "compose-stop-fails"
    wrapper.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = stop ] && { docker compose "$@"; exit 1; }; done\n'
                       'exec docker compose "$@"\n')
    wrapper.chmod(0o755)
    env.config.write_text(json.dumps({**json.loads(env.config.read_text()), "compose": [str(wrapper)]}))
    stack = {"kind": "controller", "name": "appctl",
             "command": [sys.executable, str(CONTROLLER), "--config", str(env.config)]}
    hook_env = write_config(tmp_path, stack, transport="pct",
                            extra=f"pct = {{ path = {toml_value(make_pct(tmp_path / 'ct'))} }}")
    seen: dict[str, bool] = {}
    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=hook_env,
                     on_point_in_time=lambda ctx: seen.update(stopped=not env.all_running()), timeout=120)
    log = result.task_log()
    assert result.status is JobStatus.OK, log  # on_quiesce_error = continue
    phases = [c["argv"][c["argv"].index("signal") + 1] for c in read_calls(tmp_path / "ct") if "signal" in c["argv"]]
    assert phases[phases.index("quiesce"):] == ["quiesce", "abort"], (phases, log)
    assert seen == {"stopped": True}, log  # the failed stop had stopped something: abort had work to do
    assert env.all_running(), log
    assert [c["state"] for c in closed_jobs(env)] == ["aborted"], env.status()
    assert any("stop_failed" in line.text for line in result.log if line.phase == "pre-stop"), log
