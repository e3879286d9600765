"""Stacks of kind container against the real engines: the host's Docker engine reached over ssh in a test
guest (sshd in a network namespace), and Debian's podman 4.3, rootful and rootless (the user vzdhctr),
with the host itself as the guest (podman has no daemon: see HostTransport). Only the listed (or labelled)
containers that run are stopped, in the given order (label matches by name), the marker is written
before the first stop, killed containers are reported, a restart policy does not bring a stopped
container back during the window, and exactly those containers start again, last stopped first.
The hook run as vzdump runs it, and its admin commands, on a container stack.

Containers are named vzdh-ctr-PID-NAME and removed by the fixture. podman runs with runc and ulimits
below the sandbox's hard limits (this test host has no CAP_SYS_RESOURCE: podman's defaults fail, see
docs/configuration.md, Podman); the hook itself only stops and starts containers made that way.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.infra.guest import TestGuest
from tests.integration.test_restart_policy import WINDOW
from vzdump_hook import config as configuration
from vzdump_hook.errors import ControllerError
from vzdump_hook.guest import marker as markers
from vzdump_hook.guest.session import GuestSession
from vzdump_hook.node.job import JobId
from vzdump_hook.stacks import Kind
from vzdump_hook.stacks.container import ContainerDriver
from vzdump_hook.transports.base import Transport, shell_join
from vzdump_hook.transports.local import run_local

pytestmark = pytest.mark.integration

VMID = 102
IMAGE = {"docker": "vzdh/busybox:test", "podman": "localhost/vzdh/busybox:test"}  # built by scripts/setup-test-host.sh
RUN = {"docker": ["run"],
       "podman": ["--runtime", "runc", "run", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]}
ROOTLESS = "vzdhctr"  # the user of the rootless podman tests (made by scripts/setup-test-host.sh)
# stops at SIGTERM, first leaving a copy of the marker as it is at that moment; or ignores it (killed at the timeout)
POLITE = "trap 'cp /m/marker.json /out/$NAME.json 2>/dev/null; exit 0' TERM; while :; do sleep 1 & wait; done"
STUBBORN = "trap '' TERM; while :; do sleep 1 & wait; done"
_TIME = re.compile(r"(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?")


def as_user(user: str, argv: Sequence[str], **env: str) -> list[str]:
    """argv in a clean environment with `env`, as `user` (rootless podman's; "": root), as a login would run it."""
    base = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **({"HOME": f"/home/{user}"} if user else {}), **env}
    return [*(["runuser", "-u", user, "--"] if user else []), "env", "-i", *(f"{k}={v}" for k, v in base.items()),
            *argv]


def podman_problem(user: str) -> str | None:
    """Why podman cannot run the test containers here (as `user`), or None."""
    if user and subprocess.run(["id", user], capture_output=True).returncode != 0:
        return f"no user {user}: run scripts/setup-test-host.sh"
    if subprocess.run(as_user(user, ["podman", "image", "exists", IMAGE["podman"]]), capture_output=True,
                      cwd="/").returncode != 0:
        return f"podman{' of ' + user if user else ''} has no image {IMAGE['podman']}: run scripts/setup-test-host.sh"
    return None


class Containers:
    """Test containers of one engine (of `user`'s rootless podman, or root's): made on demand, all removed
    at the end. Their marker directory and files are in `workdir`, which `user` owns."""

    def __init__(self, e: str, workdir: Path, user: str = "") -> None:
        self.e, self.user, self.names, self.workdir = e, user, [], workdir  # type: ignore[var-annotated]
        self.prefix = f"vzdh-ctr-{os.getpid()}-"
        self.mdir, self.out = workdir / "vzdh-marker", workdir / "out"
        self.mdir.mkdir(mode=0o700)
        self.out.mkdir()
        if user:
            shutil.chown(workdir, user)
            for d in (self.mdir, self.out):
                shutil.chown(d, user)

    def engine(self, *args: str) -> str:
        r = subprocess.run(as_user(self.user, [self.e, *args]), capture_output=True, text=True, timeout=60, cwd="/")
        assert r.returncode == 0, f"{self.e} {' '.join(args)}: {r.stderr}"
        return r.stdout.strip()

    @property
    def marker(self) -> Path:
        return self.mdir / "marker.json"

    def run(self, name: str, *, script: str = POLITE, labels: tuple[str, ...] = (), restart: str = "no",
            running: bool = True, literal: bool = False) -> str:
        """A container named PREFIX-NAME (or NAME itself, `literal`); its full name."""
        full = name if literal else self.prefix + name
        self.names.append(full)
        argv = [self.e, *RUN[self.e], "-d", "--name", full, "--network", "none", f"--restart={restart}",
                "-e", f"NAME={name}", "-v", f"{self.mdir}:/m:ro", "-v", f"{self.out}:/out"]
        for label in labels:
            argv += ["--label", label]
        r = subprocess.run(as_user(self.user, [*argv, IMAGE[self.e], "sh", "-c", script]), capture_output=True,
                           text=True, timeout=60, cwd="/")
        assert r.returncode == 0, f"{argv}: {r.stderr}"
        if not running:
            self.engine("stop", "-t", "1", full)
        return full

    def inspect(self, name: str, fmt: str) -> str:
        return self.engine("container", "inspect", "--format", fmt, name if name in self.names else self.prefix + name)

    def running(self, name: str) -> bool:
        """Up: running, and not waiting to be restarted (the engine says Running while it restarts)."""
        return self.inspect(name, "{{.State.Running}} {{.State.Restarting}}") == "true false"

    def at(self, name: str, what: str) -> tuple[int, ...]:
        """StartedAt / FinishedAt as a comparable tuple (docker: RFC 3339; podman: Go's time format)."""
        m = _TIME.match(self.inspect(name, "{{.State." + what + "}}"))
        assert m, what
        return (*map(int, m.groups()[:6]), int((m.group(7) or "0").ljust(9, "0")[:9]))

    def remove(self) -> None:
        if self.names:
            # podman's rm -f first waits 10 s for a container that ignores SIGTERM; -t 0 kills it at once
            fast = ["-t", "0"] if self.e == "podman" else []
            subprocess.run(as_user(self.user, [self.e, "rm", "-f", *fast, *self.names]), capture_output=True,
                           timeout=120, cwd="/")
        if self.user:
            shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(params=["docker", "podman", "podman-rootless"])
def ctrs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Containers]:
    e, _, rootless = str(request.param).partition("-")
    user = ROOTLESS if rootless else ""
    if e == "docker":
        request.getfixturevalue("docker_engine")
    elif problem := podman_problem(user):
        pytest.skip(problem)
    c = Containers(e, Path(tempfile.mkdtemp(prefix="vzdh-ctr-", dir=f"/home/{user}")) if user else tmp_path, user)
    try:
        yield c
    finally:
        c.remove()


@pytest.fixture
def docker_ctrs(docker_engine: Any, tmp_path: Path) -> Iterator[Containers]:
    c = Containers("docker", tmp_path)
    try:
        yield c
    finally:
        c.remove()


def ssh_table(g: TestGuest, c: Containers) -> dict[str, Any]:
    return {"ssh": {"host": g.host, "port": g.port, "user": g.user, "identity_file": g.identity_file,
                    "known_hosts": g.known_hosts_file, "connect_timeout": 5}, "marker_path": str(c.marker)}


class HostTransport(Transport):
    """The host as the guest: each argv run here, as `user` (the ssh user a rootless podman's owner would
    be; "": root). For podman, which runs its containers in the caller's namespaces: in the ssh test
    guest's (`ip netns exec` remounts /sys) runc finds no cgroup mount."""

    name = "host"

    def __init__(self, user: str) -> None:
        super().__init__(f"this host as {user or 'root'}")
        self.user = user

    def _exec(self, argv: Sequence[str], stdin: bytes | None, timeout: float) -> tuple[int, bytes, bytes]:
        return run_local(as_user(self.user, argv), stdin, timeout, shown=shell_join(argv), target=self.target)


def controller(g: TestGuest, c: Containers, stacks: list[dict[str, Any]], **over: Any) -> GuestSession:
    """The guest reached over ssh (docker: the engine is a daemon), or the host itself (podman)."""
    table = {**ssh_table(g, c), "stacks": stacks, "stop_timeout": 10, **over}
    return GuestSession(configuration.validate_guest(VMID, table), JobId("node", "boot", 1, 1),
                           transport=HostTransport(c.user) if c.e == "podman" else None)


def soon(s: float = 120) -> float:
    return time.monotonic() + s


def test_only_the_listed_running_containers_stop_in_order_marker_first_and_start_in_reverse(
        ctrs: Containers, test_guest: TestGuest) -> None:
    c, p = ctrs, ctrs.prefix
    for n in ("a", "b", "d"):
        c.run(n)
    ids = {n: c.inspect(n, "{{.Id}}") for n in ("a", "b")}
    c.run("c", running=False)
    ctl = controller(test_guest, c, [{"kind": "container", "name": "app", "containers": [p + "b", p + "c", p + "a"],
                                      "engine": c.e}])
    try:
        q = ctl.quiesce("lxc", "snapshot", soon())
        assert not q.errors and not q.killed, q
        (rec,) = q.stacks
        assert (rec.kind, rec.engine, rec.names, rec.containers) == (Kind.CONTAINER, c.e, (p + "b", p + "a"),
                                                                     (ids["b"], ids["a"]))
        assert [c.running(n) for n in "abcd"] == [False, False, False, True]  # d is in no stack, c was not running
        assert c.at("b", "FinishedAt") < c.at("a", "FinishedAt")  # the given order
        at_stop = markers.parse((c.out / "b.json").read_bytes())  # the first one stopped saw the marker
        assert (at_stop.state == "stopping"
                and [(s.names, s.containers) for s in at_stop.stacks] == [(rec.names, rec.containers)])
        r = ctl.resume(soon())
        assert r.started == ("app",) and r.marker_removed, r.problems
        assert [c.running(n) for n in "abcd"] == [True, True, False, True]
        assert c.at("a", "StartedAt") < c.at("b", "StartedAt")  # reverse order
        assert not c.marker.exists()
    finally:
        ctl.close()


def test_label_matches_stop_in_the_order_of_their_names(ctrs: Containers, test_guest: TestGuest) -> None:
    c, p = ctrs, ctrs.prefix
    label = f"vzdh.test={p}shop"
    for n in ("y", "x", "z"):
        c.run(n, labels=(label,) if n != "z" else (f"vzdh.test={p}blog",))
    ctl = controller(test_guest, c, [{"kind": "container", "name": "shop", "label": label, "engine": c.e}])
    try:
        q = ctl.quiesce("lxc", "snapshot", soon())
        assert q.stacks[0].names == (p + "x", p + "y") and not q.errors
        assert [c.running(n) for n in "xyz"] == [False, False, True]
        assert c.at("x", "FinishedAt") < c.at("y", "FinishedAt")
        r = ctl.resume(soon())
        assert r.started == ("shop",) and [c.running(n) for n in "xyz"] == [True, True, True]
        assert c.at("y", "StartedAt") < c.at("x", "StartedAt")
    finally:
        ctl.close()


def test_a_name_or_label_the_engine_does_not_have_is_told_apart_from_a_stopped_one(ctrs: Containers,
                                                                                   test_guest: TestGuest) -> None:
    """A typo among several names, a stack with no existing member, a label that selects nothing: each
    named with its key path; a container that exists and is stopped is left alone, as before."""
    c, p = ctrs, ctrs.prefix
    c.run("side")
    c.run("parked", running=False)
    c.run("blog", labels=(f"vzdh.test={p}blog",), running=False)
    stacks = [{"kind": "container", "name": "app", "containers": [p + "side", p + "typo"]},
              {"kind": "container", "name": "ghost", "containers": [p + "nope"]},
              {"kind": "container", "name": "idle", "containers": [p + "parked"]},
              {"kind": "container", "name": "shop", "label": f"vzdh.test={p}shop"},
              {"kind": "container", "name": "blog", "label": f"vzdh.test={p}blog"}]
    ctl = controller(test_guest, c, [{**s, "engine": c.e} for s in stacks])
    try:
        pf = ctl.preflight(soon())
    finally:
        ctl.close()
    e = c.e
    assert pf.selected == ("app",) and set(pf.missing) == {"idle", "blog"}, pf
    assert pf.absent == (
        f"guests.{VMID}.stacks[0].containers[1]: {e} container '{p}typo' does not exist in the guest (stack app)",
        f"guests.{VMID}.stacks[1].containers[0]: {e} container '{p}nope' does not exist in the guest (stack ghost)",
        f"guests.{VMID}.stacks[3].label: label 'vzdh.test={p}shop' selects no container in the guest (stack shop)",
    ), pf.absent
    assert c.running("side") and not c.running("parked")  # a preflight changes nothing


def test_the_engine_is_detected(docker_ctrs: Containers, test_guest: TestGuest) -> None:
    c = docker_ctrs
    c.run("a")
    ctl = controller(test_guest, c, [{"kind": "container", "name": "app", "containers": [c.prefix + "a"]}])
    try:
        p = ctl.preflight(soon())
        assert p.selected == ("app",) and p.compose == ()  # compose is not asked for
        q = ctl.quiesce("lxc", "snapshot", soon())
        assert q.stacks[0].engine == "docker" and not c.running("a")  # docker first when both answer
        assert ctl.resume(soon()).started == ("app",) and c.running("a")
    finally:
        ctl.close()


def test_a_container_killed_at_the_stop_timeout_is_reported_and_started_again(ctrs: Containers,
                                                                               test_guest: TestGuest) -> None:
    c = ctrs
    c.run("slow", script=STUBBORN)
    c.run("fine")
    ctl = controller(test_guest, c, [{"kind": "container", "name": "app",
                                      "containers": [c.prefix + "slow", c.prefix + "fine"], "engine": c.e,
                                      "stop_timeout": 1}])
    try:
        q = ctl.quiesce("lxc", "snapshot", soon())
        assert q.killed == (f"app:{c.prefix}slow",) and not q.errors
        assert c.inspect("slow", "{{.State.ExitCode}}") == "137" and c.inspect("fine", "{{.State.ExitCode}}") == "0"
        r = ctl.resume(soon())
        assert r.started == ("app",) and c.running("slow") and c.running("fine")
    finally:
        ctl.close()


@pytest.mark.parametrize("policy", ["always", "unless-stopped", "on-failure"])
def test_a_restart_policy_does_not_bring_a_stopped_container_back_during_the_window(ctrs: Containers,
                                                                                     test_guest: TestGuest,
                                                                                     policy: str) -> None:
    c = ctrs
    c.run("rp", restart=policy)
    os.kill(int(c.inspect("rp", "{{.State.Pid}}")), 9)  # a crash: the policy is in force (on-failure too: 137)
    until = time.monotonic() + 20
    while c.inspect("rp", "{{.RestartCount}}") == "0" or not c.running("rp"):
        assert time.monotonic() < until, f"{c.e} did not restart a crashed container with --restart={policy}"
        time.sleep(0.05)
    ctl = controller(test_guest, c, [{"kind": "container", "name": "rp", "containers": [c.prefix + "rp"],
                                      "engine": c.e}])
    try:
        q = ctl.quiesce("lxc", "snapshot", soon())
        assert q.stacks and not q.errors and not q.killed
        stopped = time.monotonic()
        while time.monotonic() - stopped < WINDOW:
            assert (c.running("rp"), c.inspect("rp", "{{.RestartCount}}")) == (False, "1"), (
                f"restarted {time.monotonic() - stopped:.2f} s after the stop")
            time.sleep(0.1)
        assert ctl.resume(soon()).started == ("rp",) and c.running("rp")
    finally:
        ctl.close()


# -- the hook as vzdump runs it, and the admin commands -----------------------------------------------


def test_vzdump_job_and_admin_commands_on_a_container_stack(docker_ctrs: Containers, test_guest: TestGuest,
                                                            tmp_path: Path) -> None:
    from tests.infra.vzdump import Context, GuestSpec, GuestType, JobStatus, Mode, run_job
    from tests.integration.hookenv import HookSetup, installed_hook

    c = docker_ctrs
    for n in ("a", "b"):
        c.run(n)
    c.run("parked", running=False)
    setup = HookSetup(tmp_path / "hook")
    setup.tmp.mkdir()
    stacks = [{"kind": "container", "name": "app", "containers": [c.prefix + "a", c.prefix + "b"]},
              {"kind": "container", "name": "idle", "containers": [c.prefix + "parked"]}]
    setup.write({VMID: (test_guest, {"stacks": stacks, "stop_timeout": 5, "resume_wait": 30,
                                     "marker_path": str(c.marker)})})
    seen: list[tuple[bool, bool, bool]] = []

    def at_pit(ctx: Context) -> None:
        seen.append((c.running("a"), c.running("b"), c.marker.exists()))

    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT, hostname="demo")],
                     extra_env=setup.env, on_point_in_time=at_pit, timeout=120)
    log = result.task_log()
    assert result.status is JobStatus.OK, log
    assert seen == [(False, False, True)], log
    assert c.running("a") and c.running("b") and not c.marker.exists(), log
    assert re.search(rf"INFO: vzdump-hook: {VMID}\s+app\s+\d+\.\d+\s+ok", log), log  # the job-end summary

    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([installed_hook(), *args], env={**setup.env, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                              capture_output=True, text=True, timeout=120, cwd="/")

    out = admin("check", str(VMID)).stdout
    assert "compose: not used" in out and "running stacks: app" in out and "a backup stops: app" in out, out
    assert "configured but not running (left alone): idle" in out, out
    sim = admin("simulate", str(VMID), "--type", "qemu", "--pause", "0.5", "-y")
    assert sim.returncode == 0 and f"pre-stop {VMID}: stopped app" in sim.stdout + sim.stderr, sim.stdout + sim.stderr
    assert c.running("a") and c.running("b")
    ctl = controller(test_guest, c, stacks)
    try:
        assert ctl.quiesce("lxc", "snapshot", soon()).stacks
    finally:
        ctl.close()
    assert not c.running("a") and not c.running("b")
    st = admin("status")
    assert f"{VMID}: MARKER of job node/1" in st.stdout and "): app;" in st.stdout, st.stdout + st.stderr
    r = admin("recover", "--force", str(VMID))
    assert r.returncode == 0, r.stdout + r.stderr
    assert c.running("a") and c.running("b") and not c.marker.exists()


@pytest.mark.parametrize("policy", ["continue", "abort"])
def test_a_typo_in_the_names_is_a_config_problem_in_check_and_the_task_log(docker_ctrs: Containers,
                                                                            test_guest: TestGuest, tmp_path: Path,
                                                                            policy: str) -> None:
    """`check` exits non-zero naming the key to fix; at backup-start a WARNING with the same, then the
    policy: continue stops what exists and the job-end table marks the guest; abort fails its backup and
    stops nothing."""
    from tests.infra.vzdump import GuestSpec, GuestType, JobStatus, Mode, run_job
    from tests.integration.hookenv import HookSetup, installed_hook

    c = docker_ctrs
    c.run("side")
    setup = HookSetup(tmp_path / "hook")
    setup.tmp.mkdir()
    stacks = [{"kind": "container", "name": "app", "containers": [c.prefix + "side", c.prefix + "typo"]}]
    setup.write({VMID: (test_guest, {"stacks": stacks, "stop_timeout": 5, "marker_path": str(c.marker),
                                     "on_quiesce_error": policy})})
    problem = (f"guests.{VMID}.stacks[0].containers[1]: docker container '{c.prefix}typo' does not exist in the guest "
               "(stack app)")
    check = subprocess.run([installed_hook(), "check", str(VMID)], env={**setup.env, "PATH": "/usr/sbin:/usr/bin:/bin"},
                           capture_output=True, text=True, timeout=120, cwd="/")
    assert check.returncode != 0 and f"DOES NOT EXIST: {problem}" in check.stdout, check.stdout + check.stderr
    seen: list[bool] = []
    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=setup.env,
                     on_point_in_time=lambda ctx: seen.append(c.running("side")), timeout=120)
    log = result.task_log()
    start = [line.text for line in result.log if line.phase == "backup-start"]
    assert any(f"WARNING: backup-start {VMID}: config problem: {problem}" in t for t in start), log
    if policy == "continue":
        assert result.status is JobStatus.OK and seen == [False], log  # what exists is stopped as usual
        assert re.search(rf"{VMID}\s+app\s+\d+\.\d+\s+ok, crash-consistent, 1 configured name\(s\) NOT IN THE GUEST",
                         log), log
    else:
        assert result.guest(VMID).status.value == "failed" and seen == [], log  # failed at backup-start
        assert re.search(rf"{VMID}\s+-\s+-\s+not quiesced \(config unusable\)", log), log
    assert c.running("side"), log


def test_a_killed_container_with_policy_abort_fails_the_guests_backup_and_starts_the_stack_again(
        docker_ctrs: Containers, test_guest: TestGuest, tmp_path: Path) -> None:
    from tests.infra.vzdump import Context, GuestSpec, GuestType, Mode, Moment, run_job
    from tests.integration.hookenv import HookSetup, installed_hook

    c = docker_ctrs
    c.run("slow", script=STUBBORN)
    c.run("fine")
    setup = HookSetup(tmp_path / "hook")
    setup.tmp.mkdir()
    stacks = [{"kind": "container", "name": "app", "containers": [c.prefix + "fine", c.prefix + "slow"]}]
    setup.write({VMID: (test_guest, {"stacks": stacks, "stop_timeout": 1, "on_quiesce_error": "abort",
                                     "marker_path": str(c.marker)})})
    after_pre_stop: list[tuple[bool, bool]] = []

    def on_phase(phase: str, ctx: Context) -> None:
        if phase == "pre-stop" and ctx.moment is Moment.AFTER_PHASE:
            after_pre_stop.append((c.running("fine"), c.running("slow")))

    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=setup.env,
                     on_phase=on_phase, timeout=120)
    log = result.task_log()
    assert next(r for r in result.records if r.phase == "pre-stop").returncode == 1, log
    assert result.guest(VMID).status.value == "failed", log
    assert after_pre_stop == [(True, True)], log  # started again before failing
    assert f"app:{c.prefix}slow did not stop within its stop timeout and was KILLED" in log, log
    assert c.inspect("slow", "{{.RestartCount}}") == "0" and not c.marker.exists()


# -- the restricted key's wrapper and the guest's recovery program, against the same engines ----------

GUEST_FILES = Path(__file__).resolve().parents[2] / "examples" / "guest"


class Guarded:
    """The wrapper's settings for the containers of `c`: x and y by name, those labelled LABEL."""

    def __init__(self, c: Containers, label: str) -> None:
        self.c, self.conf, self.log = c, c.out.parent / "guest.conf", c.out.parent / "wrapper.log"
        self.conf.write_text(f"MARKER={c.marker}\nVMID={VMID}\nLOG={self.log}\nDEADLINE_GRACE=0\nKINDS=container\n"
                             f"CONTAINERS={c.prefix}x {c.prefix}y\nCONTAINER_LABELS={label}\n"
                             f"MARKER_OWNER={c.user or 'root'}\n")

    def forced(self, command: str) -> tuple[int, str]:
        """The wrapper as sshd runs it for the restricted key, SSH_ORIGINAL_COMMAND = `command`."""
        r = subprocess.run(self.wrapper(command), capture_output=True, text=True, timeout=120, cwd="/")
        return r.returncode, r.stderr

    def wrapper(self, command: str) -> list[str]:
        """The wrapper as sshd runs it for the restricted key of the containers' owner."""
        return as_user(self.c.user, ["sh", str(GUEST_FILES / "vzdump-hook-wrapper"), "--conf", str(self.conf)],
                       SSH_ORIGINAL_COMMAND=command, SSH_CONNECTION="10.0.0.1 5555 10.0.0.2 22")

    def recover(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(as_user(self.c.user, ["sh", str(GUEST_FILES / "vzdump-hook-recover"),
                                                    "--conf", str(self.conf), *args]),
                              capture_output=True, text=True, timeout=120, cwd="/")


class WrapperTransport(Transport):
    """Each argv as sshd runs a forced command: the wrapper, with the line the ssh transport sends."""

    name = "wrapper"

    def __init__(self, guarded: Guarded) -> None:
        super().__init__("wrapper")
        self.guarded = guarded

    def _exec(self, argv: Sequence[str], stdin: bytes | None, timeout: float) -> tuple[int, bytes, bytes]:
        return run_local(self.guarded.wrapper(shell_join(argv)), stdin, timeout, shown=shell_join(argv),
                         target=self.target)


@pytest.fixture
def guarded(ctrs: Containers) -> Guarded:
    label = f"vzdh.test={ctrs.prefix}ok"
    for n in ("x", "y"):
        ctrs.run(n)
    ctrs.run("l", labels=(label,))
    ctrs.run("other", labels=(f"vzdh.test={ctrs.prefix}no",))
    return Guarded(ctrs, label)


def stacks_of(g: Guarded) -> list[dict[str, Any]]:
    """x and y by name, then the containers labelled as the settings allow."""
    p = g.c.prefix
    return [{"kind": "container", "name": "app", "containers": [p + "x", p + "y"], "engine": g.c.e},
            {"kind": "container", "name": "lab", "label": f"vzdh.test={p}ok", "engine": g.c.e}]


def test_the_hook_quiesces_and_resumes_through_the_wrapper(guarded: Guarded) -> None:
    c = guarded.c
    guest = configuration.validate_guest(VMID, {"ssh": {"host": "192.0.2.1"}, "stacks": stacks_of(guarded),
                                                "marker_path": str(c.marker)})
    ctl = GuestSession(guest, JobId("node", "boot", 1, 1), transport=WrapperTransport(guarded))
    q = ctl.quiesce("lxc", "snapshot", soon())
    assert not q.errors and [s.names for s in q.stacks] == [(c.prefix + "x", c.prefix + "y"), (c.prefix + "l",)]
    assert [c.running(n) for n in ("x", "y", "l", "other")] == [False, False, False, True]
    r = ctl.resume(soon())
    assert r.started == ("lab", "app") and r.marker_removed, r.problems
    assert [c.running(n) for n in ("x", "y", "l", "other")] == [True] * 4
    lines = guarded.log.read_text().splitlines()
    assert not [ln for ln in lines if "REFUSED" in ln], lines
    assert any(f"allowed: {c.e} container stop " in ln for ln in lines), lines


def test_through_the_wrapper_a_stopped_name_and_a_label_selecting_nothing_are_told_apart(guarded: Guarded) -> None:
    """The second listing (-a: does a listed name exist) passes the restricted wrapper, for names and for
    an allowed label; with a label the settings do not allow it is refused like the running listing."""
    c = guarded.c
    c.engine("stop", "-t", "1", c.prefix + "y")
    c.engine("stop", "-t", "1", c.prefix + "l")
    guest = configuration.validate_guest(VMID, {"ssh": {"host": "192.0.2.1"}, "stacks": stacks_of(guarded),
                                                "marker_path": str(c.marker)})
    ctl = GuestSession(guest, JobId("node", "boot", 1, 1), transport=WrapperTransport(guarded))
    p = ctl.preflight(soon())
    assert p.selected == ("app",) and p.missing == ("lab",) and p.absent == (), p  # y and l exist, stopped
    lines = guarded.log.read_text().splitlines()
    assert not [ln for ln in lines if "REFUSED" in ln], lines
    assert any("list every container with label" in ln for ln in lines), lines
    code, err = guarded.forced(f"{c.e} container ls -a --no-trunc --filter label=vzdh.test={c.prefix}no "
                               "--format '{{.ID}}\t{{.Names}}'")
    assert code == 126 and "not one that CONTAINER_LABELS" in err, err


def test_the_wrapper_refuses_what_the_settings_do_not_allow(guarded: Guarded) -> None:
    c, e = guarded.c, guarded.c.e
    other, x, y = (c.inspect(n, "{{.Id}}") for n in ("other", "x", "y"))
    fmt = "'{{.ID}}\t{{.Names}}'"
    cases = [
        (f"{e} container stop -t 5 {other}", "is not one that CONTAINERS or CONTAINER_LABELS"),
        (f"{e} container start {other}", "is not one that CONTAINERS or CONTAINER_LABELS"),
        (f"{e} container stop -t 5 {x} {y}", "one container per stop"),
        (f"{e} container stop -t 5 {x[:12]}", "not a container id"),
        (f"{e} container rm -f {x}", "not one of vzdump-hook's commands"),
        (f"{e} container stop -t 5x {x}", "stop timeout is not a number"),
        (f"{e} container ls --no-trunc --filter status=running --filter label=vzdh.test={c.prefix}no --format {fmt}",
         "is not one that CONTAINER_LABELS"),
        (f"{e} container ls --no-trunc --filter status=running --filter 'label=a b' --format {fmt}",
         "not one of vzdump-hook's commands"),
        (f"{e} container ls -a --format {fmt}", "not one of vzdump-hook's commands"),
        (f"docker stop -t 5 {x}", "this guest has no compose stacks"),
    ]
    for command, why in cases:
        rc, err = guarded.forced(command)
        assert rc == 126 and why in err, (command, err)
    assert [c.running(n) for n in ("x", "y", "l", "other")] == [True] * 4
    guarded.conf.write_text(guarded.conf.read_text().replace("KINDS=container", "KINDS=compose"))
    rc, err = guarded.forced(f"{e} container stop -t 5 {x}")
    assert rc == 126 and "this guest has no container stacks" in err and c.running("x")


def test_the_recovery_program_starts_what_the_marker_lists_last_stopped_first(guarded: Guarded,
                                                                               test_guest: TestGuest) -> None:
    c = guarded.c
    ctl = controller(test_guest, c, stacks_of(guarded))
    try:
        assert len(ctl.quiesce("lxc", "snapshot", soon()).stacks) == 2
    finally:
        ctl.close()
    assert not c.running("x") and not c.running("l")
    check = guarded.recover("--check")
    assert check.returncode == 0 and "the node is at work, nothing to do" in check.stdout, check
    p = guarded.recover("--force")
    assert p.returncode == 0 and "started lab, app; marker removed" in p.stdout, p
    assert [c.running(n) for n in ("x", "y", "l", "other")] == [True] * 4
    assert c.at("l", "StartedAt") < c.at("y", "StartedAt") < c.at("x", "StartedAt")
    assert not c.marker.exists()


def test_the_recovery_program_starts_nothing_of_a_marker_listing_another_container(guarded: Guarded) -> None:
    c = guarded.c
    c.engine("container", "stop", "-t", "5", c.prefix + "x", c.prefix + "other")
    ids = [c.inspect(n, "{{.Id}}") for n in ("x", "other")]
    rec = markers.StackRecord.container("app", c.e, (c.prefix + "x", "innocent"), tuple(ids), stopped=True)
    m = markers.Marker(JobId("node", "boot", 1, 1), VMID, "lxc", "snapshot", 1700000000.0, 1700000600.0, "stopped",
                       (rec,))
    c.marker.write_bytes(m.to_json())
    c.marker.chmod(0o600)
    shutil.chown(c.marker, c.user or "root")  # as the node's key would have written it
    p = guarded.recover()
    assert p.returncode == 2 and "is not one that CONTAINERS or CONTAINER_LABELS" in p.stderr, p
    assert not c.running("x") and not c.running("other") and c.marker.exists()


# -- issue 20: ids are ids -------------------------------------------------------------------------------


def hex_name(c: Containers) -> str:
    """64 hex digits, unique to this run and engine: the NAME of a container, which looks like an id."""
    return hashlib.sha256(f"{c.prefix}{c.e}{c.user}victim".encode()).hexdigest()


def test_a_marker_listing_a_containers_name_as_an_id_starts_nothing(guarded: Guarded) -> None:
    # docker and podman take a container's name where no container has the id given: the recovery program
    # started the container NAMED by a marker's 64-hex "id"
    c = guarded.c
    victim = c.run(hex_name(c), literal=True, running=False)
    c.engine("container", "stop", "-t", "5", c.prefix + "x")
    assert c.inspect(victim, "{{.Id}}") != victim  # (the engine gave it an id of its own)
    rec = markers.StackRecord.container("app", c.e, (c.prefix + "x", "innocent"), (c.inspect("x", "{{.Id}}"), victim),
                                        stopped=True)
    m = markers.Marker(JobId("node", "boot", 1, 1), VMID, "lxc", "snapshot", 1700000000.0, 1700000600.0, "stopped",
                       (rec,))
    c.marker.write_bytes(m.to_json())
    c.marker.chmod(0o600)
    shutil.chown(c.marker, c.user or "root")  # as the node's key would have written it
    p = guarded.recover()
    assert p.returncode == 2, p
    assert f"app: container {victim[:12]} is not the id of a container ({c.e} gives the container " in p.stderr, p
    assert c.inspect(victim, "{{.State.Running}}") == "false" and not c.running("x") and c.marker.exists()


def test_the_wrapper_stops_and_starts_ids_never_names_that_look_like_ids(guarded: Guarded) -> None:
    c, e = guarded.c, guarded.c.e
    victim = c.run(hex_name(c), literal=True, running=False)
    conf = guarded.conf.read_text()
    guarded.conf.write_text(conf.replace(f"CONTAINERS={c.prefix}x", f"CONTAINERS={victim} {c.prefix}x"))
    for command, running in ((f"{e} container start {victim}", "false"), (f"{e} container stop -t 5 {victim}", "true")):
        if running == "true":
            c.engine("container", "start", victim)
        rc, err = guarded.forced(command)
        assert rc == 126, (command, err)
        assert f"refused: container {victim[:12]} is not the id of a container ({e} gives the container " in err, err
        assert c.inspect(victim, "{{.State.Running}}") == running, command
    # (a control: by its id it is acted on)
    rc, err = guarded.forced(f"{e} container stop -t 5 {c.inspect(victim, '{{.Id}}')}")
    assert rc == 0 and c.inspect(victim, "{{.State.Running}}") == "false", err


def test_the_node_stops_and_starts_ids_never_names_that_look_like_ids(ctrs: Containers) -> None:
    # a record read back from a marker (`vzdump-hook recover`, a stale marker at backup-start) is the guest's word
    c = ctrs
    victim = c.run(hex_name(c), literal=True)
    c.run("x", running=False)
    rec = markers.StackRecord.container("app", c.e, (c.prefix + "x", "innocent"), (c.inspect("x", "{{.Id}}"), victim),
                                        stopped=True)
    driver = ContainerDriver(HostTransport(c.user))
    out = driver.stop(rec, 5, 60)
    assert f"container {victim} is not the id of a container in the guest ({c.e} gives the container" in out.error, out
    assert c.inspect(victim, "{{.State.Running}}") == "true"
    c.engine("container", "stop", "-t", "5", victim)
    with pytest.raises(ControllerError, match=f"stack app: container {victim} is not the id of a container in the"):
        driver.start(rec, 60)
    assert c.inspect(victim, "{{.State.Running}}") == "false" and c.running("x")  # the stack's own container started
