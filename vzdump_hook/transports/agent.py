"""agent transport (QEMU): commands through the QEMU guest agent, over the Proxmox VE API.

`agent/exec` starts the command and answers a pid at once; `agent/exec-status` says `exited: 0` until
it has ended, then once gives exit code and output (PVE decodes the agent's base64: the bytes come as
one JSON character each). The agent keeps at most 16 MiB per stream and flags the rest as truncated.
stdin goes as `input-data` (text, at most 64 KiB, and the HTTPS request at most 64 KiB in all);
files that do not fit go through `agent/file-write` in parts, then one command assembles them.

The API is reached without a client library (the two calls need none, and Debian 12's python3-proxmoxer
is 1.2.0): `api = "local"` runs the node's own `pvesh` by absolute path, as root, with no credentials;
`api = "https"` sends requests (imported only then) with an API token whose secret is in a file only
root can read; TLS is always verified. That part is agent_api.py.
"""

from __future__ import annotations

import base64
import secrets
import time
import urllib.parse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import CommandTimeout, ConnectError, TransportError
from .agent_api import AgentApi
from .base import _WRITE_SCRIPT, Transport, display, sh

if TYPE_CHECKING:
    from ..config import GuestConfig
    from .tables import AgentConfig

INPUT_LIMIT = 64 * 1024  # PVE: input-data maxLength
BODY_LIMIT = 60 * 1024  # pveproxy refuses request bodies over 64 KiB; keep a margin for the form encoding
PART = 30 * 1024  # raw bytes per file-write (base64: 40 KiB, under file-write's 60 KiB content limit)
# qemu-ga could not spawn the program (g_spawn: not there, not executable); reported as a shell would: 127
SPAWN_FAILED = "Failed to execute child process"
NOT_FOUND = 127

# Joins the parts written by file-write into $1 atomically, then removes them (see base._WRITE_SCRIPT).
_ASSEMBLE_SCRIPT = r"""
set -eu
umask 077
dst=$1; shift
dir=$(dirname -- "$dst")
tmp="$dst.tmp.$$"
trap 'rm -f -- "$tmp" "$@"' EXIT
cat -- "$@" > "$tmp"
sync -- "$tmp" 2>/dev/null || sync
mv -f -- "$tmp" "$dst"
sync -- "$dir" 2>/dev/null || sync
"""


def output_bytes(value: Any) -> bytes:
    """out-data/err-data as the bytes the guest wrote. PVE puts the decoded bytes into a JSON string one
    character per byte; a server that decoded them as UTF-8 first gives characters above U+00FF."""
    if not isinstance(value, str):
        return b""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace")


class AgentTransport(Transport):
    name = "agent"

    def __init__(self, vmid: int, cfg: AgentConfig) -> None:
        via = "pvesh" if cfg.api == "local" else f"https://{cfg.host}:{cfg.port}"
        super().__init__(f"agent {vmid} via {via}")
        self.vmid = vmid
        self.cfg = cfg
        if cfg.node:
            self.node = cfg.node
        else:
            from ..node.job import node_name

            self.node = node_name()
        self.pve_api = AgentApi(self.target, vmid, self.node, cfg)

    @classmethod
    def for_guest(cls, guest: GuestConfig) -> AgentTransport:
        from .tables import AgentConfig

        return cls(guest.vmid, guest.agent or AgentConfig())

    def _call(self, verb: str, what: str, deadline: float, shown: str, **args: Any) -> Any:
        """One API request on agent/`what`, bounded by `deadline` (agent_api.py)."""
        return self.pve_api.call(verb, what, deadline, shown, **args)

    # -- commands --------------------------------------------------------------------------------

    def connect(self, timeout: float) -> None:
        """The VM runs and its agent answers a ping; ConnectError says which of them is not so."""
        deadline = time.monotonic() + timeout
        try:
            self._call("post", "ping", deadline, "agent/ping")
        except CommandTimeout as e:
            raise ConnectError(f"{e} (is qemu-guest-agent running in the guest?)", command="agent/ping") from None

    def _input_problem(self, argv: Sequence[str], stdin: bytes) -> str | None:
        """Why `stdin` cannot go as input-data with argv (not text, too large), or None."""
        try:
            text = stdin.decode("utf-8")
        except UnicodeDecodeError:
            text = "\0"
        if "\0" in text:
            return "the guest agent takes stdin as text only (input-data): binary input refused"
        body = len(urllib.parse.urlencode({"command": list(argv), "input-data": text}, doseq=True))
        if len(text) > INPUT_LIMIT or body > BODY_LIMIT:
            return (f"input of {len(stdin)} bytes is too large for the guest agent's input-data "
                    f"(at most {INPUT_LIMIT} characters, request at most {BODY_LIMIT} bytes)")
        return None

    def _exec(self, argv: Sequence[str], stdin: bytes | None, timeout: float) -> tuple[int, bytes, bytes]:
        deadline = time.monotonic() + timeout
        shown = display(argv)
        args: dict[str, Any] = {"command": list(argv)}
        if stdin is not None:
            problem = self._input_problem(argv, stdin)
            if problem:
                raise TransportError(f"{self.target}: {problem}", command=shown)
            args["input-data"] = stdin.decode("utf-8")
        pid = self._spawn(args, deadline, shown)
        if isinstance(pid, TransportError):
            return NOT_FOUND, b"", str(pid).encode()
        delay = 0.05
        while True:
            try:
                st = self._call("get", "exec-status", deadline, shown, pid=pid)
            except CommandTimeout:  # the time ran out during a poll: the command's timeout, not the API's
                raise CommandTimeout(f"{self.target}: no answer within {timeout:.1f} s "
                                     f"(pid {pid} may still run in the guest: the agent cannot stop it)",
                                     command=shown) from None
            if not isinstance(st, dict) or "exited" not in st:
                raise TransportError(f"{self.target}: agent/exec-status answered no state: {str(st)[:200]}",
                                     command=shown)
            if st["exited"] not in (0, False):
                break
            if time.monotonic() + delay >= deadline:
                raise CommandTimeout(f"{self.target}: no answer within {timeout:.1f} s "
                                     f"(pid {pid} may still run in the guest: the agent cannot stop it)",
                                     command=shown)
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        out, err = output_bytes(st.get("out-data")), output_bytes(st.get("err-data"))
        if isinstance(st.get("exitcode"), int):
            status = int(st["exitcode"])
        elif isinstance(st.get("signal"), int):
            status = 128 + int(st["signal"])
        else:
            raise TransportError(f"{self.target}: agent/exec-status gave neither exitcode nor signal: {str(st)[:200]}",
                                 command=shown)
        if st.get("err-truncated"):
            err += b"\n[stderr truncated by the guest agent]\n"
        if st.get("out-truncated"):
            raise TransportError(f"{self.target}: output truncated by the guest agent "
                                 "(over its capture limit): not used",
                                 command=shown, exit_status=status, stderr=err.decode("utf-8", "replace"))
        return status, out, err

    def _spawn(self, args: dict[str, Any], deadline: float, shown: str) -> int | TransportError:
        """agent/exec: the pid of the command started, or the agent's error when it could not start the
        program (not there, not executable). A shell says exit 127 for that, and so does this transport,
        so that callers ask "is it there?" the same way over every transport (guest/installed.py: the
        wrapper before `guest install`)."""
        try:
            started = self._call("post", "exec", deadline, shown, **args)
        except TransportError as e:
            if SPAWN_FAILED not in str(e):
                raise
            return e
        pid = started.get("pid") if isinstance(started, dict) else None
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise TransportError(f"{self.target}: agent/exec answered no pid: {str(started)[:200]}", command=shown)
        return pid

    def write_file(self, path: str, data: bytes, *, timeout: float) -> None:
        """Atomically, as over SSH: stdin (input-data) when it fits, else file-write parts joined in the guest."""
        if data.isascii() and self._input_problem(sh(_WRITE_SCRIPT, path), data) is None:
            super().write_file(path, data, timeout=timeout)
        else:
            self._write_parts(path, data, time.monotonic() + timeout)

    def _write_parts(self, path: str, data: bytes, deadline: float) -> None:
        directory = path.rsplit("/", 1)[0] or "/"
        self.run(["mkdir", "-p", "--", directory], timeout=deadline - time.monotonic()).check(f"cannot write {path}")
        token = secrets.token_hex(8)
        parts = [f"{path}.part.{token}.{i}" for i in range(max(1, -(-len(data) // PART)))]
        try:
            for i, part in enumerate(parts):
                chunk = base64.b64encode(data[i * PART : (i + 1) * PART]).decode()
                self._call("post", "file-write", deadline, f"agent/file-write {part}",
                           file=part, content=chunk, encode=0)
        except TransportError:
            try:
                self.run(["rm", "-f", "--", *parts], timeout=min(5.0, max(0.1, deadline - time.monotonic())))
            except TransportError:
                pass
            raise
        self.run(sh(_ASSEMBLE_SCRIPT, path, *parts), timeout=deadline - time.monotonic()).check(f"cannot write {path}")


