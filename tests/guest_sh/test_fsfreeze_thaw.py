"""examples/guest/fsfreeze-hook.d/vzdump-hook-thaw under dash and busybox sh: on "thaw" it starts
vzdump-hook-recover --force in the background and returns at once (qemu-ga waits for it before it
answers vzdump's thaw); on "freeze" or anything else it does nothing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.guest_sh.conftest import GUEST_DIR, Guest

THAW = GUEST_DIR / "fsfreeze-hook.d" / "vzdump-hook-thaw"


@pytest.fixture
def recover(guest: Guest) -> Path:
    """A stand-in recovery program: notes its arguments, then takes its time like one starting stacks."""
    p = guest.root / "recover"
    # the line is written whole, then renamed into place: a reader never sees the file empty
    p.write_text('#!/bin/sh\necho "$@" > "$0.args.new"\nmv "$0.args.new" "$0.args"\nsleep 3\necho done >> "$0.args"\n')
    p.chmod(0o755)
    return p


def _env(recover: Path, guest: Guest) -> dict[str, str]:
    return {"VZDUMP_HOOK_RECOVER": str(recover), "VZDUMP_HOOK_GUEST_CONF": str(guest.conf)}


def test_thaw_starts_recovery_in_the_background(guest: Guest, recover: Path) -> None:
    t0 = time.monotonic()
    proc = guest.run(THAW, "thaw", env=_env(recover, guest), timeout=10)
    assert proc.returncode == 0 and time.monotonic() - t0 < 1.5, proc.stderr
    args = Path(f"{recover}.args")
    until = time.monotonic() + 5
    while not args.exists() and time.monotonic() < until:
        time.sleep(0.05)
    assert args.read_text().split("\n")[0] == f"--conf {guest.conf} --force --quiet"


@pytest.mark.parametrize("argv", [["freeze"], [], ["thawed"]])
def test_anything_but_thaw_does_nothing(guest: Guest, recover: Path, argv: list[str]) -> None:
    proc = guest.run(THAW, *argv, env=_env(recover, guest), timeout=10)
    assert proc.returncode == 0
    time.sleep(0.3)
    assert not Path(f"{recover}.args").exists()


def test_no_recovery_program_installed(guest: Guest) -> None:
    proc = guest.run(THAW, "thaw", env={"VZDUMP_HOOK_RECOVER": str(guest.root / "absent")}, timeout=10)
    assert proc.returncode == 0 and proc.stdout == b"" and proc.stderr == b""
