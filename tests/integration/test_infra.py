"""Tests of the integration-test infrastructure itself, against the real things: OpenSSH's sshd in a
network namespace (tests/infra/guest.py), Docker with compose v1 and v2 and PostgreSQL 15
(tests/infra/compose.py)."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import paramiko
import pytest

from tests.infra import compose as c
from tests.infra.compose import ComposeProject
from tests.infra.guest import TestGuest

pytestmark = pytest.mark.integration

ProjectFactory = Callable[..., ComposeProject]


def connect(guest: TestGuest, known_hosts: str | None = None, timeout: float = 5.0,
            banner_timeout: float = 5.0) -> paramiko.SSHClient:
    """A paramiko client that trusts only the guest's known_hosts file (RejectPolicy)."""
    client = paramiko.SSHClient()
    client.load_host_keys(known_hosts or guest.known_hosts_file)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(guest.host, port=guest.port, username=guest.user,
                       key_filename=guest.identity_file, look_for_keys=False, allow_agent=False,
                       timeout=timeout, banner_timeout=banner_timeout, auth_timeout=timeout)
    except BaseException:
        client.close()
        raise
    return client


def ssh(client: paramiko.SSHClient, command: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """Run command over an open client; return (exit status, stdout, stderr)."""
    _, stdout, stderr = client.exec_command(command, timeout=timeout)
    out = stdout.read().decode()
    err = stderr.read().decode()
    return stdout.channel.recv_exit_status(), out, err


def ssh_ok(guest: TestGuest, command: str, timeout: float = 60.0) -> str:
    """Run command in the guest over a new SSH connection; assert exit 0; return stdout."""
    with connect(guest) as client:
        rc, out, err = ssh(client, command, timeout)
    assert rc == 0, f"{command!r} -> {rc}: {err}"
    return out


# ----------------------------------------------------------------------------------------- guest


def test_guest_starts_fast_and_leaves_nothing_behind(guest_factory: Callable[..., TestGuest]) -> None:
    t0 = time.monotonic()
    guest = guest_factory()
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0, f"guest took {elapsed:.2f} s to start"
    pid, netns, workdir = guest.sshd_pid, guest.netns, guest.workdir
    assert pid is not None and Path(f"/proc/{pid}").exists()
    guest.close()
    guest.close()  # idempotent
    assert netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"{guest.veth_host}@" not in links
    assert not workdir.exists()
    assert not Path(f"/proc/{pid}").exists()


def test_ssh_with_known_hosts_only(test_guest: TestGuest) -> None:
    with connect(test_guest) as client:
        key = client.get_transport().get_remote_server_key()
        digest = hashlib.sha256(key.asbytes()).digest()
        fingerprint = "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
        assert fingerprint == test_guest.host_key_fingerprint
        rc, out, err = ssh(client, "command -v docker docker-compose && docker compose version --short"
                                   " && docker-compose version --short && id -u")
    assert rc == 0, err
    lines = out.split()
    assert lines[0].endswith("/docker") and lines[1].endswith("/docker-compose")
    assert lines[-1] == "0"


def test_unknown_host_key_is_rejected(test_guest: TestGuest, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        connect(test_guest, known_hosts=str(empty))


def test_openssh_client_works(test_guest: TestGuest) -> None:
    proc = subprocess.run(test_guest.ssh_argv("echo ok; echo $PATH"), capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "ok"
    assert "/usr/bin" in proc.stdout.splitlines()[1]


def test_run_inside_guest_namespace(test_guest: TestGuest) -> None:
    out = test_guest.run(["ip", "-o", "-4", "addr", "show", "dev", "eth0"], check=True).stdout
    assert f"inet {test_guest.host}/30" in out
    assert test_guest.run("exit 3").returncode == 3


def test_cut_off_times_out_and_restore(test_guest: TestGuest) -> None:
    addr = (test_guest.host, test_guest.port)
    with connect(test_guest) as established:
        test_guest.cut_off()
        test_guest.cut_off()  # idempotent
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            socket.create_connection(addr, timeout=1.5).close()
        elapsed = time.monotonic() - t0
        assert 1.4 <= elapsed < 3.0, f"timed out after {elapsed:.2f} s"
        # Established sessions stall too (all packets to port 22 are dropped).
        with pytest.raises(paramiko.SSHException):
            established.get_transport().open_session(timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        connect(test_guest, timeout=1.0)
    assert time.monotonic() - t0 < 3.0
    test_guest.restore()
    test_guest.restore()  # idempotent
    assert ssh_ok(test_guest, "echo back").strip() == "back"


def test_cut_off_new_only_keeps_sessions(test_guest: TestGuest) -> None:
    with connect(test_guest) as established:
        test_guest.cut_off(new_only=True)
        with pytest.raises(TimeoutError):
            socket.create_connection((test_guest.host, test_guest.port), timeout=1.0).close()
        assert ssh(established, "echo still", timeout=10)[1].strip() == "still"
    test_guest.restore()


def test_freeze_accepts_tcp_but_banner_hangs(test_guest: TestGuest) -> None:
    test_guest.freeze()
    try:
        with socket.create_connection((test_guest.host, test_guest.port), timeout=2.0) as s:
            s.settimeout(1.0)
            with pytest.raises(TimeoutError):
                s.recv(64)
        t0 = time.monotonic()
        with pytest.raises(paramiko.SSHException, match="banner"):
            connect(test_guest, timeout=2.0, banner_timeout=1.0)
        elapsed = time.monotonic() - t0
        assert 0.9 <= elapsed < 3.0, f"banner wait ended after {elapsed:.2f} s"
    finally:
        test_guest.thaw()
    assert ssh_ok(test_guest, "echo thawed").strip() == "thawed"


def test_freeze_sessions_hangs_open_session(test_guest: TestGuest) -> None:
    with connect(test_guest) as client:
        assert ssh(client, "echo before", timeout=10)[1].strip() == "before"
        test_guest.freeze(sessions=True)
        try:
            with pytest.raises(paramiko.SSHException, match="[Tt]imeout"):
                client.get_transport().open_session(timeout=1.0)
        finally:
            test_guest.thaw()
        assert ssh(client, "echo after", timeout=10)[1].strip() == "after"


def test_stop_sshd_refuses_then_start(test_guest: TestGuest) -> None:
    fingerprint = test_guest.host_key_fingerprint
    test_guest.stop_sshd()
    assert test_guest.sshd_pid is None
    t0 = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((test_guest.host, test_guest.port), timeout=2.0).close()
    assert time.monotonic() - t0 < 0.5
    test_guest.start_sshd()
    assert test_guest.host_key_fingerprint == fingerprint
    assert ssh_ok(test_guest, "echo up").strip() == "up"


# ----------------------------------------------------------------------------------------- compose


@pytest.mark.parametrize("flavour", ["v1", "v2"])
def test_compose_stop_start_over_ssh(test_guest: TestGuest, compose_project: ProjectFactory,
                                     flavour: str) -> None:
    project = compose_project("web", {"app": "sleeper", "worker": "sleeper", "stuck": "stubborn"},
                              compose=flavour)
    assert project.name.startswith("vzdh-t-") and project.workdir.name == project.name
    c.up(project)
    assert c.running_services(project) == {"app", "worker", "stuck"}
    info = json.loads(subprocess.run(["docker", "inspect", *c._container_ids(project.name)],
                                     capture_output=True, text=True, check=True).stdout)
    for container in info:
        labels = container["Config"]["Labels"]
        assert labels["com.docker.compose.project"] == project.name
        assert labels["com.docker.compose.project.working_dir"] == str(project.workdir)

    t0 = time.monotonic()
    ssh_ok(test_guest, project.shell_command("stop", "-t", "1"))
    elapsed = time.monotonic() - t0
    assert c.running_services(project) == set()
    assert c.container_exit_codes(project) == {"app": 0, "worker": 0, "stuck": 137}
    assert elapsed < 10, f"stop took {elapsed:.1f} s"

    ssh_ok(test_guest, project.shell_command("start"))
    assert c.running_services(project) == {"app", "worker", "stuck"}


@pytest.mark.parametrize("flavour", ["v1", "v2"])
def test_postgres_clean_stop_and_restart(test_guest: TestGuest, compose_project: ProjectFactory,
                                         flavour: str) -> None:
    project = compose_project("pg", {"db": "postgres", "app": "sleeper"}, compose=flavour)
    c.up(project)
    c.wait_pg_ready(project, timeout=60)
    c.psql(project, "create table t (x int); insert into t values (42)")
    assert c.psql(project, "select x from t") == "42"
    assert c.pg_cluster_state(project) == "in production"

    ssh_ok(test_guest, project.shell_command("stop"))
    assert c.running_services(project) == set()
    assert c.container_exit_codes(project)["db"] == 0
    assert "database system is shut down" in c.logs(project, "db")
    assert c.pg_cluster_state(project) == "shut down"

    ssh_ok(test_guest, project.shell_command("start"))
    c.wait_pg_ready(project, timeout=60)
    assert c.psql(project, "select x from t") == "42"
    restart_log = c.logs(project, "db").split("database system is shut down")[-1]
    assert "database system was shut down at" in restart_log


def test_cleanup_all_removes_only_stale_projects(compose_project: ProjectFactory) -> None:
    project = compose_project("live", {"s": "sleeper"})
    c.up(project)
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale_name = f"vzdh-t-{gone.pid}-0-stale"
    subprocess.run(["docker", "run", "-d", "--network", "none", "--label",
                    f"com.docker.compose.project={stale_name}", "--label",
                    "com.docker.compose.service=s", c.BUSYBOX_IMAGE, "sleep", "600"],
                   check=True, capture_output=True)
    cleaned = c.cleanup_all(only_stale=True)
    assert stale_name in cleaned
    assert project.name not in cleaned  # this process is alive
    assert c._container_ids(stale_name) == []
    assert c.running_services(project) == {"s"}
