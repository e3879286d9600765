"""The installed hook, run as vzdump runs it (tests/infra/vzdump.py: empty environment, one process per
phase), against a real LXC container reached through `pct` (lxc-attach), whose compose stacks run on the
container's own Docker engine. vzdump's freeze and thaw are the real cgroup freezer (lxc-freeze and
lxc-unfreeze, plugged into the stand-in's on_guest_suspend/on_guest_resume): in suspend mode from after
pre-stop until after pre-restart, in snapshot mode around the storage snapshot (pve-guest-common's
snapshot_create), with two volumes from after pre-stop.

Checked: the stacks are down at the point in time with the marker in the container's /var/lib; every
pct call of the hook (phases and resident alike, one call log) ran outside the frozen window; the stacks
are started after the thaw, during the phase docs/how-it-works.md names; the marker is gone and the job is ok.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.infra.compose import ComposeProject
from tests.infra.lxc_ct import LxcContainer
from tests.infra.vzdump import Context, GuestSpec, GuestType, JobStatus, Mode, Moment, WorkerKilled, run_job
from tests.integration.hookenv import installed_hook, toml_value, wait_until
from tests.lxc.conftest import VMID, CtCompose, Pct, in_flight
from vzdump_hook.guest import marker as markers
from vzdump_hook.resident.client import tell

pytestmark = pytest.mark.integration

MARKER = "/var/lib/vzdump-hook/marker.json"


def epoch(stamp: str) -> float:
    """docker's RFC 3339 time with nanoseconds, as epoch seconds."""
    day, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(day + "+00:00").timestamp() + float("0." + (frac or "0"))


def problems(log: str) -> list[str]:
    """vzdump's WARN/ERROR lines and the hook's WARNING/ERROR lines, but for the note that the guest side is
    not installed (the tests do not install it)."""
    return [line for line in log.splitlines() if line.startswith(("ERROR", "WARN"))
            or (("vzdump-hook: WARNING" in line or "vzdump-hook: ERROR" in line)
                and "recovery NOT INSTALLED" not in line)]


class Vzdump:
    """What the stand-in's vzdump does to the CT, with the real freezer, and what is seen when (epoch s)."""

    def __init__(self, ct: LxcContainer, ctc: CtCompose, projects: list[ComposeProject]) -> None:
        self.ct, self.ctc = ct, ctc
        self.ids = {str(c["Id"]) for p in projects for c in ctc.containers(p)}
        self.windows: list[tuple[float, float]] = []  # (freeze began, thaw done)
        self.phases: dict[str, list[float]] = {}  # phase -> [before, after] of its first run
        self.pit_state = ""
        self.pit_running: set[str] = set()  # ids of stack containers with processes at the point in time
        self.pit_marker: bytes | None = None
        self._frozen_since = 0.0

    def suspend(self, ctx: Context) -> None:
        began = time.time()
        self.ct.freeze()
        self._frozen_since = began

    def resume(self, ctx: Context) -> None:
        self.ct.unfreeze()
        self.windows.append((self._frozen_since, time.time()))

    def point_in_time(self, ctx: Context) -> None:
        """Seen from the host only: the CT is frozen here (every LXC mode)."""
        self.pit_state = self.ct.state()
        top = self.ct.freezer()
        for cid in self.ids:
            for d in top.rglob(cid):
                if d.is_dir() and (d / "cgroup.procs").read_text().split():
                    self.pit_running.add(cid)
        m = self.ct.file(MARKER)
        self.pit_marker = m.read_bytes() if m.exists() else None

    def on_phase(self, phase: str, ctx: Context) -> None:
        if ctx.moment is Moment.BEFORE_PHASE:
            self.phases.setdefault(phase, [time.time(), 0.0])
        elif self.phases[phase][1] == 0.0:
            self.phases[phase][1] = time.time()


@pytest.mark.parametrize(("mode", "volumes", "start_phase"), [
    (Mode.SUSPEND, 1, "post-restart"),  # the CT is thawed only after pre-restart
    (Mode.SNAPSHOT, 1, "pre-restart"),  # snapshot_create thawed it after the snapshot
    (Mode.SNAPSHOT, 2, "pre-restart"),  # vzdump's own freeze from after pre-stop, ended by that thaw
], ids=["suspend", "snapshot", "snapshot-2-volumes"])
def test_the_hook_never_sends_a_command_into_the_frozen_container(ct: LxcContainer, ct_compose: CtCompose, pct: Pct,
                                                                 tmp_path: Path, mode: Mode, volumes: int,
                                                                 start_phase: str) -> None:
    db = ct_compose.make("db", {"app": "sleeper", "side": "sleeper"})
    web = ct_compose.make("web", {"app": "sleeper"})
    table = {"transport": "pct", "pct": {"path": pct.path}, "stacks": [db.name, web.name], "stop_timeout": 10}
    config = tmp_path / "config.toml"
    config.write_text(f"[hook]\npve_dir = {toml_value(str(tmp_path / 'pve'))}\n[guests.{VMID}]\n"
                      + "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items()))
    env = {"VZDUMP_HOOK_CONFIG": str(config), "VZDUMP_HOOK_RUN_DIR": str(tmp_path / "run"),
           "VZDUMP_HOOK_STATE_DIR": str(tmp_path / "state")}
    vz = Vzdump(ct, ct_compose, [db, web])
    assert len(vz.ids) == 3

    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, mode, volumes=volumes)], extra_env=env,
                     timeout=120, on_guest_suspend=vz.suspend, on_guest_resume=vz.resume,
                     on_point_in_time=vz.point_in_time, on_phase=vz.on_phase)
    log = result.task_log()
    assert result.status is JobStatus.OK, log
    assert problems(log) == [], log

    # at the point in time: frozen, every stack container without a process, the marker in the CT listing both
    assert vz.pit_state == "FROZEN"
    assert vz.pit_running == set(), log
    assert vz.pit_marker is not None
    assert [s.name for s in markers.parse(vz.pit_marker).stacks] == [db.name, web.name]

    # not one pct call (of the phases or of the resident) was in flight while the CT was frozen
    (window,) = vz.windows
    calls = pct.calls()
    assert in_flight(calls, *window) == [], log
    # the compose stops ended before the freeze, the starts began after the thaw
    def compose_calls(verb: str) -> dict[str, dict[str, object]]:
        return {a[a.index("-p") + 1]: c for c in calls if "compose" in (a := list(c["argv"])) and verb in a}  # type: ignore[call-overload]

    stops, starts = compose_calls("stop"), compose_calls("start")
    assert set(stops) == set(starts) == {db.name, web.name}, calls
    assert all(c["status"] == 0 and float(c["end"]) < window[0] for c in stops.values())  # type: ignore[arg-type]
    assert all(c["status"] == 0 and float(c["time"]) > window[1] for c in starts.values())  # type: ignore[arg-type]

    # started again after the thaw, from the phase docs/how-it-works.md names on; nothing left behind
    assert ct_compose.running(db) == {"app", "side"} and ct_compose.running(web) == {"app"}
    started = [epoch(str(c["State"]["StartedAt"])) for p in (db, web) for c in ct_compose.containers(p)]  # type: ignore[index]
    assert min(started) > window[1]
    began, ended = vz.phases[start_phase]
    assert all(began <= float(c["time"]) and float(c["end"]) <= ended for c in starts.values()), (starts, vz.phases)  # type: ignore[arg-type]
    assert min(started) > began, (started, vz.phases)
    assert not ct.file(MARKER).exists()


def _config(tmp_path: Path, pct: Pct, stacks: list[str], hook: str = "") -> dict[str, str]:
    config = tmp_path / "config.toml"
    config.write_text(f"[hook]\npve_dir = {toml_value(str(tmp_path / 'pve'))}\n{hook}\n"
                      f"[guests.{VMID}]\ntransport = \"pct\"\npct = {toml_value({'path': pct.path})}\n"
                      f"stacks = {toml_value(stacks)}\nstop_timeout = 10\n")
    return {"VZDUMP_HOOK_CONFIG": str(config), "VZDUMP_HOOK_RUN_DIR": str(tmp_path / "run"),
            "VZDUMP_HOOK_STATE_DIR": str(tmp_path / "state")}


def test_a_chained_script_failing_in_pre_restart_does_not_leave_the_ct_frozen(ct: LxcContainer, ct_compose: CtCompose,
                                                                              pct: Pct, tmp_path: Path) -> None:
    """vzdump clears its resume flag before pre-restart in suspend mode: a failing pre-restart would leave
    the CT frozen for good (found here first, with the real freezer). The hook reports the chained
    script's failure and exits 0, so vzdump thaws the CT and the stacks start at post-restart."""
    db = ct_compose.make("db", {"app": "sleeper"})
    chain = tmp_path / "chain.sh"
    chain.write_text('#!/bin/sh\n[ "$1" = pre-restart ] && exit 1\nexit 0\n')
    chain.chmod(0o755)
    env = _config(tmp_path, pct, [db.name], hook=f"chain = {toml_value([str(chain)])}")
    vz = Vzdump(ct, ct_compose, [db])
    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SUSPEND)], extra_env=env, timeout=120,
                     on_guest_suspend=vz.suspend, on_guest_resume=vz.resume, on_phase=vz.on_phase)
    log = result.task_log()
    assert result.phases(VMID) == ["backup-start", "pre-stop", "pre-restart", "post-restart", "backup-end",
                                   "log-end"], log
    assert f"pre-restart {VMID}: a chained script failed (exit 1); not passed on to vzdump" in log, log
    (window,) = vz.windows  # frozen once, and thawed
    assert ct.state() == "RUNNING" and in_flight(pct.calls(), *window) == [], log
    assert ct_compose.running(db) == {"app"}, log


def test_a_ct_left_frozen_gets_no_command_until_it_is_thawed(ct: LxcContainer, ct_compose: CtCompose, pct: Pct,
                                                             tmp_path: Path) -> None:
    """The vzdump worker dies while the CT is frozen (suspend mode): nobody thaws it. The guest's
    resident sees the worker gone and would start the stacks, but sends nothing into the frozen CT (a
    command would hang there); once the CT is thawed, its next try starts them."""
    db = ct_compose.make("db", {"app": "sleeper"})
    env = _config(tmp_path, pct, [db.name])
    vz = Vzdump(ct, ct_compose, [db])

    def suspend_and_die(ctx: Context) -> None:
        vz.suspend(ctx)
        raise WorkerKilled

    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SUSPEND)], extra_env=env, timeout=120,
                     on_guest_suspend=suspend_and_die, on_phase=vz.on_phase)
    log = result.task_log()
    assert result.status is JobStatus.KILLED and ct.state() == "FROZEN", log
    frozen_at = vz._frozen_since
    # the resident tries (1, 2, 4 s apart) while the CT stays frozen: ask it ("" : only how it is) until it tried twice
    job_dir = str(next((tmp_path / "run").rglob(f"resident-{VMID}.json")).parent)
    said: list[str] = []

    def tried_twice() -> bool:
        answer = tell(job_dir, VMID, "") or {}
        said.extend(str(text) for _, text in answer.get("lines", ()))
        return sum("frozen" in t for t in said) >= 2

    assert wait_until(tried_twice, 30), said
    calls_while_frozen = [c for c in pct.calls() if float(c["time"]) > frozen_at]  # type: ignore[arg-type]
    assert calls_while_frozen == [], calls_while_frozen
    thawed = time.time()
    ct.unfreeze()
    assert wait_until(lambda: ct_compose.running(db) == {"app"}, 30), said
    assert all(float(c["time"]) > thawed for c in pct.calls() if float(c["time"]) > frozen_at)  # type: ignore[arg-type]
    assert wait_until(lambda: not ct.file(MARKER).exists(), 10)



def test_stop_mode_the_stacks_start_once_the_rebooted_container_answers(ct: LxcContainer, ct_compose: CtCompose,
                                                                        pct: Pct, tmp_path: Path) -> None:
    """vzdump shuts the CT down after pre-stop and starts it in its clean-up between pre-restart and
    post-restart, with lxc-start returning before the CT's systemd and dockerd are up: the hook's
    post-restart starts the stacks once the CT answers."""
    db = ct_compose.make("db", {"app": "sleeper"})
    table = {"transport": "pct", "pct": {"path": pct.path}, "stacks": [db.name], "stop_timeout": 10}
    config = tmp_path / "config.toml"
    config.write_text(f"[hook]\npve_dir = {toml_value(str(tmp_path / 'pve'))}\n[guests.{VMID}]\n"
                      + "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items()))
    env = {"VZDUMP_HOOK_CONFIG": str(config), "VZDUMP_HOOK_RUN_DIR": str(tmp_path / "run"),
           "VZDUMP_HOOK_STATE_DIR": str(tmp_path / "state")}
    vz = Vzdump(ct, ct_compose, [db])
    seen: dict[str, object] = {}

    def shutdown(ctx: Context) -> None:
        ct.stop(clean=True)
        seen["state at the point in time"] = ct.state()

    def boot(ctx: Context) -> None:
        ct.boot()
        seen["booted"] = time.time()

    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.STOP)], extra_env=env, timeout=180,
                     on_guest_shutdown=shutdown, on_guest_start=boot, on_phase=vz.on_phase)
    log = result.task_log()
    assert result.status is JobStatus.OK, log
    assert problems(log) == [], log
    assert seen["state at the point in time"] == "STOPPED"
    (stop,) = [c for c in pct.calls() if "compose" in c["argv"] and "stop" in c["argv"]]  # type: ignore[operator]
    assert stop["status"] == 0 and float(stop["end"]) <= vz.phases["pre-stop"][1]  # type: ignore[arg-type]
    assert result.phases(VMID) == ["backup-start", "pre-stop", "backup-end", "pre-restart", "post-restart", "log-end"]
    assert ct_compose.running(db) == {"app"}, log
    (started,) = [epoch(str(c["State"]["StartedAt"])) for c in ct_compose.containers(db)]  # type: ignore[index]
    assert vz.phases["post-restart"][0] <= started <= vz.phases["post-restart"][1], (started, vz.phases)
    assert float(seen["booted"]) < started  # type: ignore[arg-type]
    assert not ct.file(MARKER).exists()
