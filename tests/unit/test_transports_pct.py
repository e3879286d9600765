"""pct transport: the argv it hands to pct, bounded runs, and pct's own failures. The `pct` here is a
small script that logs its argv and environment and runs the command on this host (the real
container stand-in is used in tests/integration/test_transport_behaviour.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vzdump_hook.config import validate_guest
from vzdump_hook.errors import CommandTimeout, ConnectError
from vzdump_hook.transports import open_transport
from vzdump_hook.transports.pct import GUEST_PATH, PctTransport

FAKE_PCT = """#!/bin/sh
printf '%s\\n' "$@" > "{log}.argv"
env > "{log}.env"
[ "$2" = 999 ] && {{ echo "Configuration file 'nodes/n/lxc/999.conf' does not exist" >&2; exit 255; }}
[ "$2" = 998 ] && {{ echo "lxc-attach: 998: attach.c: lxc_attach: 1136 Failed to get init pid" >&2; exit 1; }}
shift 3
exec "$@"
"""


@pytest.fixture
def pct(tmp_path: Path) -> Path:
    exe = tmp_path / "pct"
    exe.write_text(FAKE_PCT.format(log=tmp_path / "call"))
    exe.chmod(0o755)
    return exe


def test_argv_is_pct_exec_vmid_then_env_with_a_path_then_the_command(pct: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VZDH_LEAK", "1")
    t = PctTransport(101, str(pct))
    r = t.run(["sh", "-c", 'cat; printf "%s" "$1"; echo e >&2; exit 3', "sh", "$(x) y"], timeout=10, stdin=b"in|")
    assert (r.exit_status, r.stdout, r.stderr) == (3, "in|$(x) y", "e\n")
    argv = (tmp_path / "call.argv").read_text().splitlines()
    assert argv[:6] == ["exec", "101", "--", "/usr/bin/env", f"PATH={GUEST_PATH}", "sh"]
    env = (tmp_path / "call.env").read_text()
    assert "VZDH_LEAK" not in env and "PATH=/usr/sbin:/usr/bin:/sbin:/bin" in env
    assert "/usr/local/bin" in GUEST_PATH  # docker-compose v1 lives there; pct's own PATH lacks it


def test_registry_and_config_give_the_absolute_pct_path(pct: Path) -> None:
    t = open_transport(validate_guest(101, {"transport": "pct", "pct": {"path": str(pct)}}))
    assert isinstance(t, PctTransport) and t.pct == str(pct) and t.target == "pct 101"
    d = open_transport(validate_guest(102, {"transport": "pct"}))
    assert isinstance(d, PctTransport) and d.pct == "/usr/sbin/pct"


def test_a_command_that_hangs_is_killed_at_its_timeout(pct: Path) -> None:
    start = time.monotonic()
    with pytest.raises(CommandTimeout, match="killed"):
        PctTransport(101, str(pct)).run(["sleep", "30"], timeout=1.0)
    assert time.monotonic() - start < 2.5


@pytest.mark.parametrize(("vmid", "text"), [(999, "does not exist"), (998, "Failed to get init pid")])
def test_a_container_that_is_absent_or_stopped_is_a_connect_error_with_pcts_words(pct: Path, vmid: int,
                                                                                  text: str) -> None:
    with pytest.raises(ConnectError, match=text):
        PctTransport(vmid, str(pct)).connect(5)


def test_pct_missing_is_a_connect_error(tmp_path: Path) -> None:
    with pytest.raises(ConnectError, match="cannot run"):
        PctTransport(101, str(tmp_path / "no-pct")).connect(5)


def test_output_is_capped(pct: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vzdump_hook.transports import local

    monkeypatch.setattr(local, "MAX_OUTPUT", 1000)
    status, out, _ = PctTransport(101, str(pct))._exec(["head", "-c", "100000", "/dev/zero"], None, 10)
    assert status == 0 and len(out) == 1000
