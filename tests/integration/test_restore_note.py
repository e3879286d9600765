"""A backup holds the stacks stopped, and docker does not start containers stopped by hand when the
restored guest boots: backup-start says so when the guest's recovery program is missing, asking the
guest only when the node has no recent answer. The installed hook, run by the vzdump stand-in, against
the test guest; the guest side is installed with `vzdump-hook guest install` under a test root."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.infra import compose
from tests.infra.vzdump import GuestSpec, GuestType, JobResult, Mode, run_job
from tests.integration.hookenv import HookSetup, installed_hook

pytestmark = pytest.mark.integration
VMID = 101
NOTE = "guest side: recovery NOT INSTALLED: a restore of this backup comes up with"


def backup(setup: HookSetup, env: dict[str, str]) -> JobResult:
    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=setup.env | env,
                     timeout=120)
    assert result.ok, result.task_log()
    return result


def backup_start_commands(result: JobResult) -> list[str]:
    (rec,) = [r for r in result.records if r.phase == "backup-start"]
    # VZDUMP_HOOK_DEBUG: one line per guest command
    return [o.text for o in rec.output if " -> " in o.text and " ms" in o.text]


def test_backup_start_names_a_missing_recovery_program_and_asks_only_when_needed(tmp_path: Path, test_guest: Any,
                                                                                 compose_project: Any) -> None:
    db = compose_project("db", {"app": "sleeper"})
    compose.up(db)
    setup = HookSetup(tmp_path)
    setup.write({VMID: (test_guest, {"stacks": [db.name]})})
    env = {"VZDUMP_HOOK_GUEST_ROOT": str(test_guest.workdir / "root"), "VZDUMP_HOOK_DEBUG": "1"}

    first = backup(setup, env)
    assert f"WARNING: backup-start {VMID}: {NOTE} {db.name} stopped" in first.task_log(), first.task_log()
    asked = len(backup_start_commands(first))
    again = backup(setup, env)
    assert NOTE in again.task_log()  # said at every job, from the node's recent answer
    assert len(backup_start_commands(again)) < asked

    r = subprocess.run([installed_hook(), "guest", "install", str(VMID), "--no-restrict"],
                       env=setup.env | env | {"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    installed = backup(setup, env)
    assert "guest side" not in installed.task_log()
    assert len(backup_start_commands(installed)) == asked  # `guest install` made the node forget: asked, current
    known = backup(setup, env)
    assert "guest side" not in known.task_log()
    assert len(backup_start_commands(known)) < asked  # the node's answer is recent: no question
    assert compose.running_services(db) == {"app"}
