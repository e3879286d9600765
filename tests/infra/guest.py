"""A stand-in for a guest VM in integration tests: OpenSSH's sshd in a network namespace of its own.

Each :class:`TestGuest` gets a network namespace ``vzdh-<pid>-<n>`` joined to the root namespace by a
veth pair with addresses from 10.231.0.0/16 (one /30 each: host side ``.1``, guest side ``.2``), a fresh
ed25519 host key and client key, a known_hosts file, and a real ``sshd`` listening on the guest address.
The filesystem is shared with the host, so the guest runs ``docker`` against the host's engine.

Failure modes the tests can switch on: :meth:`TestGuest.cut_off` (connects time out),
:meth:`TestGuest.freeze` (TCP accepted, no SSH banner), :meth:`TestGuest.stop_sshd` (connection refused).
"""

from __future__ import annotations

import atexit
import fcntl
import ipaddress
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

__all__ = [
    "GUEST_PATH",
    "GuestError",
    "TestGuest",
    "cleanup_stale",
    "guest_support_problem",
]

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
NETNS_PREFIX = "vzdh-"
SUBNET = ipaddress.IPv4Network("10.231.0.0/16")
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NFT_TABLE = "vzdh_guest"
_LOCK_FILE = "/run/vzdh-guest.lock"
_NETNS_RE = re.compile(r"^vzdh-(\d+)-(\d+)$")
_counter = itertools.count()
_live: set[TestGuest] = set()
_live_lock = threading.Lock()


class GuestError(RuntimeError):
    """The fake guest could not be set up or changed."""


def _run(argv: list[str], *, input: str | None = None, timeout: float = 20.0,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a host command, capture text output; raise GuestError on failure when check."""
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise GuestError(f"timed out after {timeout} s: {' '.join(argv)}") from exc
    if check and proc.returncode != 0:
        raise GuestError(f"{' '.join(argv)} -> exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return proc


def guest_support_problem() -> str | None:
    """Say why this machine cannot host a TestGuest (not root, no ``ip netns``, no sshd), or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, sshd)"
    for tool in ("ip", "nft", SSH_KEYGEN):
        if shutil.which(tool) is None:
            return f"'{tool}' not found (run scripts/setup-test-host.sh)"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} not found (run scripts/setup-test-host.sh)"
    try:
        proc = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"'ip netns list' failed: {exc}"
    if proc.returncode != 0:
        return f"'ip netns' does not work here: {proc.stderr.strip()}"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_pids(netns: str) -> list[int]:
    proc = _run(["ip", "netns", "pids", netns], check=False)
    return [int(x) for x in proc.stdout.split() if x.isdigit()]


def _kill_netns(netns: str) -> None:
    """Kill every process in the namespace, then delete it (its veth pair goes with it)."""
    for _ in range(50):
        pids = _netns_pids(netns)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    _run(["ip", "netns", "del", netns], check=False)


def cleanup_stale() -> list[str]:
    """Delete namespaces ``vzdh-<pid>-<n>`` (with their processes and temp dirs) left by processes
    that are gone; return their names."""
    proc = _run(["ip", "netns", "list"], check=False)
    removed = []
    for line in proc.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NETNS_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _kill_netns(name)
            removed.append(name)
    for path in Path(tempfile.gettempdir()).glob(f"{NETNS_PREFIX}*-*.*"):
        m = _NETNS_RE.match(path.name.split(".", 1)[0])
        if m and path.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
    return removed


def _allocate_subnet() -> tuple[int, ipaddress.IPv4Network]:
    """Return the first /30 of SUBNET not configured on any root-namespace interface (call locked)."""
    proc = _run(["ip", "-o", "-4", "addr", "show"])
    used = set()
    for m in re.finditer(r"inet (10\.231\.\d+\.\d+)/", proc.stdout):
        used.add(ipaddress.IPv4Network(m.group(1) + "/30", strict=False))
    for index, net in enumerate(SUBNET.subnets(new_prefix=30)):
        if net not in used:
            return index, net
    raise GuestError(f"no free /30 left in {SUBNET}")


class TestGuest:
    """A guest reachable over SSH at ``host:port`` as ``user`` with ``identity_file``.

    Started on construction; ``close()`` (or leaving a ``with`` block, or interpreter exit) removes
    the sshd, the namespace, the veth pair and the temp dir.
    """

    __test__ = False  # not a pytest test class

    host: str
    port: int
    user: str
    host_side_ip: str
    netns: str
    workdir: Path
    identity_file: str
    known_hosts_file: str
    host_public_key: str
    host_key_fingerprint: str
    sshd_config_file: str
    sshd_log_file: str

    def __init__(self, *, ready_timeout: float = 10.0) -> None:
        """Create namespace, keys and config, start sshd; raise GuestError if it does not answer."""
        self.port = 22
        self.user = "root"
        self.ready_timeout = ready_timeout
        self.netns = f"{NETNS_PREFIX}{os.getpid()}-{next(_counter)}"
        self._sshd: subprocess.Popen[bytes] | None = None
        self._stopped_pids: list[int] = []
        self._closed = False
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.netns}.", dir=tempfile.gettempdir()))
        with _live_lock:
            _live.add(self)
        try:
            self._make_netns()
            self._make_keys()
            self._write_sshd_config()
            self.start_sshd()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup

    def _make_netns(self) -> None:
        Path(_LOCK_FILE).parent.mkdir(parents=True, exist_ok=True)
        with open(_LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            index, net = _allocate_subnet()
            hosts = list(net.hosts())
            self.host_side_ip, self.host = str(hosts[0]), str(hosts[1])
            self.veth_host = f"vzdh{index}h"
            _run(["ip", "netns", "add", self.netns])
            _run(["ip", "link", "add", self.veth_host, "type", "veth",
                  "peer", "name", "eth0", "netns", self.netns])
            _run(["ip", "addr", "add", f"{self.host_side_ip}/30", "dev", self.veth_host])
            _run(["ip", "link", "set", self.veth_host, "up"])
        _run(["ip", "-n", self.netns, "-batch", "-"], input=(
            "link set lo up\n"
            f"addr add {self.host}/30 dev eth0\n"
            "link set eth0 up\n"))

    def _make_keys(self) -> None:
        d = self.workdir
        self._host_key = str(d / "ssh_host_ed25519_key")
        self.identity_file = str(d / "id_ed25519")
        for path, comment in ((self._host_key, "vzdh-guest-host"), (self.identity_file, "vzdh-client")):
            _run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path])
        self.host_public_key = " ".join(Path(self._host_key + ".pub").read_text().split()[:2])
        out = _run([SSH_KEYGEN, "-l", "-E", "sha256", "-f", self._host_key + ".pub"]).stdout
        self.host_key_fingerprint = out.split()[1]
        (d / "authorized_keys").write_text(Path(self.identity_file + ".pub").read_text())
        self.known_hosts_file = str(d / "known_hosts")
        host = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        Path(self.known_hosts_file).write_text(f"{host} {self.host_public_key}\n")

    def _write_sshd_config(self) -> None:
        d = self.workdir
        self.sshd_config_file = str(d / "sshd_config")
        self.sshd_log_file = str(d / "sshd.log")
        Path(self.sshd_config_file).write_text(
            f"Port {self.port}\n"
            f"ListenAddress {self.host}\n"
            f"HostKey {self._host_key}\n"
            f"PidFile {d / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\n"
            "AuthenticationMethods publickey\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "UseDNS no\n"
            "PrintMotd no\n"
            "PrintLastLog no\n"
            "X11Forwarding no\n"
            "MaxSessions 50\n"
            "MaxStartups 50\n"
            "LoginGraceTime 30\n"
            f"SetEnv PATH={GUEST_PATH}\n"
            "Subsystem sftp internal-sftp\n"
        )

    # ------------------------------------------------------------------ sshd

    def start_sshd(self) -> None:
        """Start sshd (the guest is "up" again) and wait until it sends its banner."""
        if self._sshd is not None and self._sshd.poll() is None:
            return
        # sshd's compiled-in privilege separation directory.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        # The guest is another machine: its root has its own (here: empty) ~/.bashrc, not this
        # host's, whose `pyenv init` would add ~150 ms to every command run over SSH (bash sources
        # ~/.bashrc for ssh commands). A private mount namespace for sshd gives it that view.
        rc = self.workdir / "guest-root-bashrc"
        rc.write_text("# the test guest's own root ~/.bashrc\n")
        own_rc = '[ -e /root/.bashrc ] && mount --bind "$1" /root/.bashrc; shift; exec "$@"'
        with open(self.sshd_log_file, "ab") as log:
            self._sshd = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private",
                 "sh", "-c", own_rc, "sh", str(rc), SSHD, "-D", "-e", "-f", self.sshd_config_file],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self._sshd.poll() is not None:
                raise GuestError(f"sshd in {self.netns} exited with {self._sshd.returncode}: "
                                 f"{self.sshd_log_tail()}")
            if self._banner_ok(0.5):
                return
            if time.monotonic() > deadline:
                raise GuestError(f"sshd in {self.netns} not answering after {self.ready_timeout} s: "
                                 f"{self.sshd_log_tail()}")
            time.sleep(0.01)

    def _banner_ok(self, timeout: float) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout) as s:
                return s.recv(64).startswith(b"SSH-")
        except OSError:
            return False

    def stop_sshd(self, kill_sessions: bool = True) -> None:
        """Stop sshd (the guest "reboots": connects are refused); with kill_sessions also end every
        process in the namespace (open SSH sessions and the commands they run)."""
        self.thaw()
        proc, self._sshd = self._sshd, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if kill_sessions:
            for pid in _netns_pids(self.netns):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    @property
    def sshd_pid(self) -> int | None:
        """PID of the listening sshd, None while stopped."""
        return self._sshd.pid if self._sshd is not None and self._sshd.poll() is None else None

    def sshd_log_tail(self, lines: int = 20) -> str:
        """The last lines sshd wrote (for error messages)."""
        try:
            return "\n".join(Path(self.sshd_log_file).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # ------------------------------------------------------------------ commands

    def run(self, cmd: list[str] | str, timeout: float = 60.0, check: bool = False,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run cmd (argv, or a string for ``sh -c``) in the guest's namespace; no SSH involved."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        env = dict(os.environ, PATH=GUEST_PATH + ":" + os.environ.get("PATH", ""))
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], input=input,
                              capture_output=True, text=True, timeout=timeout, check=check, env=env,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def ssh_argv(self, *command: str, connect_timeout: float = 5.0) -> list[str]:
        """argv for the OpenSSH client to run command in the guest (strict host key checking)."""
        return ["ssh", "-F", "none", "-i", self.identity_file, "-p", str(self.port),
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts_file}", "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", "StrictHostKeyChecking=yes", "-o", f"ConnectTimeout={connect_timeout:g}",
                "-o", "LogLevel=ERROR", f"{self.user}@{self.host}", *command]

    # ------------------------------------------------------------------ failure modes

    def cut_off(self, new_only: bool = False) -> None:
        """Drop incoming TCP to the SSH port in the guest: connects time out (no RST, not refused).
        With new_only, established connections keep working."""
        match = "ct state new " if new_only else ""
        self._nft(
            f"table inet {NFT_TABLE} {{}}\n"
            f"delete table inet {NFT_TABLE}\n"
            f"table inet {NFT_TABLE} {{\n"
            "  chain input {\n"
            "    type filter hook input priority 0; policy accept;\n"
            f"    {match}tcp dport {self.port} drop\n"
            "  }\n"
            "}\n")

    def restore(self) -> None:
        """Undo cut_off (idempotent)."""
        self._nft(f"table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\n")

    def _nft(self, script: str) -> None:
        _run(["ip", "netns", "exec", self.netns, "nft", "-f", "-"], input=script)

    def freeze(self, sessions: bool = False) -> None:
        """SIGSTOP the listening sshd: TCP connects succeed (kernel backlog) but no banner ever comes.
        With sessions, stop every process in the guest too (open sessions hang as well)."""
        pid = self.sshd_pid
        if pid is None:
            raise GuestError("freeze: sshd is not running")
        pids = [pid] + ([p for p in _netns_pids(self.netns) if p != pid] if sessions else [])
        for p in pids:
            try:
                os.kill(p, signal.SIGSTOP)
                self._stopped_pids.append(p)
            except ProcessLookupError:
                pass

    def thaw(self) -> None:
        """Undo freeze (idempotent)."""
        pids, self._stopped_pids = self._stopped_pids, []
        for p in pids:
            try:
                os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Kill sshd and everything in the namespace, delete namespace, veth pair and temp dir."""
        if self._closed:
            return
        self._closed = True
        try:
            self.stop_sshd(kill_sessions=True)
        except Exception:  # noqa: BLE001 - teardown goes on regardless
            pass
        _kill_netns(self.netns)
        if getattr(self, "veth_host", None):
            _run(["ip", "link", "del", self.veth_host], check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)
        with _live_lock:
            _live.discard(self)

    def __enter__(self) -> TestGuest:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TestGuest({self.user}@{self.host}:{self.port}, netns={self.netns})"


@atexit.register
def _close_all() -> None:
    with _live_lock:
        guests = list(_live)
    for g in guests:
        g.close()
