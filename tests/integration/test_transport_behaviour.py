"""One behaviour suite, run over every transport: quiesce, resume, marker lifecycle, timeout, failure,
bad output. Each transport talks to a real peer:

- ``ssh``: OpenSSH's sshd in a network namespace (tests/infra/guest.py);
- ``pct``: the `pct` stand-in, which runs the command with nsenter inside a container played by a
  mount + network namespace with its own /var/lib (tests/infra/pct_standin.py);
- ``agent-https``: the https client (requests, token auth, TLS verified against a CA made
  for the test) against the PVE API double, whose VM is such a namespace container (tests/infra/pve_api.py);
- ``agent-pvesh``: the node's `pvesh` (the default, ``api = "local"``), played by a `pvesh`
  stand-in that forwards to the same double.

The stacks are real docker compose projects on the host's engine, reached from inside each guest.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.infra import compose
from tests.infra.pct_standin import NsContainer, make_pct, read_calls
from tests.infra.pve_api import PveApiDouble, make_pvesh
from vzdump_hook import config as configuration
from vzdump_hook.config import GuestConfig
from vzdump_hook.errors import CommandTimeout, ConnectError, MarkerError, TransportError
from vzdump_hook.guest import marker as markers
from vzdump_hook.guest.session import GuestSession
from vzdump_hook.node.job import JobId
from vzdump_hook.stacks.table import valid_stack_name
from vzdump_hook.transports import open_transport
from vzdump_hook.transports.base import Transport

pytestmark = pytest.mark.integration
NS_MARKER = "/var/lib/vzdump-hook/marker.json"
KINDS = ["ssh", "pct", "agent-https", "agent-pvesh"]


@dataclass
class Reach:
    """A guest reached by one transport: its config table, where its marker is on the host, how to cut it off."""

    kind: str
    table: dict[str, Any]
    marker_file: Path  # the marker as the host sees it
    cut_off: Callable[[], None]
    unreachable_text: str  # what the ConnectError says then
    peer: Any = None

    def guest(self, **over: Any) -> GuestConfig:
        return configuration.validate_guest(self.vmid, {**self.table, **over})

    @property
    def vmid(self) -> int:
        return 101 if self.kind != "ssh" else 102

    def transport(self, **over: Any) -> Transport:
        return open_transport(self.guest(**over))


@pytest.fixture(params=KINDS)
def reach(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Reach]:
    kind: str = request.param
    if kind == "ssh":
        g = request.getfixturevalue("test_guest")
        marker = tmp_path / "guest-var-lib" / "vzdump-hook" / "marker.json"
        table = {"ssh": {"host": g.host, "port": g.port, "user": g.user,
                         "identity_file": g.identity_file, "known_hosts": g.known_hosts_file, "connect_timeout": 3},
                 "marker_path": str(marker)}
        yield Reach(kind, table, marker, g.stop_sshd, "", g)
        return
    if os.geteuid() != 0:
        pytest.skip("namespace containers need root")
    ct = NsContainer(101, tmp_path / "ct")
    marker = ct.var_lib / "vzdump-hook" / "marker.json"
    try:
        if kind == "pct":
            table = {"transport": "pct", "pct": {"path": make_pct(tmp_path / "ct")}}
            yield Reach(kind, table, marker, ct.stop, "Failed to get init pid", ct)
            return
        api = PveApiDouble(tmp_path / "api")
        try:
            vm = api.add_vm(101, ct)
            token = tmp_path / "token"
            token.write_text(api.secret + "\n")
            token.chmod(0o600)

            def agent_off() -> None:
                vm.agent_running = False

            if kind == "agent-https":
                agent = {"api": "https", "host": "127.0.0.1", "port": api.port, "token_id": api.token_id,
                         "token_file": str(token), "verify": str(api.ca_file), "node": api.node}
            else:
                agent = {"pvesh": make_pvesh(api, tmp_path / "pvesh"), "node": api.node}
            yield Reach(kind, {"transport": "agent", "agent": agent}, marker, agent_off,
                        "QEMU guest agent is not running", api)
        finally:
            api.close()
    finally:
        ct.close()


def stacks(compose_project: Any, *names: str) -> list[compose.ComposeProject]:
    made = [compose_project(n, {"app": "sleeper", "side": "sleeper"}) for n in names]
    for p in made:
        compose.up(p)
    return made


# -- commands ------------------------------------------------------------------------------------


def test_argv_reaches_the_guest_unquoted_with_status_stdin_and_raw_bytes(reach: Reach, tmp_path: Path) -> None:
    evil = "a b; touch /tmp/vzdh-pwned $(touch /tmp/vzdh-pwned2) `id` 'q' \"d\" \\ \n\u00e9"
    with reach.transport() as t:
        r = t.run(["sh", "-c", 'printf "%s" "$1"; printf "\\377\\001\\205x" >&2; cat; exit 5', "sh", evil],
                  timeout=20, stdin=b"from stdin\n")
        assert (r.exit_status, r.stdout, r.stderr) == (5, evil + "from stdin\n", "\ufffd\x01\ufffdx")
        # every byte comes back as sent
        status, out, err = t._exec(["sh", "-c", 'printf "\\377\\205\\000\\342\\200\\250end"'], None, 20)
        assert (status, out, err) == (0, b"\xff\x85\x00\xe2\x80\xa8end", b"")
    assert not Path("/tmp/vzdh-pwned").exists() and not Path("/tmp/vzdh-pwned2").exists()


def test_failure_carries_command_exit_status_and_stderr_tail(reach: Reach) -> None:
    with reach.transport() as t:
        with pytest.raises(TransportError) as ei:
            t.run(["sh", "-c", "echo one >&2; echo two >&2; echo boom >&2; exit 7", "sh", "arg"],
                  timeout=20).check("it failed")
    e = ei.value
    assert (e.exit_status, e.stderr_tail) == (7, "one | two | boom")
    assert "arg" in e.command and "it failed" in str(e) and "exit status 7" in str(e)


def test_a_command_that_hangs_is_bounded_and_the_transport_stays_usable(reach: Reach) -> None:
    with reach.transport() as t:
        t.connect(10)
        start = time.monotonic()
        with pytest.raises(CommandTimeout):
            t.run(["sleep", "30"], timeout=1.5)
        assert time.monotonic() - start < 4
        assert t.run(["echo", "still here"], timeout=20).stdout == "still here\n"


def test_an_unreachable_guest_is_a_connect_error_within_the_timeout(reach: Reach) -> None:
    reach.cut_off()
    with reach.transport() as t:
        start = time.monotonic()
        with pytest.raises(ConnectError) as ei:
            t.connect(8)
        assert time.monotonic() - start < 9
    assert reach.unreachable_text in str(ei.value)
    ctl = GuestSession(reach.guest(), JobId.current())
    with pytest.raises(ConnectError):
        ctl.preflight(time.monotonic() + 8)
    ctl.close()


# -- quiesce / resume / marker -------------------------------------------------------------------


def test_quiesce_writes_the_marker_first_then_resume_starts_and_removes_it(reach: Reach, compose_project: Any) -> None:
    db, web = stacks(compose_project, "db", "web")
    guest = reach.guest(stacks=[db.name, web.name, "not-running"], stop_timeout=5)
    job = JobId.current()
    ctl = GuestSession(guest, job)
    try:
        p = ctl.preflight(time.monotonic() + 60)
        assert p.selected == (db.name, web.name) and p.missing == () and p.marker is None
        # a project with no container at all is named as a config problem, not left alone
        assert [a.split(": ", 1)[0] for a in p.absent] == [f"guests.{guest.vmid}.stacks[2].name"], p.absent
        assert p.compose == ("docker", "compose")
        q = ctl.quiesce("lxc", "snapshot", time.monotonic() + 120)
        assert [s.name for s in q.stacks] == [db.name, web.name] and not q.errors and not q.killed
        assert compose.running_services(db) == set() and compose.running_services(web) == set()
        data = reach.marker_file.read_bytes()  # in the guest (the container's own /var/lib)
        assert oct(reach.marker_file.stat().st_mode & 0o777) == "0o600"
        m = markers.parse(data)
        assert m.state == "stopping" and m.job == job and [s.name for s in m.stacks] == [db.name, web.name]
        assert not [f for f in reach.marker_file.parent.iterdir() if f.name != "marker.json"]  # no temp files left
        r = ctl.resume(time.monotonic() + 120)
        assert r.started == (web.name, db.name) and not r.failed and r.marker_removed
        assert compose.running_services(db) == {"app", "side"} and compose.running_services(web) == {"app", "side"}
        assert not reach.marker_file.exists()
    finally:
        ctl.close()


def test_a_marker_left_by_a_crashed_job_is_enough_to_resume(reach: Reach, compose_project: Any) -> None:
    (db,) = stacks(compose_project, "db")
    guest = reach.guest(stacks=[db.name], stop_timeout=5)
    first = GuestSession(guest, JobId("node", "boot", 1, 1))
    try:
        first.quiesce("qemu", "snapshot", time.monotonic() + 120)
    finally:
        first.close()  # the hook "crashes": nothing on the node remembers what it stopped
    assert compose.running_services(db) == set() and reach.marker_file.exists()
    later = GuestSession(guest, JobId.current())  # a new process, a new connection
    try:
        m = later.read_marker(time.monotonic() + 30)
        assert m is not None and m.job == JobId("node", "boot", 1, 1)
        r = later.resume(time.monotonic() + 120)
    finally:
        later.close()
    assert r.started == (db.name,) and r.marker_removed
    assert compose.running_services(db) == {"app", "side"} and not reach.marker_file.exists()


def test_a_stack_that_fails_to_start_stays_in_the_marker(reach: Reach, compose_project: Any) -> None:
    import shutil

    db = compose_project("db", {"app": "sleeper"})
    (db.workdir / "data").mkdir()
    # a local volume bound to a directory: once that is gone, docker cannot start the container
    db.file.write_text(
        "services:\n  app:\n    image: " + compose.BUSYBOX_IMAGE + "\n    command: [sleep, '3600']\n"
        "    network_mode: none\n"
        "    stop_signal: SIGKILL\n    volumes: ['data:/data']\n"
        f"volumes:\n  data:\n    driver_opts: {{type: none, o: bind, device: '{db.workdir / 'data'}'}}\n"
    )
    (web,) = stacks(compose_project, "web")
    compose.up(db)
    guest = reach.guest(stacks=[db.name, web.name], stop_timeout=5)
    ctl = GuestSession(guest, JobId.current())
    try:
        ctl.quiesce("lxc", "snapshot", time.monotonic() + 120)
        shutil.rmtree(db.workdir / "data")  # a bind mount's source is gone: docker cannot start it
        r = ctl.resume(time.monotonic() + 120)
    finally:
        ctl.close()
    assert r.started == (web.name,) and r.failed == (db.name,) and not r.marker_removed
    assert db.name in " ".join(r.problems)
    assert [s.name for s in markers.parse(reach.marker_file.read_bytes()).stacks] == [db.name]
    assert compose.running_services(web) == {"app", "side"} and compose.running_services(db) == set()
    assert "no such file or directory" in " ".join(r.problems)


def test_a_large_marker_with_any_bytes_round_trips(reach: Reach) -> None:
    # 80 KiB, not ASCII: the agent uses file-write parts
    data = bytes(range(256)) * 300 + "\u00e9\u2028".encode() * 1000
    with reach.transport() as t:
        t.write_file(NS_MARKER if reach.kind != "ssh" else str(reach.marker_file), data, timeout=60)
        assert reach.marker_file.read_bytes() == data
        assert oct(reach.marker_file.stat().st_mode & 0o777) == "0o600"
        # parts and temp files gone
        assert not [f.name for f in reach.marker_file.parent.iterdir() if f.name != "marker.json"]
        got = t.read_file(NS_MARKER if reach.kind != "ssh" else str(reach.marker_file),
                          limit=len(data) + 10, timeout=30)
    assert got == data


# -- bad output ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"\xff\xfe not json \x00", b'{"schema": 1, "stacks": [{"name": "../../etc", "compose": ["sh", "-c", "reboot"]}]}',
     b"{" + b" " * (70 * 1024) + b"}"],
    ids=["garbage", "hostile", "oversize"],
)
def test_a_bad_marker_read_from_the_guest_is_refused_and_the_node_record_is_used(reach: Reach, compose_project: Any,
                                                                                 content: bytes) -> None:
    (db,) = stacks(compose_project, "db")
    guest = reach.guest(stacks=[db.name], stop_timeout=5)
    ctl = GuestSession(guest, JobId.current())
    try:
        q = ctl.quiesce("lxc", "snapshot", time.monotonic() + 120)
        reach.marker_file.write_bytes(content)  # the guest replaced it
        with pytest.raises(MarkerError):
            ctl.read_marker(time.monotonic() + 30)
        r = ctl.resume(time.monotonic() + 120, fallback=q.stacks)
    finally:
        ctl.close()
    assert r.started == (db.name,) and not r.marker_removed and "left in place" in " ".join(r.problems)
    assert compose.running_services(db) == {"app", "side"}
    assert reach.marker_file.read_bytes() == content


@pytest.fixture
def hostile_container(docker_engine: Any) -> Iterator[str]:
    """A running container whose compose labels are not to be trusted (no compose name, relative dir)."""
    import subprocess

    labels = ["--label", "com.docker.compose.project=../Evil Project",
              "--label", "com.docker.compose.project.working_dir=relative/dir",
              "--label", "com.docker.compose.service=$(reboot)"]
    cid = subprocess.run(["docker", "run", "-d", "--network", "none", *labels, compose.BUSYBOX_IMAGE, "sleep", "300"],
                         capture_output=True, text=True, check=True).stdout.strip()
    yield cid
    subprocess.run(["docker", "rm", "-f", cid], capture_output=True)


@pytest.mark.engine_alone  # "auto": every compose project on the engine
def test_hostile_labels_in_docker_output_are_ignored(reach: Reach, compose_project: Any,
                                                     hostile_container: str) -> None:
    (db,) = stacks(compose_project, "db")
    ctl = GuestSession(reach.guest(stacks="auto"), JobId.current())
    try:
        running = ctl.driver.running(60)
    finally:
        ctl.close()
    assert db.name in running and all(valid_stack_name(n) for n in running)
    assert not any(hostile_container in s.containers for s in running.values())
    assert running[db.name].workdir == str(db.workdir) and set(running[db.name].services) == {"app", "side"}


# -- transport specifics that only a real peer shows ----------------------------------------------


@pytest.mark.parametrize("reach", ["pct"], indirect=True)
def test_pct_gets_an_argv_and_no_inherited_environment(reach: Reach, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VZDH_LEAK", "1")
    with reach.transport() as t:
        assert t.run(["printf", "%s|", "a b", "$HOME"], timeout=20).stdout == "a b|$HOME|"
    call = read_calls(tmp_path / "ct")[-1]
    assert call["argv"][:3] == ["exec", "101", "--"] and call["argv"][-3:] == ["%s|", "a b", "$HOME"]
    env: dict[str, str] = call["env"]  # type: ignore[assignment]
    assert "VZDH_LEAK" not in env and env["PATH"] == "/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.mark.parametrize("reach", ["agent-https", "agent-pvesh"], indirect=True)
def test_agent_requests_follow_the_pve_api(reach: Reach) -> None:
    api: PveApiDouble = reach.peer
    with reach.transport() as t:
        # long enough to be polled twice through a pvesh that costs a process start
        t.run(["sh", "-c", "sleep 1; echo done"], timeout=20)
    execs = api.calls("exec")
    # an array: the key repeated, not one shell string
    assert execs[-1]["command"] == ["sh", "-c", "sleep 1; echo done"]
    polls = api.calls("exec-status")
    assert len(polls) >= 2 and all(p["pid"] == polls[-1]["pid"] for p in polls[-2:])
    # the pid is forgotten once its result was fetched, as QEMU does
    with pytest.raises(TransportError, match="Invalid parameter 'pid'"):
        reach.transport()._call("get", "exec-status", time.monotonic() + 10, "x", pid=int(polls[-1]["pid"]))


@pytest.mark.parametrize("reach", ["agent-https", "agent-pvesh"], indirect=True)
def test_agent_output_past_the_capture_limit_is_refused_not_used(reach: Reach) -> None:
    reach.peer.max_output = 1000
    with reach.transport() as t:
        with pytest.raises(TransportError, match="truncated"):
            t.run(["sh", "-c", "head -c 5000 /dev/zero"], timeout=20)
        r = t.run(["sh", "-c", "head -c 5000 /dev/zero >&2; echo ok"], timeout=20)
    assert r.stdout == "ok\n" and "stderr truncated" in r.stderr


def test_json_of_the_marker_is_what_the_guest_side_recovery_reads(reach: Reach, compose_project: Any) -> None:
    """The marker written over every transport has one stack per line (guest-side recovery reads lines)."""
    (db,) = stacks(compose_project, "db")
    ctl = GuestSession(reach.guest(stacks=[db.name], stop_timeout=5), JobId.current())
    try:
        ctl.quiesce("lxc", "snapshot", time.monotonic() + 120)
        lines = [ln for ln in reach.marker_file.read_text().splitlines() if '"name":' in ln]
        assert len(lines) == 1 and json.loads(lines[0].strip().rstrip(","))["name"] == db.name
        ctl.resume(time.monotonic() + 120)
    finally:
        ctl.close()


# -- the installed hook, as vzdump runs it, on a guest opted in by tag ----------------------------


def test_the_hook_quiesces_a_tagged_container_over_pct_as_vzdump_runs_it(tmp_path: Path, compose_project: Any) -> None:
    import subprocess

    from tests.integration.hookenv import installed_hook
    from vzdump_hook.node.job import node_name

    if os.geteuid() != 0:
        pytest.skip("namespace containers need root")
    (db,) = stacks(compose_project, "db")
    ct = NsContainer(101, tmp_path / "ct")
    try:
        conf = tmp_path / "pve" / "nodes" / node_name() / "lxc"
        conf.mkdir(parents=True)
        (conf / "101.conf").write_text("hostname: ct101\ntags: web;vzdump-hook\n")
        cfg = tmp_path / "config.toml"
        cfg.write_text(f'[hook]\npve_dir = "{tmp_path / "pve"}"\n[defaults]\n'
                       f'stacks = ["{db.name}"]\nstop_timeout = 5\npct = {{ path = "{make_pct(tmp_path / "ct")}" }}\n')
        env = {"VZDUMP_HOOK_CONFIG": str(cfg), "VZDUMP_HOOK_RUN_DIR": str(tmp_path / "run"),
               "VZDUMP_HOOK_STATE_DIR": str(tmp_path / "state"),
               "VMTYPE": "lxc", "HOSTNAME": "ct101", "STOREID": "local"}  # vzdump's environment: no PATH, no HOME

        def phase(*args: str) -> str:
            r = subprocess.run([installed_hook(), *args], env=env, capture_output=True, text=True, timeout=120, cwd="/")
            assert r.returncode == 0, r.stdout + r.stderr
            return r.stdout

        phase("job-start")
        assert "pct 101 answers, will stop " + db.name in phase("backup-start", "snapshot", "101")
        phase("pre-stop", "snapshot", "101")
        assert compose.running_services(db) == set() and (ct.var_lib / "vzdump-hook" / "marker.json").exists()
        assert "started " + db.name in phase("post-restart", "snapshot", "101")
        assert (compose.running_services(db) == {"app", "side"}
                and not (ct.var_lib / "vzdump-hook" / "marker.json").exists())
        assert "101" in phase("job-end")
        calls = read_calls(tmp_path / "ct")
        assert calls and all(c["argv"][:3] == ["exec", "101", "--"] for c in calls)  # type: ignore[index]
    finally:
        ct.close()
