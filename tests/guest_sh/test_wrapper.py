"""examples/guest/vzdump-hook-wrapper (the authorized_keys `command=` of the node's key) under dash and
busybox sh, as sshd runs it: the request in SSH_ORIGINAL_COMMAND, a stand-in docker recording calls.

The package's own code (GuestSession, ComposeDriver, Transport file helpers) is driven through the
wrapper, so a change in the commands the hook sends that the wrapper does not know fails here."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.guest_sh.conftest import WRAPPER, Guest, no_changing_calls
from tests.guest_sh.fakedocker import cid
from vzdump_hook import config as configuration
from vzdump_hook.guest.marker import Marker, StackRecord
from vzdump_hook.guest.session import GuestSession
from vzdump_hook.node.job import JobId
from vzdump_hook.stacks import compose as compose_mod
from vzdump_hook.stacks import container as container_mod
from vzdump_hook.stacks import systemd as systemd_mod
from vzdump_hook.stacks.compose import ComposeDriver
from vzdump_hook.transports import base
from vzdump_hook.transports.base import Transport, sh, shell_join

LOG_NAME = "wrapper.log"


class WrapperTransport(Transport):
    """Runs each argv as sshd runs a forced command: the wrapper, with SSH_ORIGINAL_COMMAND set to the
    line the ssh transport would send (shlex.join)."""

    name = "wrapper"

    def __init__(self, g: Guest) -> None:
        super().__init__(f"wrapper ({g.shell})")
        self.g = g

    def _exec(self, argv: Sequence[str], stdin: bytes | None, timeout: float) -> tuple[int, bytes, bytes]:
        p = self.g.run(WRAPPER, "--conf", str(self.g.conf),
                       env={"SSH_ORIGINAL_COMMAND": shell_join(argv), "SSH_CONNECTION": "10.0.0.1 5555 10.0.0.2 22"},
                       stdin=stdin, timeout=timeout)
        return p.returncode, p.stdout, p.stderr


@pytest.fixture(autouse=True)
def conf(guest: Guest) -> None:
    guest.write_conf(MARKER=str(guest.marker), LOG=str(guest.root / LOG_NAME), ROOT=str(guest.root))


def forced(g: Guest, command: str | None, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = {} if command is None else {"SSH_ORIGINAL_COMMAND": command}
    return g.run(WRAPPER, "--conf", str(g.conf), env=env, stdin=stdin)


def log_lines(g: Guest) -> list[str]:
    p = g.root / LOG_NAME
    return p.read_text().splitlines() if p.exists() else []


def guest_config(g: Guest) -> configuration.GuestConfig:
    cfg = configuration.validate_guest(101, {"ssh": {"host": "192.0.2.1"}, "marker_path": str(g.marker),
                                             "stop_timeout": 7})
    return cfg


# -- the hook through the wrapper ---------------------------------------------------------------------


def test_the_hook_quiesces_and_resumes_through_the_wrapper(guest: Guest) -> None:
    guest.docker.add_project("db", ("app", "worker"))
    guest.docker.add_project("web", ("app",), files=["/srv/web/compose.yaml", "/srv/web/over ride.yaml"])
    guest.docker.add_project("other", ("app",), running=False)
    t = WrapperTransport(guest)
    ctl = GuestSession(guest_config(guest), JobId("pve1", "b", 1, 2), transport=t)
    deadline = time.monotonic() + 60
    p = ctl.preflight(deadline)
    assert p.compose == ("docker", "compose") and p.running == ("db", "web") and p.marker is None
    q = ctl.quiesce("qemu", "snapshot", deadline)
    assert [s.name for s in q.stacks] == ["db", "web"] and not q.errors and not q.killed
    assert guest.docker.running() == {"db": False, "web": False, "other": False}
    m = ctl.read_marker(deadline)
    assert m is not None and m.state == "stopping" and [s.name for s in m.stacks] == ["db", "web"]
    r = ctl.resume(deadline)
    assert r.started == ("web", "db") and not r.failed and r.marker_removed, r.problems
    assert guest.docker.running() == {"db": True, "web": True, "other": False}
    assert not guest.marker.exists()
    lines = log_lines(guest)
    assert lines and not [ln for ln in lines if "REFUSED" in ln], lines
    assert any("allowed: compose stop -t 7: db" in ln for ln in lines)
    assert any("allowed: compose start app worker: db" in ln for ln in lines)
    assert all("from 10.0.0.1:" in ln for ln in lines)


def test_the_fallback_verbs_work_through_the_wrapper(guest: Guest) -> None:
    # compose cannot load the project: the driver stops and starts the containers by id
    ids = guest.docker.add_project("db", ("app",), compose_broken=True)
    drv = ComposeDriver(WrapperTransport(guest), compose=("docker-compose",))
    rec = drv.running((), 30)["db"]
    out = drv.stop(rec, 5, 30)
    assert out.clean, out
    assert guest.docker.running() == {"db": False}
    drv.start(rec, 30)
    assert guest.docker.running() == {"db": True}
    argvs = guest.docker.argvs()
    assert ["docker", "stop", "-t", "5", *ids] in argvs and ["docker", "start", *ids] in argvs
    assert ["docker-compose", "-p", "db", "-f", "/srv/db/compose.yaml", "stop", "-t", "5"] in argvs


def services_of(name: str) -> list[str]:
    return ["docker", "ps", "--filter", f"label=com.docker.compose.project={name}", "--filter", "status=running",
            "--format", '{{.Label "com.docker.compose.service"}}']


def test_running_services_of_one_project(guest: Guest) -> None:
    # the driver asks this after a start when recorded containers were recreated
    guest.docker.add_project("db", ("app", "worker"))
    argv = services_of("db")
    p = forced(guest, shlex.join(argv))
    assert p.returncode == 0 and sorted(p.stdout.decode().split()) == ["app", "worker"], p.stderr
    assert guest.docker.argvs()[-1] == argv
    for bad in ("db;id", "$(id)", "DB", "-db", ""):
        p = forced(guest, shlex.join(services_of(bad)))
        assert p.returncode == 126, bad


def test_recreated_containers_are_checked_through_the_wrapper(guest: Guest) -> None:
    # the containers recorded at the stop were replaced since (new ids): the driver asks which services run
    guest.docker.add_project("db", ("app", "worker"), running=False)
    old = StackRecord("db", ("docker", "compose"), "/srv/db", ("/srv/db/compose.yaml",), (cid("old", 0), cid("old", 1)),
                      True, ("app", "worker"))
    ComposeDriver(WrapperTransport(guest), compose=("docker", "compose")).start(old, 30)
    assert guest.docker.running() == {"db": True}
    assert services_of("db") in guest.docker.argvs()
    assert not [ln for ln in log_lines(guest) if "REFUSED" in ln], log_lines(guest)


def test_healthchecks_are_asked_through_the_wrapper(guest: Guest) -> None:
    # `ready = { healthy = true }`: the driver asks the containers' health with its own format
    ids = guest.docker.add_project("db", ("app", "worker"))
    rec = StackRecord("db", ("docker", "compose"), "/srv/db", ("/srv/db/compose.yaml",), tuple(ids), True,
                      ("app", "worker"))
    drv = ComposeDriver(WrapperTransport(guest), compose=("docker", "compose"))
    state = guest.docker.load()
    state["projects"]["db"]["containers"][ids[0]]["health"] = "starting"
    guest.docker.save(state)
    assert drv.healthy(rec, 30) is False  # one still starting
    state["projects"]["db"]["containers"][ids[0]]["health"] = "healthy"
    guest.docker.save(state)
    assert drv.healthy(rec, 30) is True  # healthy, and the other has no healthcheck
    assert ["docker", "inspect", "--format", compose_mod.HEALTH_FORMAT, *ids] in guest.docker.argvs()
    assert not [ln for ln in log_lines(guest) if "REFUSED" in ln], log_lines(guest)
    p = forced(guest, shlex.join(["docker", "inspect", "--format", compose_mod.HEALTH_FORMAT, "$(id)"]))
    assert p.returncode == 126


def a_marker(vmid: int = 101, tool: str = "vzdump-hook") -> bytes:
    m = Marker(JobId("pve1", "b", 1, 2), vmid, "qemu", "snapshot", 1700000000.0, 1700000060.0, "stopped", ())
    return m.to_json().replace(b'"vzdump-hook"', json.dumps(tool).encode())


def test_file_verbs_through_the_wrapper(guest: Guest) -> None:
    t = WrapperTransport(guest)
    data = a_marker()
    assert t.read_file(str(guest.marker), limit=100, timeout=10) is None
    t.write_file(str(guest.marker), data, timeout=10)
    assert guest.marker.read_bytes() == data and (guest.marker.stat().st_mode & 0o777) == 0o600
    assert t.read_file(str(guest.marker), limit=3, timeout=10) == data[:4]  # limit + 1: an oversized file is noticed
    t.remove_file(str(guest.marker), timeout=10)
    assert not guest.marker.exists()


def test_a_marker_path_that_needs_quoting(guest: Guest) -> None:
    odd = guest.root / "mark er's dir" / "m.json"
    guest.write_conf(MARKER=str(odd), LOG=str(guest.root / LOG_NAME))
    t = WrapperTransport(guest)
    t.write_file(str(odd), a_marker(), timeout=10)
    assert odd.read_bytes() == a_marker()
    assert (odd.parent.stat().st_mode & 0o777) == 0o700
    assert t.read_file(str(odd), limit=100000, timeout=10) == a_marker()


def test_status_verb(guest: Guest) -> None:
    p = forced(guest, f"{guest.root}/usr/local/sbin/vzdump-hook-wrapper status")
    out = p.stdout.decode()
    assert p.returncode == 0, p.stderr
    assert "restricted yes" in out and f"marker {guest.marker}" in out and "file recover missing" in out
    direct = guest.run(WRAPPER, "status", str(guest.conf))
    assert direct.returncode == 0 and "restricted no" in direct.stdout.decode()


# -- refusals ------------------------------------------------------------------------------------------


def _compose_line_argv(workdir: str, *tail: str, name: str = "db") -> list[str]:
    return sh(compose_mod._IN_DIR, workdir, "docker", "compose", "-p", name, "-f", f"{workdir}/compose.yaml", *tail)


def _compose_line(workdir: str, *tail: str, name: str = "db") -> str:
    return shell_join(_compose_line_argv(workdir, *tail, name=name))


def refused_commands(g: Guest) -> dict[str, str | None]:
    m = str(g.marker)
    real = cid("db", 0)
    write = shell_join(sh(base._WRITE_SCRIPT, m))
    return {
        "interactive login": None,
        "empty": "",
        "other command": "id",
        "true then more": "true; id",
        "true and newline": "true\nid",
        "command substitution": "$(id)",
        "backticks": "`id`",
        "sh -c anything": shell_join(["sh", "-c", "id"]),
        "write another path": shell_join(sh(base._WRITE_SCRIPT, "/etc/passwd")),
        "write marker dir escape": shell_join(sh(base._WRITE_SCRIPT, m + "/../../../../etc/cron.d/x")),
        "write then more": write + "; id",
        "write then newline": write + "\nid",
        "write with two paths": write + " /etc/passwd",
        "edited write script": shell_join(sh(base._WRITE_SCRIPT.replace("set -eu", "set -e; id"), m)),
        "read another path": shell_join(sh(base._READ_SCRIPT, "/etc/shadow", "65537")),
        "read limit not a number": shell_join(sh(base._READ_SCRIPT, m, "$(id)")),
        "remove another path": shell_join(sh(base._REMOVE_SCRIPT, "/etc/passwd")),
        "unknown stack": _compose_line("/srv/evil", "stop", "-t", "5", name="evil"),
        "known stack other workdir": shell_join(sh(compose_mod._IN_DIR, "/tmp", "docker", "compose", "-p", "db",
                                                   "-f", "/srv/db/compose.yaml", "stop", "-t", "5")),
        "known stack other file": shell_join(sh(compose_mod._IN_DIR, "/srv/db", "docker", "compose", "-p", "db",
                                                "-f", "/tmp/evil.yaml", "start")),
        "compose down": _compose_line("/srv/db", "down", "-v"),
        "compose exec": _compose_line("/srv/db", "exec", "app", "sh"),
        "compose run": _compose_line("/srv/db", "run", "app"),
        "compose unknown service": _compose_line("/srv/db", "start", "nope"),
        "compose service with newline": _compose_line("/srv/db", "start", "app\nworker"),
        "compose stop then more": _compose_line("/srv/db", "stop", "-t", "5") + "; id",
        "compose timeout not a number": _compose_line("/srv/db", "stop", "-t", "5;id"),
        "other compose binary": shell_join(sh(compose_mod._IN_DIR, "/srv/db", "/tmp/evil", "-p", "db", "start")),
        "docker run": "docker run --privileged -v /:/host busybox",
        "docker exec": f"docker exec {real} sh",
        "docker ps other format": "docker ps --format '{{json .}}'",
        "docker ps then more": shell_join(["docker", "ps", "--no-trunc", "--filter", "label=com.docker.compose.project",
                                           "--filter", "status=running", "--format",
                                           compose_mod._LIST_FORMAT]) + " ; id",
        "inspect not hex": "docker inspect --format '{{.Id}} {{.State.Running}} {{.State.Restarting}} "
                           "{{.State.ExitCode}}' $(id)",
        "inspect other format": f"docker inspect --format '{{{{json .}}}}' {real}",
        "stop non-compose container": "docker stop -t 5 " + "ab" * 32,
        "start non-compose container": "docker start " + "cd" * 32,
        "start short id": "docker start abc",
        "stop timeout not a number": f"docker stop -t x {real}",
        "status with metacharacters": "vzdump-hook-wrapper status; id",
        "status with more words": "vzdump-hook-wrapper status a b",
        # found by tests/fuzz/test_fuzz_wrapper.py: lines shlex.join never writes
        "status after a space": " /usr/local/sbin/vzdump-hook-wrapper status",
        "status of a relative path": "sbin/vzdump-hook-wrapper status",
        "status with a trailing space": "vzdump-hook-wrapper status ",
        "stop without ids": "docker stop -t 0",
        "start without ids": "docker start ",
    }


def files_of(g: Guest) -> dict[Path, bytes]:
    """Every file under the guest's root but the wrapper's log and the stand-in docker's own files."""
    return {p: p.read_bytes() for p in g.root.rglob("*")
            if p.is_file() and p.name != LOG_NAME and not p.name.startswith("docker-")}


def _names() -> list[str]:
    class _Any:
        marker = Path("/m")

    return sorted(refused_commands(_Any()))  # type: ignore[arg-type]


@pytest.mark.parametrize("case", _names())
def test_anything_else_is_refused(case: str, guest: Guest) -> None:
    guest.docker.add_project("db", ("app", "worker"))
    guest.marker.write_text("keep")
    before = files_of(guest)
    cmd = refused_commands(guest)[case]
    p = forced(guest, cmd)
    err = p.stderr.decode()
    assert p.returncode == 126, (p.returncode, p.stdout, err)
    assert "vzdump-hook-wrapper: refused:" in err and "this key may only run vzdump-hook's commands" in err
    assert p.stdout == b""
    assert no_changing_calls(guest.docker.argvs()), guest.docker.argvs()
    assert files_of(guest) == before
    assert guest.docker.running() == {"db": True}
    lines = log_lines(guest)
    assert len(lines) == 1 and "REFUSED" in lines[0], lines
    assert "\n" not in lines[0] and all(32 <= ord(c) < 127 for c in lines[0])


def test_every_allowed_call_is_logged(guest: Guest) -> None:
    guest.docker.add_project("db", ("app",))
    calls = [["true"], sh(compose_mod._DETECT), sh(base._READ_SCRIPT, str(guest.marker), "10")]
    for argv in calls:
        assert forced(guest, shlex.join(argv)).returncode in (0, 3)
    lines = log_lines(guest)
    assert [ln.split(": ", 2)[-1] for ln in lines] == ["allowed: connect check", "allowed: detect compose",
                                                       f"allowed: read marker {guest.marker}"]


# -- marker writes (issue 9): only a valid marker of this guest, at most 64 KiB ---------------------------


def write_cmd(g: Guest) -> str:
    return shell_join(sh(base._WRITE_SCRIPT, str(g.marker)))


@pytest.mark.parametrize("case", ["not-json", "other-guest", "other-tool", "no-tool", "over-64k", "50-mib",
                                  "hostile-deadline", "duplicate-key"])
def test_an_invalid_marker_is_never_written(guest: Guest, case: str) -> None:
    guest.write_conf(MARKER=str(guest.marker), LOG=str(guest.root / LOG_NAME), ROOT=str(guest.root), VMID="101")
    good = a_marker()
    data = {
        "not-json": b"this is not json",
        "other-guest": a_marker(vmid=202),
        "other-tool": a_marker(tool="someone-else"),
        "no-tool": good.replace(b' "tool": "vzdump-hook",\n', b""),
        "over-64k": good.replace(b'"mode"', b'"pad": "' + b"x" * 70000 + b'", "mode"'),
        "50-mib": b" " * (50 * 1024 * 1024) + good,
        "hostile-deadline": good.replace(b'"deadline": ', b'"deadline": 1e300, "x": '),
        "duplicate-key": good.replace(b'"state": "stopped"', b'"state": "stopped", "state": "stopped"'),
    }[case]
    assert data != good
    guest.marker.write_bytes(good)
    guest.marker.chmod(0o600)
    p = forced(guest, write_cmd(guest), stdin=data)
    assert p.returncode == 126 and b"refused: write:" in p.stderr, (p.returncode, p.stderr)
    assert guest.marker.read_bytes() == good
    assert sorted(x.name for x in guest.marker.parent.iterdir()) == ["marker.json"]
    assert not list((guest.root / "tmp").iterdir())


def test_a_valid_marker_of_this_guest_is_written(guest: Guest) -> None:
    guest.write_conf(MARKER=str(guest.marker), LOG=str(guest.root / LOG_NAME), ROOT=str(guest.root), VMID="101")
    p = forced(guest, write_cmd(guest), stdin=a_marker())
    assert p.returncode == 0, p.stderr
    assert guest.marker.read_bytes() == a_marker()
    assert not list((guest.root / "tmp").iterdir())


def test_planted_symlinks_at_temp_names_are_not_followed(guest: Guest) -> None:
    # the old temp name was MARKER.tmp.$$: a symlink planted there for every pid was followed
    victim = guest.root / "victim"
    victim.write_text("untouched")
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for pid in range(2, min(pid_max, 100000)):
        (guest.marker.parent / f"marker.json.tmp.{pid}").symlink_to(victim)
    p = forced(guest, write_cmd(guest), stdin=a_marker())
    assert p.returncode == 0, p.stderr
    assert victim.read_text() == "untouched" and guest.marker.read_bytes() == a_marker()


def _make_insecure(g: Guest, case: str) -> str:
    g.marker.write_bytes(a_marker())
    g.marker.chmod(0o600)
    if case == "dir-mode":
        g.marker.parent.chmod(0o755)
        return "has mode 755"
    if case == "file-mode":
        g.marker.chmod(0o666)
        return "has mode 666"
    if case == "file-owner":
        os.chown(g.marker, 1000, 1000)
        return "is owned by uid 1000"
    if case == "file-symlink":
        real = g.root / "real.json"
        g.marker.rename(real)
        g.marker.symlink_to(real)
        return "is a symlink"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["dir-mode", "file-mode", "file-owner", "file-symlink"])
def test_an_insecure_marker_is_neither_read_written_nor_removed(guest: Guest, case: str) -> None:
    why = _make_insecure(guest, case)
    before = guest.marker.read_bytes()
    for verb, cmd, stdin in (
        ("read", shell_join(sh(base._READ_SCRIPT, str(guest.marker), "100")), b""),
        ("write", write_cmd(guest), a_marker()),
        ("remove", shell_join(sh(base._REMOVE_SCRIPT, str(guest.marker))), b""),
    ):
        p = forced(guest, cmd, stdin=stdin)
        err = p.stderr.decode()
        assert p.returncode == 126 and f"refused: {verb}: INSECURE:" in err and why in err, err
        assert p.stdout == b""
    assert guest.marker.read_bytes() == before
    st = forced(guest, f"{guest.root}/usr/local/sbin/vzdump-hook-wrapper status").stdout.decode()
    assert "marker-dir INSECURE: " in st and why in st, st


def test_status_says_the_marker_directory_is_fine(guest: Guest) -> None:
    st = forced(guest, f"{guest.root}/usr/local/sbin/vzdump-hook-wrapper status").stdout.decode()
    assert "marker-dir ok" in st.splitlines(), st


def test_a_compose_file_in_the_markers_directory_is_refused(guest: Guest) -> None:
    mdir = str(guest.marker.parent)
    guest.docker.add_project("db", ("app",), workdir="/srv/db", files=[f"{mdir}/compose.yaml"])
    guest.docker.add_project("web", ("app",), workdir=mdir, files=[])
    for cmd in (shell_join(sh(compose_mod._IN_DIR, "/srv/db", "docker", "compose", "-p", "db",
                              "-f", f"{mdir}/compose.yaml", "start")),
                shell_join(sh(compose_mod._IN_DIR, mdir, "docker", "compose", "-p", "web", "start"))):
        p = forced(guest, cmd)
        assert p.returncode == 126 and b"marker's directory" in p.stderr, p.stderr
    assert no_changing_calls(guest.docker.argvs())


def test_container_stacks_through_the_wrapper(guest: Guest) -> None:
    guest.write_conf(MARKER=str(guest.marker), LOG=str(guest.root / LOG_NAME), ROOT=str(guest.root), KINDS="container",
                     CONTAINERS="db-worker-1 db-app-1", CONTAINER_LABELS="com.docker.compose.project=web")
    guest.docker.add_project("db", ("app", "worker"))
    guest.docker.add_project("web", ("app",))
    guest.docker.add_project("other", ("app",))
    cfg = configuration.validate_guest(101, {"ssh": {"host": "192.0.2.1"}, "marker_path": str(guest.marker),
                                             "stop_timeout": 7, "stacks": [
        {"kind": "container", "name": "db", "containers": ["db-worker-1", "db-app-1"]},
        {"kind": "container", "name": "web", "label": "com.docker.compose.project=web", "engine": "podman"}]})
    ctl = GuestSession(cfg, JobId("pve1", "b", 1, 2), transport=WrapperTransport(guest))
    deadline = time.monotonic() + 60
    q = ctl.quiesce("qemu", "snapshot", deadline)
    assert [s.containers for s in q.stacks] == [(cid("db", 1), cid("db", 0)), (cid("web", 0),)] and not q.errors, q
    assert guest.docker.running() == {"db": False, "web": False, "other": True}
    r = ctl.resume(deadline)
    assert r.started == ("web", "db") and r.marker_removed, r.problems
    assert guest.docker.running() == {"db": True, "web": True, "other": True}
    lines = log_lines(guest)
    assert not [ln for ln in lines if "REFUSED" in ln], lines
    assert [ln.split("allowed: ")[1] for ln in lines if " container stop " in ln or " container start " in ln] == [
        f"docker container stop {cid('db', 1)}", f"docker container stop {cid('db', 0)}",
        f"podman container stop {cid('web', 0)}", f"podman container start {cid('web', 0)}",
        f"docker container start {cid('db', 0)}", f"docker container start {cid('db', 1)}"]
    other = cid("other", 0)
    for command in (f"docker container stop -t 5 {other}", f"podman container start {other}",
                    f"docker stop -t 5 {cid('db', 0)}",
                    "docker container ls --no-trunc --filter status=running "
                    "--filter label=com.docker.compose.project=other --format '{{.ID}}\t{{.Names}}'"):
        p = forced(guest, command)
        assert p.returncode == 126 and b"refused" in p.stderr, (command, p.stderr)
    assert guest.docker.running()["other"]


# -- issue 20: ids are ids; the log never follows a link; what runs is what was checked ------------------


def test_a_container_is_acted_on_by_its_id_never_by_a_name_that_looks_like_one(guest: Guest) -> None:
    # docker and podman take a container's name where no container has the id given: a request naming
    # the 64-hex NAME of a container must not stop or start it
    victim = cid("victim", 0)
    guest.write_conf(MARKER=str(guest.marker), LOG=str(guest.root / LOG_NAME), ROOT=str(guest.root), KINDS="container",
                     CONTAINERS=f"db-app-1 {victim}")
    guest.docker.add_project("db", ("app",), running=False)
    guest.docker.add_project("other", ("app",), running=False, names=(victim,))
    for engine in ("docker", "podman"):
        for verb, running in (("start", False), ("stop -t 5", True)):
            guest.docker.set_running("other", running)
            command = f"{engine} container {verb} {victim}"
            p = forced(guest, command)
            err = p.stderr.decode()
            assert p.returncode == 126, (command, err)
            assert f"refused: container {victim[:12]} is not the id of a container" in err, (command, err)
            assert guest.docker.running()["other"] is running, command
    assert no_changing_calls(guest.docker.argvs()), guest.docker.argvs()
    p = forced(guest, f"docker container start {cid('db', 0)}")  # (a control: by its id, it starts)
    assert p.returncode == 0 and guest.docker.running() == {"db": True, "other": True}, p.stderr


@pytest.mark.parametrize("case", ["symlink", "hard link", "group-writable directory", "fine"])
def test_the_log_file_fallback_never_writes_through_a_planted_link(guest: Guest, case: str) -> None:
    # without /dev/log the wrapper appends to ROOT/var/log/vzdump-hook-wrapper.log as root: a link planted
    # there by whoever may write the directory must not make it append to another file
    if os.path.exists("/dev/log"):
        pytest.skip("this host has /dev/log: the wrapper logs to syslog, not to the file")
    guest.write_conf(MARKER=str(guest.marker), LOG="syslog", ROOT=str(guest.root))
    logdir = guest.root / "var" / "log"
    logdir.mkdir(mode=0o755)
    log = logdir / "vzdump-hook-wrapper.log"
    victim = guest.root / "victim"
    victim.write_text("untouched\n")
    why = {"symlink": "is a symlink", "hard link": "has 2 links", "fine": "",
           "group-writable directory": "has mode 775: others may write it"}[case]
    if case == "symlink":
        log.symlink_to(victim)
    elif case == "hard link":
        os.link(victim, log)
    elif case == "group-writable directory":
        logdir.chmod(0o775)
    refused, allowed = forced(guest, "id"), forced(guest, "true")
    assert refused.returncode == 126 and allowed.returncode == 0, (refused, allowed)
    assert victim.read_text() == "untouched\n"
    for p, line in ((refused, "REFUSED (not one of vzdump-hook's commands): id"), (allowed, "allowed: connect check")):
        err = p.stderr.decode()
        if why:
            assert f"NOT LOGGED to {log} (" in err and why in err and line in err, err
        else:
            assert "NOT LOGGED" not in err, err
    if case == "fine":  # (a control: the file is used when nothing is wrong with it)
        lines = log.read_text().splitlines()
        assert len(lines) == 2, lines
        assert lines[0].endswith("REFUSED (not one of vzdump-hook's commands): id"), lines
        assert lines[1].endswith("allowed: connect check"), lines
    elif case == "group-writable directory":
        assert not log.exists()


CONTROLLER_STUB = "#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$0.argv\"\n"


def _spacing_setup(g: Guest) -> tuple[Path, list[list[str]]]:
    """A guest with every kind (a stand-in controller that records its argv), and one line of each form
    the hook sends whose words the wrapper splits: every one accepted as sent."""
    ctl = g.root / "ctl"
    ctl.write_text(CONTROLLER_STUB)
    ctl.chmod(0o755)
    g.write_conf(MARKER=str(g.marker), LOG=str(g.root / LOG_NAME), ROOT=str(g.root),
                 KINDS="compose container controller systemd", CONTAINERS="db-app-1", CONTROLLER=str(ctl),
                 UNITS="vzdh-none.service")
    ids = g.docker.add_project("db", ("app", "worker"))
    job = "pve1/0f0f0f0f-1111/4242/1000"
    fmt = container_mod.INSPECT_FORMAT
    return ctl, [
        [str(ctl), "signal", "snapshotted", "--job", job, "--vmid", "101"],
        [str(ctl), "signal", "quiesce", "--job", job, "--vmid", "101", "--mode", "snapshot",
         "--deadline", "1700000600.5", "--answer-within", "30"],
        ["docker", "start", *ids],
        ["docker", "stop", "-t", "5", ids[0]],
        ["docker", "inspect", "--format", compose_mod.HEALTH_FORMAT, *ids],
        services_of("db"),
        _compose_line_argv("/srv/db", "start", "app", "worker"),
        sh(base._READ_SCRIPT, str(g.marker), "100"),
        ["docker", "container", "start", ids[0]],
        ["podman", "container", "stop", "-t", "5", ids[0]],
        ["docker", "container", "inspect", "--format", fmt, ids[0]],
        systemd_mod.show_argv(["vzdh-none.service"]),
        [f"{g.root}/usr/local/sbin/vzdump-hook-wrapper", "status"],
    ]


def respaced(line: str) -> list[str]:
    """The line with each separator between words doubled in turn, with a tab for the middle one, and with
    a leading and a trailing space: lines a shell splits into the same words, which the hook never sends."""
    argv = shlex.split(line)
    # the spaces between words, not those in a quoted word
    seps = [i for i, ch in enumerate(line) if ch == " " and shlex.split(line[:i] + "  " + line[i + 1:]) == argv]
    out = [" " + line, line + " ", *(line[:i] + "  " + line[i + 1:] for i in seps)]
    mid = seps[len(seps) // 2]
    return [*out, line[:mid] + "\t" + line[mid + 1:]]


def test_a_request_runs_only_as_the_words_checked(guest: Guest) -> None:
    # issue 20: `ctl signal  snapshotted ...` (two spaces) passed the checks of the words split at single
    # spaces, then ran another argv; now a request is run only if it is its checked argv as shlex.join
    # writes it, byte for byte
    ctl, argvs = _spacing_setup(guest)
    argv_file = Path(f"{ctl}.argv")
    variants = [v for argv in argvs for v in respaced(shell_join(argv))]
    with ThreadPoolExecutor(8) as pool:  # (independent runs; the stand-in docker locks its state)
        for variant, p in zip(variants, pool.map(lambda v: forced(guest, v), variants), strict=True):
            assert p.returncode == 126 and b"refused" in p.stderr, (variant, p.returncode, p.stderr)
    assert no_changing_calls(guest.docker.argvs()), guest.docker.argvs()
    assert guest.docker.running() == {"db": True} and not argv_file.exists()
    for argv in argvs:
        line = shell_join(argv)
        p = forced(guest, line)  # (a control: the line as sent is accepted)
        assert p.returncode != 126, (line, p.stderr)
        if argv[0] == str(ctl):
            assert argv_file.read_text().splitlines() == argv[1:], line
            argv_file.unlink()
    lines = log_lines(guest)
    assert any("REFUSED (not exactly a command line vzdump-hook sends" in ln for ln in lines), lines


def test_a_doubled_space_in_a_controller_request_is_refused(guest: Guest) -> None:
    ctl, argvs = _spacing_setup(guest)
    line = shell_join(argvs[0]).replace(" signal ", " signal  ")
    p = forced(guest, line)
    assert p.returncode == 126 and b"refused: not exactly a command line vzdump-hook sends" in p.stderr, p.stderr
    assert not Path(f"{ctl}.argv").exists()
