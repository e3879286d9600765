"""A stand-in for Proxmox VE's `pct` (only `pct exec VMID -- CMD...`) and the containers it reaches.

A container (:class:`NsContainer`) is an init process in a mount and a network namespace of its own
(``unshare``), with its own ``/var/lib`` (a bind mount of a host directory, so a test reads the marker
where the container wrote it, and the host's /var/lib is never touched) and no network but an
unconfigured ``lo``. ``pct exec`` enters its namespaces with ``nsenter``, as ``lxc-attach`` enters a
container's; the rest of the filesystem is the host's, so ``docker`` in the container talks to the
host's engine. Stopping the container kills its init: ``pct exec`` then fails as lxc-attach does.

The ``pct`` executable is made per test by :func:`make_pct` (a wrapper with the state directory baked
in: vzdump empties the environment). Like the real pct it sets ``PATH=/sbin:/bin:/usr/sbin:/usr/bin``
and execs into the container, so stdin, stdout, stderr and the exit status are the command's own.
Every call is appended to ``STATE/calls.jsonl`` (argv and environment) for the tests to check.

Run as ``pct_standin.py --state DIR exec VMID -- CMD...``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["NsContainer", "make_pct", "read_calls"]

UNSHARE = "/usr/bin/unshare"
NSENTER = "/usr/bin/nsenter"
PCT_PATH = "/sbin:/bin:/usr/sbin:/usr/bin"  # what pct (PVE::CLIHandler) sets before exec'ing lxc-attach
NODE = "testnode"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not a running container
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class NsContainer:
    """A stand-in container: ``vmid``, its init ``pid``, its ``var_lib`` (host path of its /var/lib)."""

    def __init__(self, vmid: int, workdir: Path) -> None:
        self.vmid = vmid
        self.workdir = Path(workdir)
        self.var_lib = self.workdir / f"ct{vmid}-var-lib"
        self.var_lib.mkdir(parents=True, exist_ok=True)
        self._proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        """Start the init (the container boots); returns once its namespaces are set up."""
        if self.running:
            return
        script = 'mount --bind "$1" /var/lib || exit 1; echo ready; exec sleep 2147483647'
        self._proc = subprocess.Popen([UNSHARE, "--mount", "--net", "--propagation", "private", "--",
                                       "/bin/sh", "-c", script, "sh", str(self.var_lib)],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      start_new_session=True, env={"PATH": PCT_PATH})
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if line.strip() != b"ready":
            err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
            raise RuntimeError(f"container {self.vmid} did not start: {err.strip()}")
        self._write_state()

    def _write_state(self) -> None:
        (self.workdir / f"{self.vmid}.conf").write_text(f"hostname: ct{self.vmid}\n")
        (self.workdir / f"{self.vmid}.pid").write_text(f"{self.pid}\n")

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """Kill the init (the container is stopped); its /var/lib stays on the host."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=10)

    def run(self, argv: list[str], input: bytes | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
        """Run argv in the container directly (test set-up; no pct involved)."""
        return subprocess.run([NSENTER, "-t", str(self.pid), "-m", "-n", "--", *argv], input=input, capture_output=True,
                              timeout=timeout, env={"PATH": PCT_PATH})

    def close(self) -> None:
        self.stop()
        for name in (f"{self.vmid}.conf", f"{self.vmid}.pid"):
            (self.workdir / name).unlink(missing_ok=True)
        shutil.rmtree(self.var_lib, ignore_errors=True)


def make_pct(state: Path) -> str:
    """An executable `pct` for the containers made with workdir `state`; returns its absolute path."""
    state.mkdir(parents=True, exist_ok=True)
    exe = state / "pct"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} -I {Path(__file__).resolve()} --state {state} \"$@\"\n")
    exe.chmod(0o755)
    return str(exe)


def read_calls(state: Path) -> list[dict[str, object]]:
    """Every pct call so far: {"argv": [...], "env": {...}}."""
    path = state / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--state":
        print("usage: pct_standin.py --state DIR exec VMID -- CMD...", file=sys.stderr)
        return 255
    state, args = Path(argv[1]), argv[2:]
    with open(state / "calls.jsonl", "a") as log:
        log.write(json.dumps({"argv": args, "env": dict(os.environ), "time": time.time()}) + "\n")
    if not args or args[0] != "exec":
        print(f"ERROR: unknown command 'pct {' '.join(args[:1])}'", file=sys.stderr)
        return 255
    if len(args) < 2 or not args[1].isdigit():
        print("400 not enough arguments\npct exec <vmid> [<extra-args>]", file=sys.stderr)
        return 255
    vmid, extra = args[1], args[2:]
    if extra[:1] == ["--"]:
        extra = extra[1:]
    if not (state / f"{vmid}.conf").exists():
        print(f"Configuration file 'nodes/{NODE}/lxc/{vmid}.conf' does not exist", file=sys.stderr)
        return 255
    if not extra:
        print("missing command at /usr/share/perl5/PVE/CLI/pct.pm line 221.", file=sys.stderr)
        return 255
    try:
        pid = int((state / f"{vmid}.pid").read_text())
    except (OSError, ValueError):
        pid = 0
    if not pid or not _alive(pid):
        print(f"lxc-attach: {vmid}: ../src/lxc/attach.c: lxc_attach: 1136 Failed to get init pid", file=sys.stderr)
        return 1
    try:  # a container with an init of its own (systemd_guest.py) is entered whole, as lxc-attach does
        ns = (state / f"{vmid}.ns").read_text().split()
    except OSError:
        ns = ["-m", "-n"]
    os.environ.clear()
    os.environ["PATH"] = PCT_PATH
    os.execv(NSENTER, [NSENTER, "-t", str(pid), *ns, "--", *extra])
    return 255  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
