"""A real QEMU virtual machine for the tests: the image of :mod:`tests.infra.vm_image` booted with
``qemu-system-x86_64`` as Proxmox VE starts its VMs, as far as the hook can see.

- QMP on ``<qmp_dir>/<vmid>.qmp`` (``-chardev socket ... -mon mode=control``, as qemu-server does) and
  the guest agent on the virtio-serial port ``org.qemu.guest_agent.0`` whose host end is
  ``<qmp_dir>/<vmid>.qga``. PVE keeps both in /var/run/qemu-server/; tests give the hook a ``qmp_dir``.
- The disk is a qcow2 overlay over the cached raw image (the image stays untouched), on a virtio disk
  ``drive0``. ``savevm``/``loadvm`` (internal snapshots of the overlay, RAM included) revert the VM.
- The network is a tap device in a network namespace ``vzdhvm-<pid>`` that the tests own; a veth pair
  joins it to the root namespace, which routes the VM's /24 through it. The VM's address comes from the
  kernel command line (``ip=``), so ssh reaches it at :attr:`TestVm.address`.
- Accelerator: KVM when ``VZDUMP_HOOK_VM_ACCEL=kvm``; TCG otherwise (``/dev/kvm`` on the test machines is
  PVM, where Debian's kernel runs in KVM's instruction emulator, far slower than TCG; see
  docs/development.md, Tested against).

:class:`Qga` speaks the agent's protocol on the socket (``guest-sync-delimited`` first, as PVE does).
"""

from __future__ import annotations

import base64
import ctypes
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.infra.vm_image import HOSTNAME, VmImage

__all__ = ["Qga", "TestVm", "VmError", "cleanup_stale", "qmp"]

QEMU = "/usr/bin/qemu-system-x86_64"
MEMORY_MB = 1536
_LOCK_DIR = Path("/run/vzdh-vm")


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies (no QEMU left behind a killed run)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def cleanup_stale() -> list[str]:
    """Delete namespaces ``vzdhvm-<pid>`` of test processes that are gone (their veth pairs and routes
    go with them). Out: the names deleted."""
    removed = []
    for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith("vzdhvm-") and name[7:].isdigit() and not Path(f"/proc/{name[7:]}").exists():
            _run(["ip", "netns", "del", name], check=False)
            removed.append(name)
    return removed


class VmError(RuntimeError):
    """The VM could not be started, reached or changed."""


def _run(argv: list[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise VmError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()[-800:]}")
    return proc


def _recv_json(sock: socket.socket, buf: bytearray) -> dict[str, Any]:
    """Read one newline-terminated JSON object (bytes 0xff of a sync reply skipped)."""
    while b"\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise VmError("socket closed by the peer")
        buf += chunk.replace(b"\xff", b"")
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    if not line.strip():
        return _recv_json(sock, buf)
    return json.loads(line)  # type: ignore[no-any-return]


def qmp(path: str | Path, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30) -> Any:
    """One QMP command on a fresh connection (greeting, qmp_capabilities, command, close).

    Out: the ``return`` value. Raises VmError with QEMU's ``error`` (class and desc) when it refuses.
    Events received meanwhile are dropped.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        buf = bytearray()
        _recv_json(sock, buf)  # greeting
        for cmd, args in (("qmp_capabilities", None), (command, arguments)):
            msg: dict[str, Any] = {"execute": cmd, "id": cmd}
            if args is not None:
                msg["arguments"] = args
            sock.sendall(json.dumps(msg).encode() + b"\n")
            while True:
                reply = _recv_json(sock, buf)
                if "event" in reply:
                    continue
                if "error" in reply:
                    raise VmError(f"QMP {cmd}: {reply['error'].get('class')}: {reply['error'].get('desc')}")
                break
        return reply.get("return")


class Qga:
    """The guest agent on its socket: ``call(command, arguments)`` on a fresh, synced connection."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._sync = int(time.time()) % 1_000_000

    def call(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30) -> Any:
        """Out: the ``return`` value (None for commands without one, e.g. guest-fsfreeze-thaw on some
        versions). Raises VmError with the agent's error, or when it does not answer within ``timeout``."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect(self.path)
                reply = self.exchange(sock, bytearray(), command, arguments)
            except (OSError, ValueError) as exc:
                raise VmError(f"QGA {command}: {exc}") from exc
        return self.answer(command, reply)

    def exchange(self, sock: socket.socket, buf: bytearray, command: str, arguments: dict[str, Any] | None) -> Any:
        """One command on a connected socket, after its own ``guest-sync-delimited``; the agent's reply."""
        self._sync += 1
        sock.sendall(b"\xff" + json.dumps({"execute": "guest-sync-delimited",
                                           "arguments": {"id": self._sync}}).encode() + b"\n")
        while _recv_json(sock, buf).get("return") != self._sync:
            pass
        msg: dict[str, Any] = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        sock.sendall(json.dumps(msg).encode() + b"\n")
        return _recv_json(sock, buf)

    @staticmethod
    def answer(command: str, reply: dict[str, Any]) -> Any:
        """The reply's ``return``; VmError with the agent's error."""
        if "error" in reply:
            raise VmError(f"QGA {command}: {reply['error'].get('class')}: {reply['error'].get('desc')}")
        return reply.get("return")

    def run(self, argv: list[str], input_data: bytes | None = None, timeout: float = 60) -> tuple[int, bytes, bytes]:
        """guest-exec + guest-exec-status polling. Out: (exitcode, stdout, stderr). Raises VmError."""
        args: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if input_data is not None:
            args["input-data"] = base64.b64encode(input_data).decode()
        pid = self.call("guest-exec", args)["pid"]
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            st = self.call("guest-exec-status", {"pid": pid})
            if st.get("exited"):
                return (st.get("exitcode", -1), base64.b64decode(st.get("out-data", "")),
                        base64.b64decode(st.get("err-data", "")))
            time.sleep(0.05)
        raise VmError(f"guest-exec {argv}: not exited within {timeout} s")


class TestVm:
    """A booted VM; :meth:`start` returns when sshd, the agent and the Docker engine with the images
    answer. :meth:`close` (also at interpreter exit via the fixture) kills QEMU and removes the
    namespace and the work directory."""

    __test__ = False

    def __init__(self, image: VmImage, vmid: int, qmp_dir: Path, *, accel: str | None = None,
                 overlay: bool = True, disk: Path | None = None) -> None:
        """``disk``: boot this raw disk (e.g. a backup's copy) instead of the image's, under an overlay.
        ``overlay=False`` writes to the image's disk itself (only the image build does that)."""
        self.image, self.vmid, self.qmp_dir = image, vmid, Path(qmp_dir)
        self.disk = disk or image.disk
        self.use_overlay = overlay
        self.accel = accel or os.environ.get("VZDUMP_HOOK_VM_ACCEL", "tcg")
        self.workdir = Path(tempfile.mkdtemp(prefix=f"vzdhvm-{os.getpid()}."))
        self.overlay = self.workdir / "disk.qcow2"
        self.console_log = self.workdir / "console.log"
        self.netns = f"vzdhvm-{os.getpid()}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.boot_seconds = 0.0
        self._lock_file: Any = None
        self.index = self._allocate()
        self.address = f"10.233.{self.index}.2"
        self.known_hosts = self.workdir / "known_hosts"
        self.known_hosts.write_text(image.known_hosts.read_text().replace(HOSTNAME, self.address, 1))

    # -- set-up ------------------------------------------------------------------------------------

    def _allocate(self) -> int:
        """A free index 0..250 for the addresses, held by a lock file until close()."""
        _LOCK_DIR.mkdir(parents=True, exist_ok=True)
        for i in range(251):
            f = open(_LOCK_DIR / f"{i}.lock", "w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            self._lock_file = f
            return i
        raise VmError("no free VM network index in /run/vzdh-vm")

    # what tests/integration/hookenv.HookSetup reads of a guest
    port = 22
    user = "root"

    @property
    def host(self) -> str:
        return self.address

    @property
    def identity_file(self) -> str:
        return str(self.image.identity)

    @property
    def known_hosts_file(self) -> str:
        return str(self.known_hosts)

    @property
    def qmp_path(self) -> Path:
        return self.qmp_dir / f"{self.vmid}.qmp"

    @property
    def qga_path(self) -> Path:
        return self.qmp_dir / f"{self.vmid}.qga"

    @property
    def qga(self) -> Qga:
        return Qga(self.qga_path)

    def _network(self) -> None:
        i, ns = self.index, self.netns
        host_if, ns_if = f"vzvm{i}h", f"vzvm{i}g"
        _run(["ip", "link", "del", host_if], check=False)
        _run(["ip", "netns", "del", ns], check=False)
        _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns])
        _run(["ip", "addr", "add", f"10.234.{i}.1/30", "dev", host_if])
        _run(["ip", "link", "set", host_if, "up"])
        _run(["ip", "route", "replace", f"10.233.{i}.0/24", "via", f"10.234.{i}.2"])
        for argv in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"10.234.{i}.2/30", "dev", ns_if],
                     ["ip", "link", "set", ns_if, "up"], ["ip", "tuntap", "add", "tap0", "mode", "tap"],
                     ["ip", "addr", "add", f"10.233.{i}.1/24", "dev", "tap0"], ["ip", "link", "set", "tap0", "up"],
                     ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]):
            _run(["ip", "netns", "exec", ns, *argv])

    def argv(self) -> list[str]:
        """QEMU's command line (PVE-like devices; see the module docstring)."""
        i = self.index
        accel = (["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm"
                 else ["-accel", "tcg,thread=multi", "-cpu", "max"])
        # apparmor=0: Debian's kernel enables AppArmor, the image has no apparmor_parser, and docker
        # refuses to start containers then (PVE guests differ; the hook does not depend on it)
        # mitigations=off tsc=reliable no_timer_check, and a virtio RNG: less work under emulation, no wait
        # for the random pool (bench/vmboot.py: 25.5 s to ssh against 29.1 s without, git a92f139, the run before
        # they were adopted)
        cmdline = (f"root=/dev/vda rw console=ttyS0 net.ifnames=0 quiet systemd.show_status=0 apparmor=0 "
                   f"mitigations=off tsc=reliable no_timer_check "
                   f"ip={self.address}::10.233.{i}.1:255.255.255.0:{HOSTNAME}:eth0:off")
        return [
            QEMU, "-name", f"vzdh-vm-{self.vmid}", "-nodefaults", "-no-user-config", "-display", "none",
            *accel, "-smp", "2", "-m", str(MEMORY_MB), "-machine", "q35",
            "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd), "-append", cmdline,
            "-chardev", f"socket,id=qmp,path={self.qmp_path},server=on,wait=off", "-mon", "chardev=qmp,mode=control",
            "-chardev", f"socket,id=qga0,path={self.qga_path},server=on,wait=off",
            "-device", "virtio-serial,id=qga0-bus",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-drive", (f"file={self.overlay},format=qcow2" if self.use_overlay else f"file={self.disk},format=raw")
            + ",if=none,id=drive-virtio0,cache=unsafe,node-name=drive0",
            "-device", "virtio-blk-pci,drive=drive-virtio0,id=virtio0",
            "-netdev", "tap,id=net0,ifname=tap0,script=no,downscript=no", "-device", "virtio-net-pci,netdev=net0",
            "-device", "virtio-rng-pci",
            "-serial", f"file:{self.console_log}",
        ]

    def start(self, timeout: float = 240) -> TestVm:
        """Boot and wait until ssh, the agent and docker's images answer. Raises VmError (with the
        console's tail) on failure or timeout. Sets boot_seconds (QEMU start to sshd answering)."""
        self.qmp_dir.mkdir(parents=True, exist_ok=True)
        if self.use_overlay:
            _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(self.disk), str(self.overlay)])
        self._network()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *self.argv()], stdin=subprocess.DEVNULL,
                                     stdout=open(self.workdir / "qemu.log", "wb"), stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent)
        until = t0 + timeout
        while not self._ssh_ok():
            if self.proc.poll() is not None:
                raise VmError(f"QEMU exited with {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > until:
                raise VmError(f"no ssh on {self.address} within {timeout} s; console:\n{self.tail()}")
            time.sleep(0.5)
        self.boot_seconds = time.monotonic() - t0
        self.wait_ready(until)
        return self

    def wait_ready(self, until: float) -> None:
        """Wait for the agent and for the Docker engine with the test images. Raises VmError."""
        while True:
            try:
                self.qga.call("guest-ping", timeout=5)
                r = self.ssh("systemctl is-active vzdh-images.service >/dev/null || ! test -e /var/lib/vzdh/images.tar;"
                             " docker image inspect vzdh/postgres:15 vzdh/busybox:test >/dev/null", timeout=30)
                if r.returncode == 0:
                    return
            except (VmError, subprocess.TimeoutExpired):
                pass
            if time.monotonic() > until:
                raise VmError(f"agent or docker images not ready; console:\n{self.tail()}")
            time.sleep(0.5)

    def _ssh_ok(self) -> bool:
        try:
            return self.ssh("true", timeout=10, connect_timeout=2).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    # -- use -------------------------------------------------------------------------------------

    def ssh_argv(self, *command: str, connect_timeout: float = 5) -> list[str]:
        return ["ssh", "-i", str(self.image.identity), "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect_timeout:g}",
                "-o", "LogLevel=ERROR", f"root@{self.address}", "--", *command]

    def ssh(self, command: str, input: str | None = None, timeout: float = 120,
            connect_timeout: float = 5) -> subprocess.CompletedProcess[str]:
        """Run a shell command in the VM as root. Out: the completed process (not checked)."""
        return subprocess.run(self.ssh_argv(command, connect_timeout=connect_timeout), input=input,
                              capture_output=True, text=True, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def ok(self, command: str, **kw: Any) -> str:
        """ssh() that raises VmError unless the command exits 0. Out: its stdout."""
        r = self.ssh(command, **kw)
        if r.returncode != 0:
            raise VmError(f"in the VM: {command!r}: exit {r.returncode}: {r.stderr.strip()[-800:]}")
        return r.stdout

    def qmp(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 60) -> Any:
        return qmp(self.qmp_path, command, arguments, timeout)

    def hmp(self, command: str, timeout: float = 120) -> str:
        """A human-monitor command (savevm/loadvm); raises VmError when it prints an error."""
        out = str(self.qmp("human-monitor-command", {"command-line": command}, timeout) or "")
        if "Error" in out or "error" in out:
            raise VmError(f"HMP {command}: {out.strip()}")
        return out

    def poweroff(self, timeout: float = 120) -> None:
        """Shut the guest down cleanly (systemd) and wait for QEMU to exit. Raises VmError on timeout."""
        self.ssh("systemctl --no-block poweroff", timeout=30)
        assert self.proc is not None
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise VmError(f"VM did not power off within {timeout} s: {self.tail()}") from exc

    def tail(self, lines: int = 30) -> str:
        text = ""
        for f in (self.console_log, self.workdir / "qemu.log"):
            if f.exists():
                text += "\n".join(f.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        _run(["ip", "netns", "del", self.netns], check=False)
        _run(["ip", "link", "del", f"vzvm{self.index}h"], check=False)
        _run(["ip", "route", "del", f"10.233.{self.index}.0/24"], check=False)
        for p in (self.qmp_path, self.qga_path):
            p.unlink(missing_ok=True)
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
