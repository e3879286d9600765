"""The node's key restricted to examples/guest/vzdump-hook-wrapper (authorized_keys `command=`), against
OpenSSH's sshd in the test guest, a real Docker engine and real compose projects: the installed hook
runs whole backups through it unchanged; anything else is refused; `vzdump-hook guest install` sets it
up (and the recovery files), idempotently, and `check` reports it."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.infra import compose
from tests.infra.guest import TestGuest
from tests.infra.vzdump import Context, GuestSpec, GuestType, JobStatus, Mode, run_job
from tests.integration.hookenv import HookSetup, installed_hook, running
from vzdump_hook import config as configuration
from vzdump_hook.errors import TransportError
from vzdump_hook.guest.marker import Marker
from vzdump_hook.node.job import JobId
from vzdump_hook.stacks import compose as compose_mod
from vzdump_hook.transports import base
from vzdump_hook.transports.base import sh
from vzdump_hook.transports.ssh import SshTransport

pytestmark = pytest.mark.integration

VMID = 101
REPO = Path(__file__).resolve().parents[2]
WRAPPER = REPO / "examples" / "guest" / "vzdump-hook-wrapper"
SHELLS = {"dash": "dash", "busybox": "busybox sh"}


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True)
    return str(path)


class Restricted:
    """A second key for the test guest, bound to the wrapper by a `command=` line in its authorized_keys."""

    def __init__(self, guest: TestGuest, setup: HookSetup, shell: str) -> None:
        self.guest = guest
        self.shell = shell
        self.key = keygen(guest.workdir / "restricted_key")
        self.log = guest.workdir / "wrapper.log"
        self.marker = guest.workdir / "marker.json"  # where HookSetup.write puts the marker of its guests
        self.conf = guest.workdir / "guest.conf"
        self.conf.write_text(f"MARKER={self.marker}\nLOG={self.log}\nROOT={guest.workdir / 'root'}\n")
        pub = Path(self.key + ".pub").read_text().strip()
        with open(guest.workdir / "authorized_keys", "a") as f:
            f.write(f'command="{SHELLS[shell]} {WRAPPER} --conf {self.conf}",restrict {pub}\n')

    def ssh(self, *command: str, stdin: bytes = b"", extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[bytes]:
        argv = self.guest.ssh_argv(*command)
        argv[argv.index(self.guest.identity_file)] = self.key
        argv[1:1] = list(extra)
        return subprocess.run(argv, input=stdin, capture_output=True, timeout=60)

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def setup(tmp_path: Path) -> HookSetup:
    return HookSetup(tmp_path)


@pytest.fixture(params=sorted(SHELLS))
def restricted(request: pytest.FixtureRequest, test_guest: TestGuest, setup: HookSetup) -> Restricted:
    return Restricted(test_guest, setup, str(request.param))


def admin(setup: HookSetup, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([installed_hook(), *args], env=setup.env | {"PATH": "/usr/bin:/bin"} | (env or {}),
                          capture_output=True, text=True, timeout=180)


def test_the_hook_runs_a_whole_backup_through_the_restricted_key(restricted: Restricted, setup: HookSetup,
                                                                 test_guest: TestGuest, compose_project: Any) -> None:
    version = "v1" if restricted.shell == "busybox" else "v2"  # v1 labels its config files differently
    db = compose_project("db", {"app": "sleeper", "worker": "sleeper"}, compose=version)
    web = compose_project("web", {"app": "sleeper"}, compose=version)
    other = compose_project("other", {"app": "sleeper"}, compose=version)
    for p in (db, web, other):
        compose.up(p)
    setup.write({VMID: (test_guest, {"stacks": [db.name, web.name], "ssh": {"identity_file": restricted.key}})})
    at_pit: dict[str, Any] = {}

    def pit(ctx: Context) -> None:
        at_pit["running"] = running([db, web, other])
        at_pit["marker"] = restricted.marker.exists()

    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.QEMU, Mode.SNAPSHOT)], extra_env=setup.env,
                     on_point_in_time=pit, timeout=120)
    log = result.task_log()
    assert result.status is JobStatus.OK, log
    assert at_pit == {"running": {db.name: False, web.name: False, other.name: True}, "marker": True}, log
    assert all(running([db, web, other]).values()) and not restricted.marker.exists()
    lines = restricted.log_lines()
    assert not [ln for ln in lines if "REFUSED" in ln], lines
    assert any(f"allowed: compose stop -t 30: {db.name}" in ln for ln in lines), lines
    starts = [ln.split("allowed: compose start ", 1)[1] for ln in lines if "allowed: compose start " in ln]
    assert (sorted(starts) == sorted([f"app worker: {db.name}", f"app: {web.name}"])
            or sorted(starts) == sorted([f"worker app: {db.name}", f"app: {web.name}"])), lines
    assert all(f"from {test_guest.host_side_ip}:" in ln for ln in lines), lines

    # the admin commands work through it too, and check says the key is restricted
    r = admin(setup, "check")
    assert r.returncode == 1, r.stdout + r.stderr  # the wrapper alone: no current recovery program, a problem for check
    assert "recovery current" not in r.stdout and "node key restricted to the wrapper (current)" in r.stdout, r.stdout
    assert f"a backup stops: {db.name}, {web.name}" in r.stdout


def test_the_hooks_transport_moves_the_marker_and_nothing_else(restricted: Restricted, test_guest: TestGuest) -> None:
    g = configuration.validate_guest(VMID, {"ssh": {"host": test_guest.host, "identity_file": restricted.key,
                                                    "known_hosts": test_guest.known_hosts_file}})
    assert g.ssh is not None
    with SshTransport(g.ssh) as t:
        t.connect(10)
        data = Marker(JobId("pve1", "b", 1, 2), VMID, "qemu", "snapshot", 1700000000.0, 1700000060.0, "stopped",
                      ()).to_json()
        t.write_file(str(restricted.marker), data, timeout=10)
        assert t.read_file(str(restricted.marker), limit=1000, timeout=10) == data
        with pytest.raises(TransportError, match="refused: write: invalid marker"):  # only a valid marker (issue 9)
            t.write_file(str(restricted.marker), b'{"m": 1}\n', timeout=10)
        assert restricted.marker.read_bytes() == data
        t.remove_file(str(restricted.marker), timeout=10)
        assert t.read_file(str(restricted.marker), limit=100, timeout=10) is None
        other = test_guest.workdir / "other.json"
        with pytest.raises(TransportError, match="refused: write: only the marker"):
            t.write_file(str(other), b"x", timeout=10)
        assert not other.exists()
        r = t.run(["id"], timeout=10)
        assert r.exit_status == 126 and "refused: not one of vzdump-hook's commands" in r.stderr


def refused_cases(r: Restricted, sentinel: Path) -> dict[str, tuple[str, ...]]:
    s = shlex.quote(str(sentinel))
    marker = str(r.marker)
    return {
        "plain command": (f"touch {s}",),
        "after true": (f"true; touch {s}",),
        "and-and": (f"true && touch {s}",),
        "command substitution": (f"$(touch {s})",),
        "backticks": (f"`touch {s}`",),
        "newline": (f"true\ntouch {s}",),
        "sh -c": (shlex.join(["sh", "-c", f"touch {s}"]),),
        "write elsewhere": (shlex.join(sh(base._WRITE_SCRIPT, str(sentinel))),),
        "write marker dir escape": (shlex.join(sh(base._WRITE_SCRIPT, marker + "/../" + sentinel.name)),),
        "write marker and more": (shlex.join(sh(base._WRITE_SCRIPT, marker)) + f"; touch {s}",),
        "read elsewhere": (shlex.join(sh(base._READ_SCRIPT, "/etc/shadow", "100")),),
        "remove elsewhere": (shlex.join(sh(base._REMOVE_SCRIPT, "/etc/hostname")),),
        "unknown stack": (shlex.join(sh(compose_mod._IN_DIR, "/", "docker", "compose", "-p", "no-such-stack",
                                        "start")),),
        "docker run": ("docker run --rm -v /:/host vzdh/busybox:test touch /host" + s,),
        "inspect non-hex": (f"docker inspect --format '{{{{.Id}}}} {{{{.State.Running}}}} {{{{.State.Restarting}}}} "
                            f"{{{{.State.ExitCode}}}}' $(touch {s})",),
    }


def test_anything_else_is_refused_over_ssh(restricted: Restricted, compose_project: Any) -> None:
    db = compose_project("db", {"app": "sleeper"})
    compose.up(db)
    sentinel = restricted.guest.workdir / "pwned"
    cases = refused_cases(restricted, sentinel)
    cases["compose down of a real stack"] = (shlex.join(sh(compose_mod._IN_DIR, str(db.workdir), "docker", "compose",
                                                           "-p", db.name, "-f", str(db.file), "down")),)
    cases["compose start, other workdir"] = (shlex.join(sh(compose_mod._IN_DIR, "/tmp", "docker", "compose",
                                                           "-p", db.name, "-f", str(db.file), "start")),)
    for name, command in cases.items():
        p = restricted.ssh(*command)
        err = p.stderr.decode()
        assert p.returncode == 126, (name, p.returncode, err)
        assert "vzdump-hook-wrapper: refused:" in err, (name, err)
        assert not sentinel.exists(), name
    assert compose.running_services(db) == {"app"}
    refusals = [ln for ln in restricted.log_lines() if "REFUSED" in ln]
    assert len(refusals) == len(cases), restricted.log_lines()


def test_no_login_shell_and_no_forwarding(restricted: Restricted) -> None:
    p = restricted.ssh()  # no command: an interactive login
    assert p.returncode == 126 and b"refused: no command given" in p.stderr
    p = restricted.ssh(extra=("-W", "127.0.0.1:22"))  # `restrict`: no port forwarding
    assert p.returncode != 0 and b"SSH-" not in p.stdout
    p = restricted.ssh("true")
    assert p.returncode == 0, p.stderr


def test_guest_install_sets_up_the_guest_side_idempotently(setup: HookSetup, test_guest: TestGuest,
                                                           compose_project: Any) -> None:
    db = compose_project("db", {"app": "sleeper"})
    compose.up(db)
    setup.write({VMID: (test_guest, {"stacks": [db.name]})})
    root = test_guest.workdir / "root"
    keys = test_guest.workdir / "authorized_keys"
    env = {"VZDUMP_HOOK_GUEST_ROOT": str(root)}
    args = ("guest", "install", str(VMID), "--authorized-keys", str(keys))

    r = admin(setup, "check", env=env)
    assert r.returncode == 1 and "guest side: recovery NOT INSTALLED; node key NOT restricted" in r.stdout, (
        r.stdout + r.stderr)

    keys_before = keys.read_bytes()
    r = admin(setup, *args, "--dry-run", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("would create" in r.stdout and "would restrict the node's key" in r.stdout
            and "5 change(s) to make" in r.stdout)
    assert not root.exists() and keys.read_bytes() == keys_before

    r = admin(setup, *args, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "checked: a new connection with the node's key runs only vzdump-hook's commands" in r.stdout
    assert (root / "usr/local/sbin/vzdump-hook-recover").is_file() and (root / "etc/vzdump-hook/guest.conf").is_file()

    # the node's own key now runs the hook's verbs and nothing else
    p = subprocess.run(test_guest.ssh_argv("id"), capture_output=True, timeout=60)
    assert p.returncode == 126 and b"refused" in p.stderr
    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=setup.env,
                     timeout=120)
    assert result.status is JobStatus.OK, result.task_log()
    assert f"pre-stop {VMID}: stopped {db.name}" in result.task_log()
    assert compose.running_services(db) == {"app"}

    r = admin(setup, "check", env=env)
    assert (r.returncode == 0
            and "guest side: recovery current; node key restricted to the wrapper (current)" in r.stdout), r.stdout

    r = admin(setup, *args, env=env)  # again: nothing to do, through the restricted key
    assert r.returncode == 0 and "everything current" in r.stdout, r.stdout + r.stderr

    # an outdated file cannot be fixed through the restricted key; an admin key can
    (root / "etc/systemd/system/vzdump-hook-recover.timer").write_text("[Timer]\n")
    r = admin(setup, "check", env=env)
    assert "recovery OUTDATED (vzdump-hook-recover.timer)" in r.stdout, r.stdout
    r = admin(setup, *args, env=env)
    assert r.returncode == 1 and "--identity-file" in r.stderr, r.stdout + r.stderr
    admin_key = keygen(test_guest.workdir / "admin_key")
    with open(keys, "a") as f:
        f.write(Path(admin_key + ".pub").read_text())
    r = admin(setup, *args, "--identity-file", admin_key, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("vzdump-hook-recover.timer: update" in r.stdout
            and "node key already restricted to the wrapper: unchanged" in r.stdout)
    r = admin(setup, "check", env=env)
    assert "guest side: recovery current; node key restricted to the wrapper (current)" in r.stdout, r.stdout
