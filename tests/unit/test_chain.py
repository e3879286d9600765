"""chain.py: other hook scripts run with the given argv and environment, bounded in time."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from vzdump_hook.vzdump import chain


def script(tmp: Path, name: str, body: str) -> str:
    p = tmp / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return str(p)


def test_runs_each_in_order_with_argv_and_env_and_returns_the_first_failure(tmp_path: Path) -> None:
    log = tmp_path / "log"
    a = script(tmp_path, "a", f'echo "a $* $STOREID $VZDUMP_HOOK_LAUNCHER" >> {log}; exit 5\n')
    b = script(tmp_path, "b", f'echo "b $*" >> {log}; exit 7\n')
    env = {"STOREID": "local", "VZDUMP_HOOK_LAUNCHER": "123"}
    assert chain.run([a, b], ["pre-stop", "snapshot", "101"], env, 10) == 5
    # the launcher's variable is not passed on
    assert log.read_text() == "a pre-stop snapshot 101 local \nb pre-stop snapshot 101\n"


def test_missing_script_counts_as_failed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert chain.run([str(tmp_path / "nope")], ["job-start"], {}, 10) == 1
    assert "could not be started" in caplog.text


def test_a_script_past_its_timeout_is_killed_with_its_group(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pidfile = tmp_path / "child"
    s = script(tmp_path, "hang", f"sleep 300 & echo $! > {pidfile}; wait\n")
    start = time.monotonic()
    assert chain.run([s], ["backup-end", "snapshot", "101"], {}, 1) == 1
    assert time.monotonic() - start < chain.KILL_GRACE + 5
    child = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        for _ in range(50):  # reaped by init shortly after the kill
            os.kill(child, 0)
            time.sleep(0.1)
    assert "still running after chain_timeout (1 s): killed" in caplog.text
