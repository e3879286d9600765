"""The `agent` transport against the VM's real qemu-guest-agent.

The PVE API double (tests/infra/pve_api.py) plays only what PVE adds -- token auth, the API paths,
parameter checks, `pvesh` -- and forwards every agent call to the VM's QGA socket as qemu-server does.
What the agent itself does (pids, polling, output capture and its 16 MiB limit, exit codes and
signals, base64, files, frozen file systems) is QEMU's own code running in the guest.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.infra.pve_api import PveApiDouble, make_pvesh
from tests.infra.vm import Qga, TestVm, VmError
from tests.vm.conftest import VMID
from vzdump_hook import config as configuration
from vzdump_hook.errors import TransportError
from vzdump_hook.transports import open_transport
from vzdump_hook.transports.base import Transport

pytestmark = pytest.mark.integration
QGA_MAX_OUTPUT = 16 * 1024 * 1024  # qga/commands.c GUEST_EXEC_MAX_OUTPUT


class HeldQga(Qga):
    """:class:`Qga` on one connection to the agent's socket, held until close() (and opened again after an
    error): the same commands, each after its own ``guest-sync-delimited``, with the same answers and errors.

    Why: while no host process holds the agent's virtio-serial port, qemu-ga sleeps in its main loop between
    polls of the port, and it reads a command's captured output 4 KiB per loop iteration: a guest-exec with
    16 MiB of output took ~120 s under TCG with a connection per call, ~5 s with one held. Nothing the tests
    check depends on it: the agent's answers are the same either way."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._lock = threading.Lock()  # the double's HTTP server runs a thread per request
        self._sock: socket.socket | None = None
        self._buf = bytearray()

    def call(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30) -> Any:
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self._buf = bytearray()
                    self._sock.settimeout(timeout)
                    self._sock.connect(self.path)
                self._sock.settimeout(timeout)
                reply = self.exchange(self._sock, self._buf, command, arguments)
            except (OSError, ValueError) as exc:
                self._close()
                raise VmError(f"QGA {command}: {exc}") from exc
            except BaseException:
                self._close()
                raise
        return self.answer(command, reply)

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._close()


@pytest.fixture
def api(vm: TestVm, tmp_path: Path) -> Iterator[PveApiDouble]:
    """The double, forwarding to the VM's agent on a held connection (HeldQga; vm.qga, a connection per call,
    waits meanwhile: the agent's socket takes one client at a time)."""
    double = PveApiDouble(tmp_path / "api")
    qga = HeldQga(vm.qga_path)
    double.add_vm(VMID).qga = qga
    try:
        yield double
    finally:
        double.close()
        qga.close()


@pytest.fixture(params=["https", "pvesh"])
def agent(request: pytest.FixtureRequest, api: PveApiDouble, tmp_path: Path) -> Transport:
    """An agent transport to the VM through the double: over HTTPS (token, CA) or the node's pvesh."""
    if request.param == "https":
        token = tmp_path / "token"
        token.write_text(api.secret + "\n")
        token.chmod(0o600)
        table: dict[str, Any] = {"api": "https", "host": "127.0.0.1", "port": api.port, "token_id": api.token_id,
                                 "token_file": str(token), "verify": str(api.ca_file), "node": api.node}
    else:
        table = {"pvesh": make_pvesh(api, tmp_path / "pvesh"), "node": api.node}
    return open_transport(configuration.validate_guest(VMID, {"transport": "agent", "agent": table}))


def test_argv_stdin_exit_status_and_raw_bytes_through_the_real_agent(agent: Transport, vm: TestVm) -> None:
    evil = "a b; touch /tmp/vzdh-pwned $(touch /tmp/vzdh-pwned2) `id` 'q' \"d\" \\ \n\u00e9"
    with agent as t:
        r = t.run(["sh", "-c", 'printf "%s" "$1"; printf "\\377\\001\\205x" >&2; cat; exit 5', "sh", evil], timeout=60,
                  stdin=b"from stdin\n")
        assert (r.exit_status, r.stdout, r.stderr) == (5, evil + "from stdin\n", "\ufffd\x01\ufffdx")
        status, out, err = t._exec(["sh", "-c", 'printf "\\377\\205\\000\\342\\200\\250end"'], None, 60)
        assert (status, out, err) == (0, b"\xff\x85\x00\xe2\x80\xa8end", b"")
        status, _, _ = t._exec(["sh", "-c", "kill -TERM $$"], None, 60)
        assert status == 128 + 15  # the agent reports a signal, not an exit code
    assert vm.ok("ls /tmp/vzdh-pwned /tmp/vzdh-pwned2 2>/dev/null | wc -l").strip() == "0"


def test_a_missing_program_is_exit_127_with_the_agents_spawn_error(agent: Transport) -> None:
    """The real qemu-ga answers a program it cannot start with an agent error (PVE: "Agent error: ..."),
    not an exit code; the transport reports it as a shell would (127, the agent's words on stderr)."""
    with agent as t:
        r = t.run(["/nonexistent/vzdh"], timeout=60)
    assert r.exit_status == 127 and "Failed to execute child process" in r.stderr, r


def test_the_pid_is_polled_until_exit_then_forgotten_by_the_agent(agent: Transport, api: PveApiDouble) -> None:
    with agent as t:
        assert t.run(["sh", "-c", "sleep 1.5; echo done"], timeout=60).stdout == "done\n"
    polls = api.calls("exec-status")
    assert len(polls) >= 2 and polls[-1]["pid"] == polls[-2]["pid"]
    with pytest.raises(TransportError, match="Invalid parameter 'pid'"):  # QEMU forgets a reaped pid
        agent._call("get", "exec-status", time.monotonic() + 30, "x", pid=int(polls[-1]["pid"]))  # type: ignore[attr-defined]


@pytest.mark.parametrize("agent", ["https"], indirect=True)  # 16 MiB through TCG's virtio-serial: once is enough
def test_output_over_the_agents_capture_limit_is_refused_not_used(agent: Transport) -> None:
    with agent as t, pytest.raises(TransportError, match="truncated by the guest agent"):
        t.run(["sh", "-c", f"head -c {QGA_MAX_OUTPUT + 4096} /dev/zero | tr '\\0' x"], timeout=600)


def test_files_written_through_the_agent_arrive_byte_for_byte(agent: Transport, vm: TestVm) -> None:
    data = bytes(range(256)) * 300  # over one file-write request's 60 KiB: the transport splits it
    with agent as t:
        t.write_file("/root/vzdh-agent-file", data, timeout=120)
        assert t.read_file("/root/vzdh-agent-file", limit=1 << 20, timeout=120) == data
    assert vm.ok("sha256sum /root/vzdh-agent-file").split()[0] == __import__("hashlib").sha256(data).hexdigest()
    vm.ok("rm -f /root/vzdh-agent-file")
