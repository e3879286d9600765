"""Admin commands (check, status, simulate, history, recover) of the installed hook against a real guest."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.infra import compose
from tests.integration.hookenv import HookSetup, installed_hook

pytestmark = pytest.mark.integration
VMID = 101


def admin(setup: HookSetup, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = setup.env | {"PATH": "/usr/bin:/bin"}
    return subprocess.run([installed_hook(), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def guest_with_stacks(tmp_path: Path, test_guest: Any, compose_project: Any) -> tuple[HookSetup, list[compose.ComposeProject]]:
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
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"a backup stops: {db.name}, {web.name} (in this order, started in reverse)" in r.stdout
    assert "configured but not running (left alone): not-here" in r.stdout
    assert compose.running_services(db) == {"app"} and not setup.marker_path(VMID).exists()


def test_check_reports_an_unknown_host_key_with_its_fingerprint(guest_with_stacks: Any, test_guest: Any) -> None:
    setup, _ = guest_with_stacks
    Path(test_guest.known_hosts_file).write_text("")
    r = admin(setup, "check")
    assert r.returncode == 1
    assert test_guest.host_key_fingerprint in r.stdout and "ssh-keyscan" in r.stdout


def test_check_config_errors_name_the_key_path(tmp_path: Path) -> None:
    setup = HookSetup(tmp_path)
    setup.config.write_text('[guests.101]\nssh = { host = "h", port = 70000 }\nstacks = "all"\nbogus = 1\n')
    r = admin(setup, "check")
    assert r.returncode != 0
    for text in ("guests.101.ssh.port: must be 1-65535", "guests.101.stacks:", "guests.101.bogus: unknown key"):
        assert text in r.stderr, r.stderr


def test_simulate_plays_the_phases_and_leaves_everything_running(guest_with_stacks: Any) -> None:
    setup, (db, web) = guest_with_stacks
    r = admin(setup, "simulate", str(VMID), "--type", "lxc", "--mode", "snapshot", "--pause", "0.5")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"pre-stop {VMID}: stopped {db.name}, {web.name}" in r.stdout
    assert f"post-restart {VMID}: started {web.name}, {db.name}" in r.stdout
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


def test_status_shows_a_marker(guest_with_stacks: Any) -> None:
    setup, (db, web) = guest_with_stacks
    setup.marker_path(VMID).write_text("not json")
    r = admin(setup, "status")
    assert r.returncode == 0
    assert f"{VMID}: marker unknown: marker: not JSON" in r.stdout, r.stdout
    setup.marker_path(VMID).unlink()
    r = admin(setup, "status")
    assert f"{VMID}: no marker" in r.stdout


def test_recover_without_marker_and_usage(guest_with_stacks: Any) -> None:
    setup, _ = guest_with_stacks
    r = admin(setup, "recover", "--all")
    assert r.returncode == 0 and f"{VMID}: no marker, nothing to do" in r.stdout
    r = admin(setup, "recover")
    assert r.returncode == 2 and "give a VMID or --all" in r.stderr
