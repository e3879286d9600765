"""A test guest whose init is a real systemd: a Debian 12 root booted with ``systemd-nspawn --boot``.

The root (systemd, dbus, PostgreSQL 15 as a native service) is made by scripts/setup-test-host.sh and
cached at :data:`ROOT_TAR`; each :class:`SystemdGuest` unpacks its own copy, so unit files and data
written by one test module never reach another. The guest has a network namespace of its own with only
``lo`` (``--private-network``) and is not registered with machined (the test host has no system bus).

It is reached like an LXC container of Proxmox VE: through the ``pct`` stand-in
(:mod:`tests.infra.pct_standin`), which enters all its namespaces (pid too: systemd answers
``systemctl stop`` only from a process of its own pid namespace). Its files are also on the host,
under :attr:`SystemdGuest.root`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["ROOT_TAR", "SystemdGuest", "support_problem"]

ROOT_TAR = Path("/var/cache/vzdh-test/systemd-guest.tar")
NSPAWN = "/usr/bin/systemd-nspawn"
NSENTER = "/usr/bin/nsenter"
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_OPEN: set[SystemdGuest] = set()  # closed at exit if a test run ends without closing them


def support_problem() -> str | None:
    """Why a systemd guest cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn)"
    if not os.access(NSPAWN, os.X_OK):
        return f"{NSPAWN} is missing (scripts/setup-test-host.sh installs systemd-container)"
    if not ROOT_TAR.is_file():
        return f"{ROOT_TAR} is missing (scripts/setup-test-host.sh builds it)"
    return None


def _init_of(pid: int) -> int:
    """The pid of the systemd that is init of nspawn `pid`'s container, or 0 while there is none."""
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            if p != pid and os.readlink(f"/proc/{p}/exe").endswith("/systemd"):
                return p
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            continue
    return 0


class SystemdGuest:
    """Container `vmid` booted from a copy of :data:`ROOT_TAR` under `workdir` (the pct stand-in's
    state directory). ``units`` (file name -> text) are installed in /etc/systemd/system and
    ``enable`` ones are enabled before the boot; ``prepare(root)`` runs last before it."""

    def __init__(self, vmid: int, workdir: Path, units: dict[str, str] | None = None, enable: tuple[str, ...] = (),
                 prepare: Callable[[Path], None] | None = None) -> None:
        self.vmid = vmid
        self.workdir = Path(workdir)
        self.root = self.workdir / f"ct{vmid}-root"
        self.machine = f"vzdh-{os.getpid()}-{vmid}"
        self._proc: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.root.mkdir(parents=True)
        subprocess.run(["tar", "-xf", str(ROOT_TAR), "-C", str(self.root)], check=True, timeout=300)
        sysd = self.root / "etc/systemd/system"
        for name, text in (units or {}).items():
            (sysd / name).write_text(text)
        wants = sysd / "multi-user.target.wants"
        wants.mkdir(exist_ok=True)
        for name in enable:
            (wants / name).symlink_to(f"/etc/systemd/system/{name}")
        if prepare is not None:
            prepare(self.root)
        _OPEN.add(self)
        self.start()

    def start(self, timeout: float = 90.0) -> None:
        """Boot; returns when systemd reports the boot finished (running or degraded)."""
        log = open(self.workdir / f"ct{self.vmid}-console.log", "ab")
        self._proc = subprocess.Popen(
            [NSPAWN, "-q", "--boot", "--register=no", "--keep-unit", "--private-network", "-D", str(self.root),
             f"--machine={self.machine}"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, env={"PATH": PATH})
        log.close()
        until = time.monotonic() + timeout
        state = b""
        while state not in (b"running", b"degraded"):
            if self._proc.poll() is not None or time.monotonic() > until:
                raise RuntimeError(f"guest {self.vmid} did not boot (systemd says {state!r}): {self.console_tail()}")
            self.leader = self.leader or _init_of(self._proc.pid)
            if self.leader:
                r = self.run(["systemctl", "is-system-running", "--wait"], timeout=max(1.0, until - time.monotonic()))
                state = r.stdout.strip()
            if state not in (b"running", b"degraded"):
                time.sleep(0.1)  # systemd is not up yet (no init, or "offline": its bus is not there yet)
        (self.workdir / f"{self.vmid}.conf").write_text(f"hostname: ct{self.vmid}\n")
        (self.workdir / f"{self.vmid}.pid").write_text(f"{self.leader}\n")
        (self.workdir / f"{self.vmid}.ns").write_text("-a\n")

    def console_tail(self, n: int = 2000) -> str:
        path = self.workdir / f"ct{self.vmid}-console.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def run(self, argv: list[str], input: bytes | None = None, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run argv in the guest (all its namespaces), as root; test set-up and checks, no pct involved."""
        return subprocess.run([NSENTER, "-t", str(self.leader), "-a", "--", "env", "-i", f"PATH={PATH}",
                               *(f"{k}={v}" for k, v in (env or {}).items()), *argv],
                              input=input, capture_output=True, timeout=timeout)

    def ok(self, argv: list[str], **kw: object) -> str:
        r = self.run(argv, **kw)  # type: ignore[arg-type]
        assert r.returncode == 0, f"{argv}: exit {r.returncode}: {r.stdout!r} {r.stderr!r}"
        return r.stdout.decode()

    def state(self, unit: str) -> str:
        """The unit's ActiveState, as systemd says."""
        return self.ok(["systemctl", "show", "--property=ActiveState", "--value", "--", unit]).strip()

    def file(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def stop(self) -> None:
        """Power the guest off at once, as a crash does (`systemctl poweroff -ff`: reboot(2) in its pid
        namespace ends every process in it); nspawn is killed if it does not end in 30 s."""
        if self._proc is not None and self._proc.poll() is None:
            if self.leader:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.run(["systemctl", "poweroff", "-ff"], timeout=10)
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # the guest's init is in a session of its own: killed first
                if self.leader:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.leader, signal.SIGKILL)
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=10)
        self.leader = 0

    def close(self) -> None:
        _OPEN.discard(self)
        self.stop()
        for name in (f"{self.vmid}.conf", f"{self.vmid}.pid", f"{self.vmid}.ns"):
            (self.workdir / name).unlink(missing_ok=True)
        shutil.rmtree(self.root, ignore_errors=True)


@atexit.register
def _close_all() -> None:
    for g in list(_OPEN):
        g.close()
