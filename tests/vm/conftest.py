"""The VM tier: one real QEMU VM per test session (tests/infra/vm.py), booted from the image that
scripts/setup-test-host.sh built (tests/infra/vm_image.py; built here when missing).

A machine that cannot run QEMU at all skips the whole tier with one loud line; that is the only skip
CI accepts (tests/conftest.py). Everything else that goes wrong is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.infra import vm_image
from tests.infra.vm import QEMU, TestVm, cleanup_stale

VMID = 100
from tests.conftest import VM_TIER_SKIP as TIER_SKIP  # noqa: E402 - the one skip CI lets through


class MuxVm(TestVm):
    """A :class:`TestVm` whose ssh commands share one connection (OpenSSH multiplexing: ``ControlMaster``).

    Under TCG a new ssh connection costs the VM ~1.5 s of CPU (key exchange, authentication, a new sshd),
    a session on a held one ~0.2 s; the tests poll the VM over ssh all along. The commands and their
    sessions are the same (one remote shell each, its exit status and output); only the tests' own commands
    go through it, never the hook's (its transports open their own connections, as in production).
    ``ControlPersist``: the master outlives a command by that long, then exits by itself; close() ends it."""

    __test__ = False

    @property
    def control_path(self) -> Path:
        return self.workdir / "ssh-mux"

    def ssh_argv(self, *command: str, connect_timeout: float = 5) -> list[str]:
        argv = super().ssh_argv(*command, connect_timeout=connect_timeout)
        return [argv[0], "-o", "ControlMaster=auto", "-o", f"ControlPath={self.control_path}",
                "-o", "ControlPersist=60", *argv[1:]]

    def close(self) -> None:
        if self.control_path.exists():
            subprocess.run(["ssh", "-o", f"ControlPath={self.control_path}", "-O", "exit", f"root@{self.address}"],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)
        super().close()


def vm_support_problem() -> str | None:
    """Why this machine cannot run the VM tier at all, or None."""
    if os.geteuid() != 0:
        return "needs root (tap device, network namespace)"
    if not os.access(QEMU, os.X_OK):
        return f"{QEMU} missing (scripts/setup-test-host.sh installs qemu-system-x86)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun (no tap networking in this kernel or container)"
    return None


@pytest.fixture(scope="package")
def vm() -> Iterator[TestVm]:
    """The tier's VM, booted and ready (ssh, agent, docker images). Its QMP and QGA sockets are in a short
    temp dir (the hook's ``qmp_dir``). Package-scoped: it is shut down once the tier's last test ran, not at
    the end of the session (in a parallel run its worker goes on with other tests, and an idle VM under TCG
    still takes CPU)."""
    problem = vm_support_problem()
    if problem:
        pytest.skip(f"{TIER_SKIP} {problem}")
    cleanup_stale()
    # In a parallel run the VM tier (one worker, QEMU under TCG) is the longest chain and the other workers'
    # tests have slack: the tier's worker, and the QEMU and commands it starts, run at nice -5 until it ends.
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    os.setpriority(os.PRIO_PROCESS, 0, niceness - 5)
    try:
        yield from _booted()
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)


def _booted() -> Iterator[TestVm]:
    img = vm_image.image()
    qmp_dir = Path(tempfile.mkdtemp(prefix="vzdh-qs-", dir="/tmp"))  # unix socket paths must be short
    machine = MuxVm(img, VMID, qmp_dir)
    try:
        machine.start()
        print(f"\nVM tier: booted in {machine.boot_seconds:.1f} s ({machine.accel}) at {machine.address}")
        yield machine
    finally:
        machine.close()
        shutil.rmtree(qmp_dir, ignore_errors=True)
