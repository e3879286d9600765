"""Admin commands (check, status, simulate, history, recover) of the installed hook against a real guest."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.infra import compose
from tests.integration.hookenv import HookSetup, installed_hook

pytestmark = pytest.mark.integration
VMID = 101


def admin(setup: HookSetup, *args: str, timeout: float = 120, input: str = "") -> subprocess.CompletedProcess[str]:
    env = setup.env | {"PATH": "/usr/bin:/bin"}
    return subprocess.run([installed_hook(), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          input=input)


@pytest.fixture
def guest_with_stacks(tmp_path: Path, test_guest: Any,
                      compose_project: Any) -> tuple[HookSetup, list[compose.ComposeProject]]:
    db = compose_project("db", {"app": "sleeper"})
    web = compose_project("web", {"app": "sleeper"})
    for p in (db, web):
        compose.up(p)
    setup = HookSetup(tmp_path)
    setup.write({VMID: (test_guest, {"stacks": [db.name, web.name, "not-here"]})})
    return setup, [db, web]


def test_check_shows_what_would_be_stopped_and_changes_nothing(guest_with_stacks: Any) -> None:
    setup, (db, web) = guest_with_stacks
    r = admin(setup, "check")
    assert r.returncode == 1, r.stdout + r.stderr  # the guest has no recovery program: a problem
    assert "guest side: recovery NOT INSTALLED" in r.stdout
    assert f"a backup stops: {db.name}, {web.name} (in this order, started in reverse)" in r.stdout
    # a project with no container at all is not "left alone": its name is wrong, and check says which key
    assert (f"DOES NOT EXIST: guests.{VMID}.stacks[2].name: compose project 'not-here' has no container in the guest"
            in r.stdout), r.stdout
    assert compose.running_services(db) == {"app"} and not setup.marker_path(VMID).exists()


def test_check_reports_an_unknown_host_key_with_its_fingerprint(guest_with_stacks: Any, test_guest: Any) -> None:
    setup, _ = guest_with_stacks
    Path(test_guest.known_hosts_file).write_text("")
    r = admin(setup, "check")
    assert r.returncode == 1
    assert test_guest.host_key_fingerprint in r.stdout and "`vzdump-hook trust VMID`" in r.stdout


def test_check_config_errors_name_the_key_path(tmp_path: Path) -> None:
    setup = HookSetup(tmp_path)
    setup.config.write_text('[guests.101]\nssh = { host = "h", port = 70000 }\nstacks = "all"\nbogus = 1\n')
    r = admin(setup, "check")
    assert r.returncode != 0
    for text in ("guests.101.ssh.port: must be 1-65535", "guests.101.stacks:", "guests.101.bogus: unknown key"):
        assert text in r.stderr, r.stderr


def test_simulate_plays_the_phases_and_leaves_everything_running(guest_with_stacks: Any) -> None:
    setup, (db, web) = guest_with_stacks
    r = admin(setup, "simulate", str(VMID), "--type", "lxc", "--mode", "snapshot", "--pause", "0.5", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"pre-stop {VMID}: stopped {db.name}, {web.name}" in r.stdout
    assert f"pre-restart {VMID}: started {web.name}, {db.name}" in r.stdout  # the CT is thawed there
    assert compose.running_services(db) == {"app"} and compose.running_services(web) == {"app"}
    h = admin(setup, "history", str(VMID))
    assert h.returncode == 0 and "lxc/snapshot" in h.stdout and "resumed" in h.stdout, h.stdout


def test_simulate_dry_run_changes_nothing(guest_with_stacks: Any) -> None:
    setup, (db, web) = guest_with_stacks
    r = admin(setup, "simulate", str(VMID), "--type", "qemu", "--mode", "snapshot", "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"write the marker, stop {db.name}, {web.name}" in r.stdout
    assert "pre-restart   stacks stay down until QEMU's backup job has started (or backup-end)" in r.stdout
    assert "post-restart  watch QMP: start the stacks once QEMU's backup job has started" in r.stdout  # early resume
    assert f"backup-end    start {web.name}, {db.name}" in r.stdout
    assert compose.running_services(db) == {"app"} and not setup.marker_path(VMID).exists()


def test_simulate_asks_before_stopping_anything(guest_with_stacks: Any) -> None:
    setup, (db, web) = guest_with_stacks
    for answer in ("", "n\n"):  # no terminal (EOF), or a no
        r = admin(setup, "simulate", str(VMID), "--type", "lxc", "--mode", "snapshot", "--pause", "0.5", input=answer)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "this REALLY stops the stacks a backup would stop" in r.stdout
        assert "pre-stop" not in r.stdout
        assert compose.running_services(db) == {"app"} and not setup.marker_path(VMID).exists()
    r = admin(setup, "simulate", str(VMID), "--type", "lxc", "--mode", "snapshot", "--pause", "0.5", input="y\n")
    assert r.returncode == 0 and f"pre-stop {VMID}: stopped {db.name}, {web.name}" in r.stdout, r.stdout + r.stderr


def test_status_shows_a_marker_and_exits_1_while_anything_is_down_or_unknown(guest_with_stacks: Any,
                                                                              test_guest: Any) -> None:
    setup, (db, web) = guest_with_stacks
    r = admin(setup, "status")
    # no job-start has run
    expected = [f"ledger {setup.tmp / 'state' / 'ledger'}: no outstanding marker",
                f"{VMID}: no marker; ledger: does not cover it yet (the next job-start asks it)"]
    assert (r.returncode, r.stdout.splitlines()) == (0, expected), r.stdout + r.stderr
    setup.marker_path(VMID).write_text("not json")
    r = admin(setup, "status")
    assert r.returncode == 1
    assert f"{VMID}: marker unknown: marker: not JSON" in r.stdout, r.stdout
    setup.marker_path(VMID).unlink()
    test_guest.stop_sshd()
    r = admin(setup, "status")
    assert r.returncode == 1 and f"{VMID}: marker unknown:" in r.stdout, r.stdout
    assert admin(setup, "status", "--no-connect").returncode == 0  # the node's records alone: nothing down


def test_status_exits_1_for_a_marker_of_a_job_that_is_over(guest_with_stacks: Any) -> None:
    setup, (db, web) = guest_with_stacks
    r = admin(setup, "simulate", str(VMID), "--type", "lxc", "--mode", "snapshot", "--pause", "0.5", "--yes")
    assert r.returncode == 0
    # a marker as a job that died would leave it: written by a pid that is gone
    from vzdump_hook.guest.marker import Marker
    from vzdump_hook.node.job import JobId, node_name

    gone = JobId(node_name(), "", 999999, 1)
    setup.marker_path(VMID).write_bytes(Marker(gone, VMID, "lxc", "snapshot", time.time(), time.time() + 600, "stopped",
                                               ()).to_json())
    r = admin(setup, "status")
    assert r.returncode == 1 and f"{VMID}: MARKER of job" in r.stdout and "job over" in r.stdout, r.stdout + r.stderr


def test_check_no_connect_validates_without_contacting_guests(guest_with_stacks: Any, test_guest: Any) -> None:
    setup, _ = guest_with_stacks
    test_guest.stop_sshd()
    r = admin(setup, "check", "--no-connect")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[0] == f"config {setup.config}: ok, 1 guest(s) handled"
    assert "FAILED" not in r.stdout and "running stacks" not in r.stdout
    assert admin(setup, "check").returncode == 1  # with connecting: the guest is off


def test_check_warns_about_contradicting_settings(tmp_path: Path, test_guest: Any) -> None:
    setup = HookSetup(tmp_path)
    setup.write({VMID: (test_guest, {"stacks": ["db", {"name": "web", "stop_timeout": 3600}], "max_downtime": 60,
                                     "exclude": ["x"]})})
    r = admin(setup, "check", "--no-connect")
    assert r.returncode == 0, r.stdout + r.stderr
    warnings = [line.strip() for line in r.stdout.splitlines() if "WARNING" in line]
    assert warnings == [
        f"WARNING: guests.{VMID}.stop_timeout: the stop timeouts of its stacks add up to 3630 s, "
        "longer than max_downtime (60 s): "
        "the guest's recovery may start stacks while the backup still needs them down",
        f"WARNING: guests.{VMID}.exclude: ignored: stacks is an explicit list "
        '(exclude only applies to stacks = "auto")',
    ], r.stdout


def test_version_is_the_packages(tmp_path: Path) -> None:
    import tomllib

    version = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["version"]
    r = admin(HookSetup(tmp_path), "--version")
    assert (r.returncode, r.stdout) == (0, f"vzdump-hook {version}\n")


def test_trust_shows_the_fingerprint_and_writes_only_after_confirmation(guest_with_stacks: Any,
                                                                         test_guest: Any) -> None:
    setup, _ = guest_with_stacks
    kh = Path(test_guest.known_hosts_file)
    kh.write_text("")
    assert admin(setup, "check").returncode == 1  # unknown host key
    r = admin(setup, "trust", str(VMID), input="n\n")
    assert r.returncode == 1 and kh.read_text() == ""
    assert f"host key {test_guest.host_key_fingerprint}" in r.stdout.replace("ssh-ed25519 ", ""), r.stdout
    assert "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub" in r.stdout
    r = admin(setup, "trust", str(VMID), input="y\n")
    assert r.returncode == 0 and "added to" in r.stdout, r.stdout + r.stderr
    r = admin(setup, "check")
    assert f"{VMID} ssh " in r.stdout and ": ok in " in r.stdout, r.stdout  # the host key is trusted now
    r = admin(setup, "trust", str(VMID))
    assert r.returncode == 0 and "already trusted" in r.stdout
    line = kh.read_text().split()
    kh.write_text(f"{line[0]} {line[1]} {OTHER_ED25519}\n")  # another key for the same guest
    r = admin(setup, "trust", str(VMID), "--yes")
    assert r.returncode == 1 and "ANOTHER ssh-ed25519 key" in r.stderr, r.stdout + r.stderr
    assert OTHER_ED25519 in kh.read_text()


# an ed25519 public key that is not the test guest's
OTHER_ED25519 = "AAAAC3NzaC1lZDI1NTE5AAAAIIYR+cnWRf0PCZBle9fT0tt2bBufO9Mvdk7NJGef2xfD"


def test_recover_without_marker_and_usage(guest_with_stacks: Any) -> None:
    setup, _ = guest_with_stacks
    r = admin(setup, "recover", "--all")
    assert r.returncode == 0 and f"{VMID}: no marker, nothing to do" in r.stdout
    r = admin(setup, "recover")
    assert r.returncode == 2 and "give a VMID or --all" in r.stderr
