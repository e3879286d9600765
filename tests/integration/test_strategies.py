"""Per-stack strategies (docs/configuration.md: Per-stack strategies), with the installed hook run as vzdump runs it
against a real guest (sshd in a network namespace, the real Docker engine, compose projects):
`before_stop` runs right before the stop and is not downtime; `group` stops groups in order, a group's
stacks at once, and starts in reverse; `ready` ends the downtime when the app answers (a command in
the guest, or compose healthchecks), and a stack that is not ready in time is reported without
failing the backup. What the tests compare comes from the guest and the engine (files the commands
write, the containers' own start and stop times), not from the hook's account."""

from __future__ import annotations

import glob
import json
import re
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.infra import compose
from tests.infra.vzdump import Context, GuestSpec, GuestType, JobStatus, Mode, Moment, run_job
from tests.integration.hookenv import HookSetup, installed_hook, wait_until

pytestmark = pytest.mark.integration

VMID = 101


@pytest.fixture
def setup(tmp_path: Path) -> HookSetup:
    return HookSetup(tmp_path)


def container_times(project: compose.ComposeProject) -> dict[str, tuple[float, float]]:
    """service -> (State.StartedAt, State.FinishedAt) as Unix times, from the engine."""
    ids = subprocess.run(["docker", "ps", "-aq", "--no-trunc", "--filter",
                          f"label=com.docker.compose.project={project.name}"],
                         check=True, capture_output=True, text=True, timeout=60).stdout.split()
    out: dict[str, tuple[float, float]] = {}
    for c in json.loads(subprocess.run(["docker", "inspect", *ids], check=True, capture_output=True, text=True,
                                       timeout=60).stdout):
        out[c["Config"]["Labels"]["com.docker.compose.service"]] = (_ts(c["State"]["StartedAt"]),
                                                                     _ts(c["State"]["FinishedAt"]))
    return out


def _ts(text: str) -> float:
    """docker's RFC 3339 time with nanoseconds as a Unix time."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z", text)
    assert m is not None, text
    return datetime.fromisoformat(m[1] + "+00:00").timestamp() + float(f"0.{m[2] or 0}")


def host_record(setup: HookSetup) -> dict[str, Any]:
    """The job's host record of the guest (the node's state, kept in the run dir until the next job)."""
    found = glob.glob(str(setup.tmp / "run" / "jobs" / "*" / f"guest-{VMID}.json"))
    assert len(found) == 1, found
    return dict(json.loads(Path(found[0]).read_text()))


def test_before_stop_runs_while_everything_runs_and_is_not_downtime(setup: HookSetup, test_guest: Any,
                                                                    compose_project: Any) -> None:
    db = compose_project("db", {"app": "sleeper"})
    compose.up(db)
    seen = setup.tmp / "before-stop.txt"
    marker = test_guest.workdir / "marker.json"  # where HookSetup puts the guest's marker
    # in the guest: whether the marker exists and the app runs, then 1.5 s of work, then the time
    script = (f"{{ test -e {marker} && echo marker || echo no-marker; "
              f"docker ps -q --filter label=com.docker.compose.project={db.name} | wc -l; "
              f"sleep 1.5; date +%s.%N; }} > {seen}")
    setup.write({VMID: (test_guest, {"stacks": [{"name": db.name, "before_stop": ["sh", "-c", script]}],
                                     "stop_timeout": 5})})
    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=setup.env,
                     timeout=120)
    log = result.task_log()
    assert result.status is JobStatus.OK, log
    lines = seen.read_text().split()
    assert lines[:2] == ["no-marker", "1"], lines  # before the marker, with the app up
    done = float(lines[2])
    stopped = container_times(db)["app"][1]
    rec = host_record(setup)
    assert done <= rec["stop_started"] < stopped, (done, rec["stop_started"], stopped)  # the downtime starts after it
    assert rec["resumed_at"] - rec["stop_started"] < 1.5 + (stopped - rec["stop_started"]) + 5, rec
    assert f"quiesce {VMID}: before_stop of {db.name} done in" in log, log


def test_failing_before_stop_is_reported_and_the_stop_goes_on(setup: HookSetup, test_guest: Any,
                                                              compose_project: Any) -> None:
    db = compose_project("db", {"app": "sleeper"})
    compose.up(db)
    setup.write({VMID: (test_guest, {"stacks": [{"name": db.name,
                                                 "before_stop": ["sh", "-c", "echo no checkpoint >&2; exit 3"]}],
                                     "stop_timeout": 5})})
    at_pit: dict[str, bool] = {}
    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=setup.env,
                     timeout=120,
                     on_point_in_time=lambda ctx: at_pit.update(up=compose.running_services(db) == {"app"}))
    log = result.task_log()
    assert result.status is JobStatus.OK and at_pit == {"up": False}, log
    assert re.search(rf"vzdump-hook: WARNING: quiesce {VMID}: before_stop of {db.name} exited 3 in .* "
                     r"\(no checkpoint\): stopping it all the same", log), log
    assert compose.running_services(db) == {"app"}, log


def test_groups_stop_in_order_and_at_once_within_a_group_start_in_reverse(setup: HookSetup, test_guest: Any,
                                                                          compose_project: Any) -> None:
    # a and b ignore SIGTERM: each stop takes the 2 s stop timeout; at once, both end within a second
    a = compose_project("a", {"app": "stubborn"})
    b = compose_project("b", {"app": "stubborn"})
    c = compose_project("c", {"app": "sleeper"})
    for p in (a, b, c):
        compose.up(p)
    stacks = [{"name": a.name, "group": 1}, {"name": c.name, "group": 2}, {"name": b.name, "group": 1}]
    setup.write({VMID: (test_guest, {"stacks": stacks, "stop_timeout": 2})})
    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=setup.env,
                     timeout=120)
    log = result.task_log()
    assert result.status is JobStatus.OK, log
    ta, tb, tc = (container_times(p)["app"] for p in (a, b, c))
    assert abs(ta[1] - tb[1]) < 1.0, (ta, tb)  # group 1 at once (one after the other: 2 s apart)
    assert tc[1] > max(ta[1], tb[1]), (ta, tb, tc)  # group 2 after group 1
    assert tc[0] < min(ta[0], tb[0]), (ta, tb, tc)  # started in reverse: group 2 first


def _flag_after_resume(flag: Path, resume_phase: str, delay: float, times: dict[str, float]) -> Any:
    """on_phase: the app 'becomes ready' (the flag appears) `delay` s after the resume phase began."""

    def on_phase(phase: str, ctx: Context) -> None:
        if phase == resume_phase and ctx.moment is Moment.BEFORE_PHASE:
            def create() -> None:
                flag.write_text("")
                times["flag"] = time.time()
            threading.Timer(delay, create).start()

    return on_phase


def test_ready_command_ends_the_downtime_when_it_succeeds(setup: HookSetup, test_guest: Any,
                                                          compose_project: Any) -> None:
    db = compose_project("db", {"app": "sleeper"})
    compose.up(db)
    flag = setup.tmp / "ready-flag"
    setup.write({VMID: (test_guest, {"stacks": [{"name": db.name, "ready": {"command": ["test", "-e", str(flag)]},
                                                 "ready_timeout": 30}], "stop_timeout": 5})})
    times: dict[str, float] = {}
    # the archive takes 4 s: the app is ready while it is written (the resident waits for it)
    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=setup.env,
                     timeout=120, on_phase=_flag_after_resume(flag, "pre-restart", 2.0, times), transfer_seconds=4)
    log = result.task_log()
    assert result.status is JobStatus.OK, log
    rec = host_record(setup)
    started = container_times(db)["app"][0]
    assert rec["started_at"] >= started - 0.5 and "flag" in times, (rec, started, times, log)
    # the downtime ends when the command first succeeded: after the flag, within a poll and a round trip
    assert times["flag"] <= rec["resumed_at"] < times["flag"] + 1.0, (rec, times, log)
    assert rec["not_ready"] == [] and rec["ready_pending"] == [], rec
    # the flag was absent from the stop on: the check failed at once, which is where the downtime starts
    assert rec["stop_started"] <= rec["app_down_at"] <= rec["stop_ended"], rec
    down = rec["resumed_at"] - rec["app_down_at"]
    assert re.search(rf"^INFO: vzdump-hook: {VMID} +{db.name} +{down:.1f} +ok$", log, re.M), (down, log)
    assert re.search(rf"{VMID}: {db.name} ready \d+\.\d s after the start, down {down:.1f} s", log), log


def test_not_ready_in_time_is_reported_and_the_backup_is_ok(setup: HookSetup, test_guest: Any,
                                                            compose_project: Any) -> None:
    db = compose_project("db", {"app": "sleeper"})
    compose.up(db)
    never = setup.tmp / "never"
    setup.write({VMID: (test_guest, {"stacks": [{"name": db.name, "ready": {"command": ["test", "-e", str(never)]},
                                                 "ready_timeout": 2}], "stop_timeout": 5})})
    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.QEMU, Mode.SNAPSHOT)], extra_env=setup.env,
                     timeout=120)
    log = result.task_log()
    assert result.status is JobStatus.OK and all(r.returncode == 0 for r in result.records), log
    assert compose.running_services(db) == {"app"}
    assert re.search(rf"vzdump-hook: WARNING: .*{VMID}: {db.name} NOT READY within 2 s of its start", log), log
    assert re.search(rf"^INFO: vzdump-hook: {VMID} +{db.name} +\d+\.\d +ok, NOT READY: {db.name}$", log, re.M), log
    assert host_record(setup)["not_ready"] == [db.name]


def test_ready_healthy_waits_for_the_compose_healthcheck(setup: HookSetup, test_guest: Any,
                                                         compose_project: Any) -> None:
    flags = setup.tmp / "flags"
    flags.mkdir()
    health = {"test": ["CMD", "test", "-e", "/flags/ok"], "interval": "500ms", "timeout": "2s", "retries": 1}
    db = compose_project("db", {"app": {"kind": "sleeper", "healthcheck": health, "volumes": [f"{flags}:/flags"]}})
    (flags / "ok").write_text("")
    compose.up(db)
    setup.write({VMID: (test_guest, {"stacks": [{"name": db.name, "ready": {"healthy": True}, "ready_timeout": 30}],
                                     "stop_timeout": 5})})
    times: dict[str, float] = {}

    def on_phase(phase: str, ctx: Context) -> None:
        if phase == "pre-stop" and ctx.moment is Moment.AFTER_PHASE:
            (flags / "ok").unlink()  # unhealthy from its next start until the flag is back
        _flag_after_resume(flags / "ok", "pre-restart", 2.0, times)(phase, ctx)

    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=setup.env,
                     timeout=120, on_phase=on_phase)
    log = result.task_log()
    assert result.status is JobStatus.OK, log
    rec = host_record(setup)
    # docker says healthy at the first check after the flag (interval 0.5 s), the hook within a poll after that
    assert "flag" in times and times["flag"] <= rec["resumed_at"] < times["flag"] + 2.0, (rec, times, log)
    assert rec["not_ready"] == [], rec


def test_with_ready_the_downtime_starts_when_the_check_first_fails(setup: HookSetup, test_guest: Any,
                                                                   compose_project: Any) -> None:
    # the app ignores SIGTERM: it answers until it is killed when its 2 s stop timeout runs out
    db = compose_project("db", {"app": "stubborn"})
    compose.up(db)
    check = ["sh", "-c",
             f"docker ps -q --filter label=com.docker.compose.project={db.name} --filter status=running | grep -q ."]
    setup.write({VMID: (test_guest, {"stacks": [{"name": db.name, "ready": {"command": check}}], "stop_timeout": 2})})
    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=setup.env,
                     timeout=120)
    log = result.task_log()
    assert result.status is JobStatus.OK, log
    rec = host_record(setup)
    killed = container_times(db)["app"][1]  # when the engine saw it end
    assert rec["stop_started"] + 1.5 < rec["app_down_at"], (rec, killed)  # it answered through its stop timeout
    # first failed check: after the kill, within a look
    assert killed <= rec["app_down_at"] < killed + 1.0, (rec, killed)
    down = rec["resumed_at"] - rec["app_down_at"]
    assert re.search(rf"^INFO: vzdump-hook: {VMID} +{db.name} +{down:.1f} +ok, crash-consistent$", log,
                     re.M), (down, log)


def test_ready_url_is_asked_from_the_node(setup: HookSetup, test_guest: Any, compose_project: Any,
                                          tmp_path: Path) -> None:
    """`ready = { url = ... }`: a real HTTP server (python's http.server, its own process) answers 404
    until the file it serves appears, then 200."""
    import socket
    import sys

    db = compose_project("db", {"app": "sleeper"})
    compose.up(db)
    docroot = tmp_path / "www"
    docroot.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                               "--directory", str(docroot), str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import requests

        assert wait_until(lambda: _status(requests, f"http://127.0.0.1:{port}/health") == 404, 20), (
            "http.server did not come up")
        setup.write({VMID: (test_guest, {"stacks": [{"name": db.name, "ready": {"url": f"http://127.0.0.1:{port}/health"},
                                                     "ready_timeout": 30}],
                                         "stop_timeout": 5})})
        times: dict[str, float] = {}
        result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=setup.env,
                         timeout=120, on_phase=_flag_after_resume(docroot / "health", "pre-restart", 2.0, times),
                         transfer_seconds=4)
    finally:
        server.terminate()
        server.wait(10)
    log = result.task_log()
    assert result.status is JobStatus.OK, log
    rec = host_record(setup)
    assert "flag" in times and times["flag"] <= rec["resumed_at"] < times["flag"] + 1.0, (rec, times, log)
    assert rec["not_ready"] == [], rec


def _status(requests: Any, url: str) -> int:
    try:
        return int(requests.get(url, timeout=2).status_code)
    except requests.RequestException:
        return 0

