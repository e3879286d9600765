"""Stacks of kind systemd against a real systemd (PID 1 of a guest booted with systemd-nspawn), reached
with `pct exec` (the stand-in) as an LXC container is: GuestSession stops only the listed units that
are active, holds down the sockets and timers that would start them, writes the marker before the first
stop, reports units systemd had to kill, and starts exactly what it stopped.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.infra.pct_standin import make_pct
from tests.infra.systemd_guest import SystemdGuest, support_problem
from vzdump_hook import config as configuration
from vzdump_hook.guest import marker as markers
from vzdump_hook.guest.marker import StackRecord
from vzdump_hook.guest.session import GuestSession
from vzdump_hook.node.job import JobId
from vzdump_hook.stacks import Kind
from vzdump_hook.stacks.systemd import systemctl
from vzdump_hook.transports.base import Transport, shell_join

pytestmark = pytest.mark.integration

VMID = 181
SOCK = "/var/lib/vzdh/app.sock"
# ExecStop of the app keeps a copy of the marker as it is when systemd stops the app
MARKER_AT_STOP = "/var/lib/vzdh/marker-at-stop.json"
UNITS = {
    # (no start rate limit: the tests start it more often than 5 times in 10 s)
    "vzdh-app.service": "[Unit]\nStartLimitIntervalSec=0\n[Service]\nExecStart=/bin/sleep infinity\nRestart=always\n"
                        f"ExecStop=/bin/sh -c 'cp /var/lib/vzdump-hook/marker.json {MARKER_AT_STOP}; kill $MAINPID'\n"
                        "[Install]\nWantedBy=multi-user.target\n",
    "vzdh-sock.socket": f"[Socket]\nListenStream={SOCK}\n[Install]\nWantedBy=sockets.target\n",
    "vzdh-sock.service": "[Service]\nExecStart=/bin/sleep infinity\n",
    "vzdh-tick.timer": "[Timer]\nOnActiveSec=1h\n[Install]\nWantedBy=timers.target\n",
    "vzdh-tick.service": "[Service]\nType=oneshot\nExecStart=/bin/true\n",
    "vzdh-idle.service": "[Service]\nExecStart=/bin/sleep infinity\n",
    "vzdh-other.service": "[Service]\nExecStart=/bin/sleep infinity\n",  # in no stack
    # ignores SIGTERM: systemd kills it with SIGKILL once TimeoutStopSec= runs out
    "vzdh-stubborn.service": "[Service]\nExecStart=/bin/sh -c 'trap \"\" TERM; while :; do sleep 0.1; done'\n"
                             "TimeoutStopSec=1\n"
                             "[Install]\nWantedBy=multi-user.target\n",
}
ENABLE = ("vzdh-app.service", "vzdh-sock.socket", "vzdh-tick.timer", "vzdh-stubborn.service")
USER = "alice"  # a user with a manager of its own (lingering), whose --user units a stack lists
USER_UNITS = {
    "vzdh-uapp.service": "[Unit]\nStartLimitIntervalSec=0\n[Service]\nExecStart=/bin/sleep infinity\n"
                         "[Install]\nWantedBy=default.target\n",
    "vzdh-utick.timer": "[Timer]\nOnActiveSec=1h\n[Install]\nWantedBy=timers.target\n",
    "vzdh-utick.service": "[Service]\nType=oneshot\nExecStart=/bin/true\n",
}


def _with_user(root: Path) -> None:
    """A user `alice` who lingers (her manager starts at boot), with USER_UNITS enabled for her."""
    subprocess.run(["chroot", str(root), "useradd", "-m", "-u", "1500", USER], check=True, capture_output=True)
    (root / "var/lib/systemd/linger").mkdir(parents=True, exist_ok=True)
    (root / "var/lib/systemd/linger" / USER).write_text("")
    units = root / "etc/systemd/user"
    for name, text in USER_UNITS.items():
        (units / name).write_text(text)
    for name, target in (("vzdh-uapp.service", "default.target"), ("vzdh-utick.timer", "timers.target")):
        (units / f"{target}.wants").mkdir(exist_ok=True)
        (units / f"{target}.wants" / name).symlink_to(f"/etc/systemd/user/{name}")


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemdGuest]:
    problem = support_problem()
    if problem:
        pytest.skip(problem)
    g = SystemdGuest(VMID, tmp_path_factory.mktemp("sd"), UNITS, ENABLE, prepare=_with_user)
    g.ok(["mkdir", "-p", "/var/lib/vzdh"])
    try:
        yield g
    finally:
        g.close()


def controller(g: SystemdGuest, stacks: list[object], **over: object) -> GuestSession:
    table = {"transport": "pct", "pct": {"path": make_pct(g.workdir)}, "stacks": stacks, "stop_timeout": 10, **over}
    return GuestSession(configuration.validate_guest(VMID, table), JobId("node", "boot", 1, 1))


def ustate(g: SystemdGuest, unit: str) -> str:
    """ActiveState of one of alice's --user units, as her manager says."""
    return g.ok(["runuser", "-u", USER, "--", "env", "XDG_RUNTIME_DIR=/run/user/1500", "systemctl", "--user", "show",
                 "--property=ActiveState", "--value", "--", unit]).strip()


def soon(s: float = 120) -> float:
    return time.monotonic() + s


def connects(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


APP = {"kind": "systemd", "name": "app", "units": ["vzdh-app.service", "vzdh-sock.service", "vzdh-tick.service"]}
IDLE = {"kind": "systemd", "name": "idle", "units": ["vzdh-idle.service"]}
UAPP = {"kind": "systemd", "name": "uapp", "units": ["vzdh-uapp.service", "vzdh-utick.service"], "user": USER}


def test_user_units_are_stopped_and_started_by_the_users_manager(guest: SystemdGuest) -> None:
    assert [ustate(guest, u) for u in ("vzdh-uapp.service", "vzdh-utick.timer")] == ["active", "active"]
    ctl = controller(guest, [APP, UAPP])
    try:
        q = ctl.quiesce("lxc", "snapshot", soon())
        assert not q.errors and not q.killed
        app, uapp = q.stacks
        assert (uapp.user, uapp.units, uapp.triggers) == (USER, ("vzdh-uapp.service",), ("vzdh-utick.timer",))
        assert app.user == "" and app.units == ("vzdh-app.service",)
        assert [ustate(guest, u) for u in ("vzdh-uapp.service", "vzdh-utick.timer")] == ["inactive", "inactive"]
        assert guest.state("vzdh-app.service") == "inactive"
        written = markers.parse(guest.file("/var/lib/vzdump-hook/marker.json").read_bytes())
        assert written.stacks == q.stacks
        r = ctl.resume(soon())
        assert r.started == ("uapp", "app") and r.marker_removed, r.problems
        assert [ustate(guest, u) for u in ("vzdh-uapp.service", "vzdh-utick.timer")] == ["active", "active"]
        assert guest.state("vzdh-app.service") == "active"
    finally:
        ctl.close()


def test_stops_active_units_and_their_triggers_marker_first_then_starts_exactly_those(guest: SystemdGuest) -> None:
    assert [guest.state(u) for u in ("vzdh-app.service", "vzdh-sock.socket", "vzdh-sock.service",
                                     "vzdh-tick.timer")] == ["active", "active", "inactive", "active"]
    ctl = controller(guest, [APP, IDLE])
    try:
        p = ctl.preflight(soon())
        assert p.selected == ("app",) and p.missing == ("idle",) and p.compose == ()
        q = ctl.quiesce("lxc", "snapshot", soon())
        assert not q.errors and not q.killed
        (rec,) = q.stacks
        # vzdh-sock and vzdh-tick were not running
        assert rec.kind is Kind.SYSTEMD and rec.units == ("vzdh-app.service",)
        assert set(rec.triggers) == {"vzdh-sock.socket", "vzdh-tick.timer"}
        # during the window: the app is down, and neither its socket nor its timer can start anything
        assert [guest.state(u) for u in ("vzdh-app.service", "vzdh-sock.socket", "vzdh-tick.timer")] == ["inactive"] * 3
        assert not connects(guest.file(SOCK))
        assert guest.state("vzdh-sock.service") == "inactive"
        at_stop = markers.parse(guest.file(MARKER_AT_STOP).read_bytes())
        assert [s.units for s in at_stop.stacks] == [("vzdh-app.service",)] and at_stop.state == "stopping"
        written = markers.parse(guest.file("/var/lib/vzdump-hook/marker.json").read_bytes())
        assert written.stacks == q.stacks and written.state == "stopping"  # written once, before the stop

        r = ctl.resume(soon())
        assert r.started == ("app",) and not r.failed and r.marker_removed
        assert [guest.state(u) for u in ("vzdh-app.service", "vzdh-sock.socket", "vzdh-tick.timer")] == ["active"] * 3
        # listening again (this activates vzdh-sock.service, as it would without the hook)
        assert connects(guest.file(SOCK))
        assert guest.state("vzdh-idle.service") == "inactive"  # never started: it was not running
        assert not guest.file("/var/lib/vzdump-hook/marker.json").exists()
    finally:
        ctl.close()
        # the test's connection waits in the socket's queue (the service never accepts): a new socket
        guest.ok(["systemctl", "stop", "vzdh-sock.socket", "vzdh-sock.service"])
        guest.ok(["systemctl", "start", "vzdh-sock.socket"])


def test_a_unit_systemd_had_to_kill_is_reported_as_killed_and_started_again(guest: SystemdGuest) -> None:
    assert guest.state("vzdh-stubborn.service") == "active"
    ctl = controller(guest, [{"kind": "systemd", "name": "stubborn", "units": ["vzdh-stubborn.service"]}])
    try:
        q = ctl.quiesce("lxc", "snapshot", soon())
        assert q.killed == ("stubborn:vzdh-stubborn.service",)
        assert guest.state("vzdh-stubborn.service") == "failed"
        r = ctl.resume(soon())
        assert r.started == ("stubborn",) and r.marker_removed
        assert guest.state("vzdh-stubborn.service") == "active"
    finally:
        ctl.close()


def test_a_unit_that_will_not_start_stays_in_the_marker(guest: SystemdGuest) -> None:
    ctl = controller(guest, [APP])
    try:
        q = ctl.quiesce("lxc", "snapshot", soon())
        assert q.stacks[0].units == ("vzdh-app.service",)
        fail = "/run/systemd/system/vzdh-app.service.d"  # a drop-in that makes the start fail
        guest.ok(["sh", "-c", f"mkdir -p {fail} && printf '[Service]\\nExecStartPre=/bin/false\\n' > {fail}/fail.conf"
                              " && systemctl daemon-reload"])
        r = ctl.resume(soon())
        assert r.failed == ("app",) and r.marker_left and "vzdh-app.service" in r.problems[0]
        left = markers.parse(guest.file("/var/lib/vzdump-hook/marker.json").read_bytes())
        assert [s.name for s in left.stacks] == ["app"] and left.stacks[0].triggers == q.stacks[0].triggers
        guest.ok(["sh", "-c", f"rm -r {fail} && systemctl daemon-reload"])
        r = ctl.resume(soon())
        assert r.started == ("app",) and r.marker_removed
        assert guest.state("vzdh-app.service") == "active"
    finally:
        ctl.close()


def test_a_unit_that_does_not_exist_is_missing_and_nothing_else_changes(guest: SystemdGuest) -> None:
    ctl = controller(guest, [{"kind": "systemd", "name": "ghost", "units": ["vzdh-no-such.service"]}])
    try:
        p = ctl.preflight(soon())
        assert p.selected == () and p.missing == ()  # not "left alone": it does not exist
        assert p.absent == (f"guests.{VMID}.stacks[0].units[0]: unit 'vzdh-no-such.service' does not exist "
                            "in the guest (stack ghost)",), p.absent
        q = ctl.quiesce("lxc", "snapshot", soon())
        assert q.stacks == ()
        assert not guest.file("/var/lib/vzdump-hook/marker.json").exists()
    finally:
        ctl.close()


# -- the restricted key's wrapper and the guest's recovery program, against the same systemd ----------

REPO = Path(__file__).resolve().parents[2]
WRAPPER = "/usr/local/sbin/vzdump-hook-wrapper"
RECOVER = "/usr/local/sbin/vzdump-hook-recover"
CONF = "/etc/vzdump-hook/guest.conf"
WLOG = "/var/log/vzdh-wrapper.log"
ALLOWED = ("vzdh-app.service", "vzdh-sock.service", "vzdh-tick.service", "vzdh-idle.service")


class WrapperTransport(Transport):
    """Each argv as sshd runs a forced command in the guest: the wrapper, SSH_ORIGINAL_COMMAND set to the
    line the ssh transport sends."""

    name = "wrapper"

    def __init__(self, g: SystemdGuest) -> None:
        super().__init__(f"wrapper in ct{g.vmid}")
        self.g = g

    def _exec(self, argv: Sequence[str], stdin: bytes | None, timeout: float) -> tuple[int, bytes, bytes]:
        p = self.g.run(["sh", WRAPPER, "--conf", CONF], input=stdin or b"", timeout=timeout,
                       env={"SSH_ORIGINAL_COMMAND": shell_join(argv), "SSH_CONNECTION": "10.0.0.1 5555 10.0.0.2 22"})
        return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def guest_files(guest: SystemdGuest) -> SystemdGuest:
    for src, dst in (("vzdump-hook-wrapper", WRAPPER), ("vzdump-hook-recover", RECOVER)):
        shutil.copy(REPO / "examples" / "guest" / src, guest.file(dst))
        guest.file(dst).chmod(0o755)
    guest.file(CONF).parent.mkdir(parents=True, exist_ok=True)
    guest.file(CONF).write_text(f"MARKER=/var/lib/vzdump-hook/marker.json\nVMID={VMID}\nLOG={WLOG}\nDEADLINE_GRACE=0\n"
                                f"KINDS=systemd\nUNITS={' '.join(ALLOWED)}\nSYSTEMD_USER={USER}\n"
                                "USER_UNITS=vzdh-uapp.service vzdh-utick.service\n")
    return guest


def forced(g: SystemdGuest, command: str) -> subprocess.CompletedProcess[bytes]:
    return g.run(["sh", WRAPPER, "--conf", CONF], env={"SSH_ORIGINAL_COMMAND": command})


def test_the_hook_quiesces_and_resumes_through_the_wrapper(guest_files: SystemdGuest) -> None:
    g = guest_files
    guest = configuration.validate_guest(VMID, {"ssh": {"host": "192.0.2.1"}, "stacks": [APP, IDLE, UAPP],
                                                "stop_timeout": 10})
    ctl = GuestSession(guest, JobId("node", "boot", 1, 1), transport=WrapperTransport(g))
    q = ctl.quiesce("lxc", "snapshot", soon())
    assert not q.errors and [s.units for s in q.stacks] == [("vzdh-app.service",), ("vzdh-uapp.service",)]
    assert [g.state(u) for u in ("vzdh-app.service", "vzdh-sock.socket", "vzdh-tick.timer")] == ["inactive"] * 3
    assert [ustate(g, u) for u in ("vzdh-uapp.service", "vzdh-utick.timer")] == ["inactive", "inactive"]
    r = ctl.resume(soon())
    assert r.started == ("uapp", "app") and r.marker_removed, r.problems
    assert [g.state(u) for u in ("vzdh-app.service", "vzdh-sock.socket", "vzdh-tick.timer")] == ["active"] * 3
    assert [ustate(g, u) for u in ("vzdh-uapp.service", "vzdh-utick.timer")] == ["active", "active"]
    lines = g.file(WLOG).read_text().splitlines()
    assert not [ln for ln in lines if "REFUSED" in ln], lines
    assert any("allowed: systemctl stop vzdh-sock.socket vzdh-tick.timer vzdh-app.service" in ln or
               "allowed: systemctl stop vzdh-tick.timer vzdh-sock.socket vzdh-app.service" in ln for ln in lines), lines


@pytest.mark.parametrize(
    ("command", "why"),
    [
        ("systemctl stop -- systemd-journald.service", "not one of the units UNITS"),
        ("systemctl start -- vzdh-other.service", "not one of the units UNITS"),  # exists, but in no stack
        ("systemctl stop -- systemd-journald.socket", "does not trigger a unit UNITS"),
        ("systemctl restart -- vzdh-app.service", "not one of vzdump-hook's commands"),
        ("systemctl stop vzdh-app.service", "not one of vzdump-hook's commands"),
        ("systemctl stop -- 'vzdh-app.service;reboot'", "not a unit name"),
        ("systemctl stop -- --no-block", "not a unit name"),
        ("systemctl stop -- ", "no unit"),
        ("systemctl show --property=ExecStart -- vzdh-app.service", "not one of vzdump-hook's commands"),
        ("docker ps --no-trunc -q", "this guest has no compose stacks"),
        (shell_join(systemctl("bob", "stop", "--", "vzdh-uapp.service")), "--user units of bob are not allowed"),
        (shell_join(systemctl("root", "stop", "--", "vzdh-app.service")), "not a user name"),
        (shell_join(systemctl(USER, "stop", "--", "vzdh-app.service")), "not one of the units USER_UNITS"),
        (shell_join(systemctl(USER, "stop", "--", "vzdh-utick.timer", "vzdh-sock.socket")),
         "does not trigger a unit USER_UNITS"),
        (shell_join(systemctl(USER, "restart", "--", "vzdh-uapp.service")), "not one of vzdump-hook's commands"),
        (shell_join(systemctl(USER, "stop", "--", "vzdh-uapp.service")).replace("--user", "--system"),
         "not one of vzdump-hook's commands"),
    ],
)
def test_the_wrapper_refuses_what_the_settings_do_not_allow(guest_files: SystemdGuest, command: str, why: str) -> None:
    p = forced(guest_files, command)
    assert p.returncode == 126 and why in p.stderr.decode(), p
    assert (guest_files.state("vzdh-app.service") == "active"
            and guest_files.state("systemd-journald.service") == "active")
    assert guest_files.state("vzdh-other.service") == "inactive"
    assert ustate(guest_files, "vzdh-uapp.service") == "active"


def test_the_recovery_program_starts_what_the_marker_lists(guest_files: SystemdGuest) -> None:
    g = guest_files
    ctl = controller(g, [APP, UAPP])
    try:
        q = ctl.quiesce("lxc", "snapshot", soon())
        assert q.stacks and g.state("vzdh-app.service") == "inactive"
    finally:
        ctl.close()
    check = g.run(["sh", RECOVER, "--conf", CONF, "--check"])
    # deadline ahead, this boot
    assert check.returncode == 0 and b"the node is at work, nothing to do" in check.stdout, check
    p = g.run(["sh", RECOVER, "--conf", CONF, "--force"])
    assert p.returncode == 0 and b"started uapp, app; marker removed" in p.stdout, p
    assert [g.state(u) for u in ("vzdh-app.service", "vzdh-sock.socket", "vzdh-tick.timer")] == ["active"] * 3
    assert [ustate(g, u) for u in ("vzdh-uapp.service", "vzdh-utick.timer")] == ["active", "active"]
    assert g.state("vzdh-sock.service") == "inactive" and not g.file("/var/lib/vzdump-hook/marker.json").exists()


@pytest.mark.parametrize(
    ("stack", "why"),
    [
        (StackRecord.systemd("x", ("vzdh-other.service",)), "vzdh-other.service is not one of the units UNITS"),
        (StackRecord.systemd("x", ("vzdh-app.service",), ("systemd-journald.socket",)),
         "systemd-journald.socket does not trigger a unit UNITS"),
        (StackRecord.systemd("x", ("vzdh-app.service",), user=USER),
         "vzdh-app.service is not one of the units USER_UNITS"),
        (StackRecord.systemd("x", ("vzdh-uapp.service",), user="bob"), "--user units of bob: SYSTEMD_USER"),
    ],
)
def test_the_recovery_program_starts_nothing_of_a_marker_listing_what_the_settings_do_not_allow(
        guest_files: SystemdGuest, stack: StackRecord, why: str) -> None:
    g = guest_files
    g.ok(["systemctl", "stop", "vzdh-app.service", "systemd-journald.socket"])
    try:
        m = markers.Marker(JobId("node", "boot", 1, 1), VMID, "lxc", "snapshot", 1700000000.0, 1700000600.0, "stopped",
                           (stack,))
        g.file("/var/lib/vzdump-hook/marker.json").write_bytes(m.to_json())
        g.file("/var/lib/vzdump-hook/marker.json").chmod(0o600)
        p = g.run(["sh", RECOVER, "--conf", CONF])
        assert p.returncode == 2 and why.encode() in p.stderr, p
        assert g.state("vzdh-app.service") == "inactive" and g.state("vzdh-other.service") == "inactive"
        assert g.state("systemd-journald.socket") == "inactive"
        assert g.file("/var/lib/vzdump-hook/marker.json").exists()
    finally:
        g.file("/var/lib/vzdump-hook/marker.json").unlink(missing_ok=True)
        g.ok(["systemctl", "start", "vzdh-app.service", "systemd-journald.socket"])


# -- the admin commands on a guest with systemd stacks --------------------------------------------------


def test_check_simulate_status_and_recover_on_systemd_stacks(guest: SystemdGuest, tmp_path: Path) -> None:
    from tests.integration.hookenv import installed_hook

    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[hook]\npve_dir = "{tmp_path / "pve"}"\n[guests.{VMID}]\ntransport = "pct"\n'
                   f'pct = {{ path = "{make_pct(guest.workdir)}" }}\n'
                   'stacks = [{ kind = "systemd", name = "app", '
                   'units = ["vzdh-app.service", "vzdh-sock.service", "vzdh-tick.service"] },'
                   ' { kind = "systemd", name = "idle", units = ["vzdh-idle.service", "vzdh-typo.service"] }]\n')
    env = {"VZDUMP_HOOK_CONFIG": str(cfg), "VZDUMP_HOOK_RUN_DIR": str(tmp_path / "run"),
           "VZDUMP_HOOK_STATE_DIR": str(tmp_path / "state"), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([installed_hook(), *args], env=env, capture_output=True, text=True, timeout=120, cwd="/")

    out = admin("check", str(VMID)).stdout
    assert f"{VMID} pct {VMID}: ok in" in out and "compose: not used" in out, out
    assert "running stacks: app" in out and "a backup stops: app" in out, out
    # the one unit of idle that systemd does not know is named with its key; the other exists (stopped)
    assert (f"DOES NOT EXIST: guests.{VMID}.stacks[1].units[1]: unit 'vzdh-typo.service' does not exist in the guest "
            "(stack idle)" in out), out
    sim = admin("simulate", str(VMID), "--type", "lxc", "--pause", "0.5", "-y")
    assert sim.returncode == 0 and f"pre-stop {VMID}: stopped app" in sim.stdout + sim.stderr, sim.stdout + sim.stderr
    # the guest side is not current here, but an enabled unit starts at the restored guest's boot: no
    # restore note for it (the note is for containers stopped by hand)
    assert "guest side: recovery OUTDATED" in out and "restore of this backup" not in sim.stdout + sim.stderr, (
        out + sim.stdout + sim.stderr)
    assert [guest.state(u) for u in ("vzdh-app.service", "vzdh-sock.socket", "vzdh-tick.timer")] == ["active"] * 3
    assert not guest.file("/var/lib/vzdump-hook/marker.json").exists()
    ctl = controller(guest, [APP, IDLE])
    try:
        assert ctl.quiesce("lxc", "snapshot", soon()).stacks
    finally:
        ctl.close()
    assert guest.state("vzdh-app.service") == "inactive"
    st = admin("status")
    assert f"{VMID}: MARKER of job node/1" in st.stdout and "): app;" in st.stdout, st.stdout + st.stderr
    r = admin("recover", "--force", str(VMID))
    assert r.returncode == 0, r.stdout + r.stderr
    assert [guest.state(u) for u in ("vzdh-app.service", "vzdh-sock.socket", "vzdh-tick.timer")] == ["active"] * 3
    assert (guest.state("vzdh-idle.service") == "inactive"
            and not guest.file("/var/lib/vzdump-hook/marker.json").exists())
