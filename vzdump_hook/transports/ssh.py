"""SSH transport (paramiko): one connection per guest and phase, one channel per command.

Host keys are checked against the configured known_hosts file only; an unknown or changed key is
refused with its fingerprint and the command to trust it. No agent, no ~/.ssh: vzdump runs the
hook with an empty environment, so everything comes from the config.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import CommandTimeout, ConnectError, ConnectionLost, HostKeyError, TransportError
from ..text import escape
from .base import MAX_OUTPUT, Transport, display, shell_join

if TYPE_CHECKING:
    import paramiko

    from ..config import GuestConfig
    from .tables import SshConfig


def _import_paramiko() -> Any:
    """paramiko, imported without `invoke`: paramiko imports it only for ssh_config's `Match exec`,
    which this transport never uses (no ssh_config is read), and it costs ~45 ms (asyncio,
    unittest.mock) in every vzdump phase that talks to a guest."""
    if "paramiko" not in sys.modules and "invoke" not in sys.modules:
        sys.modules["invoke"] = None  # type: ignore[assignment]  # makes `import invoke` fail fast
        try:
            import paramiko
        finally:
            del sys.modules["invoke"]
    import paramiko

    return paramiko


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style fingerprint: 'ssh-ed25519 SHA256:...'."""
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    return f"{key.get_name()} SHA256:{digest}"


def _known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


class KnownHostsLineError(ValueError):
    """A known_hosts line this transport cannot use (it names the file and the line)."""


def _check_known_hosts(paramiko: Any, path: str) -> None:
    """Raise KnownHostsLineError for the first line of `path` that is not `HOSTS KEYTYPE BASE64-KEY`
    with a complete key of a type paramiko knows: paramiko would ignore some (a silently missing key)
    and raise an unexpected exception for others (`@revoked`, `@cert-authority`)."""
    with open(path, "rb") as f:
        data = f.read()
    for n, raw in enumerate(data.splitlines(), 1):
        line = raw.decode("utf-8", "replace").strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        why = ""
        if fields[0].startswith("@"):
            why = f"{escape(fields[0][:20])} lines are not supported (remove it, or keep it in another file)"
        elif len(fields) < 3:
            why = "expected `HOSTS KEYTYPE KEY`"
        else:
            try:
                blob = base64.b64decode(fields[2], validate=True)
                if hasattr(paramiko.PKey, "from_type_string"):
                    key = paramiko.PKey.from_type_string(fields[1], blob)
                else:  # paramiko < 3.2 (Debian 12 has 2.12)
                    key = paramiko.hostkeys.HostKeyEntry.from_line(f"- {fields[1]} {fields[2]}").key
                if key is None or key.asbytes() != blob:
                    raise ValueError("unknown key type, or truncated")
            except Exception:  # (binascii.Error, paramiko's UnknownKeyType, SSHException, ...)
                why = f"not a complete {escape(fields[1][:40])} key"
        if why:
            raise KnownHostsLineError(f"known_hosts {path} line {n}: {why}")


def _connect_error(target: str, cfg: SshConfig, paramiko: Any, e: BaseException, timeout: float) -> ConnectError:
    """What a failed handshake (`e`) means, as the error to raise (HostKeyError for a changed key)."""
    if isinstance(e, paramiko.BadHostKeyException):
        where = _known_hosts_name(cfg.host, cfg.port)
        return HostKeyError(
            f"{target}: host key CHANGED: got {fingerprint(e.key)}, {cfg.known_hosts} has "
            f"{fingerprint(e.expected_key)}. If the guest was really reinstalled, remove the old line "
            f"(ssh-keygen -R {where!r} -f {cfg.known_hosts}) and trust the new key"
        )
    if isinstance(e, paramiko.AuthenticationException):
        return ConnectError(f"{target}: authentication failed with {cfg.identity_file}: {e}")
    if isinstance(e, FileNotFoundError):
        return ConnectError(f"{target}: identity file {cfg.identity_file} does not exist")
    if isinstance(e, TimeoutError):
        return ConnectError(f"{target}: connect timed out after {timeout:.1f} s")
    text = str(e) or type(e).__name__
    no_handshake = ("banner", "no existing session", "timed out", "timeout")
    if any(s in text.lower() for s in no_handshake) or isinstance(e, EOFError):
        # TCP was accepted but sshd never completed its banner/handshake (hung or frozen guest)
        text = f"no SSH banner/handshake within {timeout:.1f} s ({text})"
    return ConnectError(f"{target}: {text}")


class SshTransport(Transport):
    name = "ssh"

    def __init__(self, cfg: SshConfig) -> None:
        super().__init__(f"ssh {cfg.user}@{cfg.host}:{cfg.port}")
        self.cfg = cfg
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_guest(cls, guest: GuestConfig) -> SshTransport:
        assert guest.ssh is not None  # config validation guarantees it for transport "ssh"
        return cls(guest.ssh)

    # -- connection -----------------------------------------------------------------------------

    def _connect(self, timeout: float) -> paramiko.SSHClient:
        with self._lock:
            if self._client is not None and self._transport_alive(self._client):
                return self._client
            self._client = None
            self._client = self._new_client(min(timeout, self.cfg.connect_timeout))
            return self._client

    @staticmethod
    def _transport_alive(client: paramiko.SSHClient) -> bool:
        t = client.get_transport()
        return t is not None and t.is_active()

    def _new_client(self, timeout: float) -> paramiko.SSHClient:
        """A connected client: known_hosts read, unknown keys refused, the handshake within `timeout` s."""
        paramiko = _import_paramiko()

        client = paramiko.SSHClient()
        self._load_known_hosts(paramiko, client)
        client.set_missing_host_key_policy(_Refuse(self.cfg))
        try:
            self._handshake(client, timeout)
        except HostKeyError:
            client.close()
            raise
        except (OSError, paramiko.SSHException, EOFError) as e:
            client.close()
            raise _connect_error(self.target, self.cfg, paramiko, e, timeout) from None
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(15)
        return client

    def _load_known_hosts(self, paramiko: Any, client: paramiko.SSHClient) -> None:
        """The configured known_hosts into `client`; a missing file is none (every key is then unknown)."""
        cfg = self.cfg
        try:
            _check_known_hosts(paramiko, cfg.known_hosts)
            client.load_host_keys(cfg.known_hosts)
        except FileNotFoundError:
            pass  # every key is then unknown, and the refusal (_Refuse) says which file to fill
        except KnownHostsLineError as e:
            raise ConnectError(f"{self.target}: {e}") from None
        except (OSError, paramiko.SSHException) as e:
            raise ConnectError(f"{self.target}: cannot read known_hosts {cfg.known_hosts}: {e}") from None

    def _handshake(self, client: paramiko.SSHClient, timeout: float) -> None:
        """TCP, then SSH with the configured key only, each step within `timeout` s."""
        cfg = self.cfg
        # our own socket, for TCP_NODELAY: without it every small SSH message of a short command
        # can wait for a delayed ACK (tens of ms per command)
        sock = socket.create_connection((cfg.host, cfg.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.connect(
            cfg.host,
            sock=sock,
            port=cfg.port,
            username=cfg.user,
            key_filename=cfg.identity_file,
            look_for_keys=False,
            allow_agent=False,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
        )  # no channel_timeout (paramiko >= 3.2; Debian 12 has 2.12): every open_session below has its own

    def connect(self, timeout: float) -> None:
        self._connect(timeout)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # -- commands -------------------------------------------------------------------------------

    def _exec(self, argv: Sequence[str], stdin: bytes | None, timeout: float) -> tuple[int, bytes, bytes]:
        paramiko = _import_paramiko()

        deadline = time.monotonic() + timeout
        command = shell_join(argv)
        shown = display(argv)
        transport, chan = self._channel(timeout, deadline, shown)
        out = bytearray()
        err = bytearray()
        try:
            chan.exec_command(command)
            if stdin:
                self._send(chan, stdin, deadline, shown)
            chan.shutdown_write()
            # Done when the exit status is in AND the output has ended (EOF or close): OpenSSH may
            # send exit-status while output the command wrote is still in the pipe to sshd.
            # paramiko sets status_event on any close too (the connection lost, a command killed
            # by a signal): only exit_status != -1 says a status came.
            while True:
                self._drain(chan, out, err)
                got = chan.exit_status != -1
                ended = chan.eof_received or chan.closed
                if got and ended and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                if time.monotonic() >= deadline:
                    raise CommandTimeout(f"{self.target}: no answer within {timeout:.1f} s", command=shown,
                                         stderr=err.decode("utf-8", "replace"))
                if not transport.is_active() and not got:
                    self.close()
                    raise ConnectionLost(f"{self.target}: connection lost while running a command", command=shown)
                if chan.closed and not got:
                    raise TransportError(f"{self.target}: the command ended without an exit status "
                                         "(killed by a signal?)", command=shown,
                                         stderr=err.decode("utf-8", "replace"))
                if got or chan.status_event.is_set():
                    time.sleep(0.002)  # the rest of the output (or the close's cause) is on its way
                else:
                    chan.status_event.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            return chan.recv_exit_status(), bytes(out), bytes(err)
        except (paramiko.SSHException, OSError, EOFError) as e:
            self.close()
            raise ConnectError(f"{self.target}: {e}", command=shown) from None
        finally:
            chan.close()

    def _channel(self, timeout: float, deadline: float, shown: str) -> tuple[Any, Any]:
        """The connection's transport and a new session channel on it; ConnectError when either fails."""
        paramiko = _import_paramiko()
        client = self._connect(timeout)
        transport = client.get_transport()
        if transport is None:
            raise ConnectError(f"{self.target}: connection lost")
        try:
            return transport, transport.open_session(timeout=max(0.1, deadline - time.monotonic()))
        except (paramiko.SSHException, OSError, EOFError) as e:
            self.close()
            raise ConnectError(f"{self.target}: cannot open a channel: {e}", command=shown) from None

    def _send(self, chan: Any, data: bytes, deadline: float, shown: str) -> None:
        """Send stdin within the deadline (paramiko's sendall can spin forever on a stalled peer)."""
        view = memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CommandTimeout(f"{self.target}: guest stopped reading input", command=shown)
            chan.settimeout(min(left, 0.5))
            try:
                sent = chan.send(view[:32768])
            except TimeoutError:
                continue
            if sent == 0:
                raise ConnectError(f"{self.target}: channel closed while sending input", command=shown)
            view = view[sent:]
        chan.settimeout(None)

    @staticmethod
    def _drain(chan: Any, out: bytearray, err: bytearray) -> None:
        while chan.recv_ready():
            data = chan.recv(65536)
            if len(out) < MAX_OUTPUT:
                out += data
        while chan.recv_stderr_ready():
            data = chan.recv_stderr(65536)
            if len(err) < MAX_OUTPUT:
                err += data


class _Refuse:
    """Host key policy: unknown keys are refused with the fingerprint and how to trust it."""

    def __init__(self, cfg: SshConfig) -> None:
        self.cfg = cfg

    def missing_host_key(self, client: Any, hostname: str, key: paramiko.PKey) -> None:
        cfg = self.cfg
        raise HostKeyError(
            f"ssh {cfg.user}@{cfg.host}:{cfg.port}: host key not in {cfg.known_hosts}: {fingerprint(key)}. "
            "To trust it: `vzdump-hook trust VMID` shows it next to the command "
            "that prints the same fingerprint in the guest, "
            "and adds it once you confirm"
        )
