"""The restricted-key wrapper passes the controller's command carrier (docs/controller-api.md section 4)
under dash and busybox sh: the hook's own ControllerDriver talks through it to the reference controller
(examples/controller/vzdump-controller, a real process; no stacks here, so nothing is stopped), and
every line that is not exactly a message of the contract is refused before the controller runs."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.guest_sh.conftest import Guest
from tests.guest_sh.test_wrapper import LOG_NAME, WrapperTransport, forced, log_lines
from vzdump_hook import config as configuration
from vzdump_hook.guest.install import Layout, conf_text
from vzdump_hook.guest.session import _confirmed
from vzdump_hook.node.job import JobId
from vzdump_hook.stacks.controller import ControllerDriver, job_string

CONTROLLER = Path(__file__).resolve().parents[2] / "examples" / "controller" / "vzdump-controller"
JOB = JobId("pve1", "0f0f0f0f-1111-2222-3333-444455556666", 4242, 1000)


@pytest.fixture
def command(guest: Guest) -> list[str]:
    """The controller's command as the node's config gives it; its state under the guest's root."""
    cfg = guest.root / "controller.json"
    cfg.write_text(json.dumps({"state_dir": str(guest.root / "ctl-state"), "stacks": []}))
    return [sys.executable, str(CONTROLLER), "--config", str(cfg)]


def settings(guest: Guest, command: list[str]) -> configuration.GuestConfig:
    return configuration.validate_guest(101, {"ssh": {"host": "192.0.2.1"}, "marker_path": str(guest.marker),
                                              "stacks": [{"kind": "controller", "name": "ctl", "command": command}]})


def write_conf(guest: Guest, g: configuration.GuestConfig) -> None:
    """guest.conf as `vzdump-hook guest install` writes it, with the test's marker and log."""
    text = conf_text(g, Layout()).decode()
    guest.conf.write_text(text + f"LOG={guest.root / LOG_NAME}\nROOT={guest.root}\n")


def state(command: list[str]) -> dict[str, object]:
    out = subprocess.run([*command, "status"], capture_output=True, text=True, timeout=60, check=True).stdout
    return dict(json.loads(out))


def test_the_hook_talks_to_its_controller_through_the_wrapper(guest: Guest, command: list[str]) -> None:
    g = settings(guest, command)
    write_conf(guest, g)
    assert f"CONTROLLER={' '.join(command)}" in guest.conf.read_text() and "KINDS=controller" in guest.conf.read_text()
    d = ControllerDriver(WrapperTransport(guest), g, JOB)
    d.mode, d.deadline = "snapshot", time.time() + 600
    rec = d.running(g.stacks or (), 10)["ctl"]
    out = d.stop(rec, 5, 60)
    assert out.clean, out
    assert state(command)["open_job"]["state"] == "quiesced"  # type: ignore[index]
    (rec,) = _confirmed((rec,), [out])  # as the session records a confirmed quiesce: snapshotted follows
    d.start(rec, 60)
    d.close(rec, "done", 60)
    closed = state(command)["closed"]
    assert [(c["job"], c["state"]) for c in closed] == [(job_string(JOB), "done")], closed  # type: ignore[union-attr]
    assert not [ln for ln in log_lines(guest) if "REFUSED" in ln], log_lines(guest)
    assert sum("allowed: controller" in ln for ln in log_lines(guest)) == 3


def refused_lines(cmd: str) -> dict[str, str]:
    job = job_string(JOB)
    return {
        "unknown phase": f"{cmd} signal restart --job {job} --vmid 101",
        "command after": f"{cmd} signal status; id",
        "substitution in job": f"{cmd} signal done --job $(id) --vmid 101",
        "quoted job": f"{cmd} signal done --job {shlex.quote('a b')} --vmid 101",
        "another option": f"{cmd} signal done --job {job} --vmid 101 --config /etc/passwd",
        "job twice": f"{cmd} signal done --job {job} --job {job} --vmid 101",
        "no vmid": f"{cmd} signal done --job {job}",
        "vmid zero-led": f"{cmd} signal done --job {job} --vmid 0101",
        "quiesce incomplete": f"{cmd} signal quiesce --job {job} --vmid 101 --mode snapshot",
        "quiesce bad mode": f"{cmd} signal quiesce --job {job} --vmid 101 --mode fast --deadline 1 --answer-within 5",
        "deadline not a number": f"{cmd} signal quiesce --job {job} --vmid 101 --mode stop --deadline 1e9 "
                                 "--answer-within 5",
        "mode outside quiesce": f"{cmd} signal done --job {job} --vmid 101 --mode stop",
        "status with options": f"{cmd} signal status --job {job}",
        "option without value": f"{cmd} signal done --vmid 101 --job",
        "newline": f"{cmd} signal status\nid",
        "another subcommand": f"{cmd} recover",
    }


@pytest.mark.parametrize("case", sorted(refused_lines("X")))
def test_anything_but_a_message_is_refused(guest: Guest, command: list[str], case: str) -> None:
    write_conf(guest, settings(guest, command))
    p = forced(guest, refused_lines(" ".join(command))[case])
    assert p.returncode == 126, (case, p.stdout, p.stderr)
    assert not (guest.root / "ctl-state").exists(), case  # the controller never ran


def test_without_a_controller_stack_the_verb_is_refused(guest: Guest, command: list[str]) -> None:
    g = configuration.validate_guest(101, {"ssh": {"host": "192.0.2.1"}, "marker_path": str(guest.marker),
                                           "stacks": ["db"]})
    text = conf_text(g, Layout()).decode()
    guest.conf.write_text(text + f"LOG={guest.root / LOG_NAME}\nROOT={guest.root}\nCONTROLLER={' '.join(command)}\n")
    p = forced(guest, f"{' '.join(command)} signal status")
    assert p.returncode == 126 and b"no controller stack" in p.stderr, p.stderr
