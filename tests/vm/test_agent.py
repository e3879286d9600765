"""The `agent` transport against the VM's real qemu-guest-agent.

The PVE API double (tests/infra/pve_api.py) plays only what PVE adds -- token auth, the API paths,
parameter checks, `pvesh` -- and forwards every agent call to the VM's QGA socket as qemu-server does.
What the agent itself does (pids, polling, output capture and its 16 MiB limit, exit codes and
signals, base64, files, frozen file systems) is QEMU's own code running in the guest.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.infra.pve_api import PveApiDouble, make_pvesh
from tests.infra.vm import TestVm
from tests.vm.conftest import VMID
from vzdump_hook import config as configuration
from vzdump_hook.errors import TransportError
from vzdump_hook.transports import open_transport
from vzdump_hook.transports.base import Transport

pytestmark = pytest.mark.integration
QGA_MAX_OUTPUT = 16 * 1024 * 1024  # qga/commands.c GUEST_EXEC_MAX_OUTPUT


@pytest.fixture
def api(vm: TestVm, tmp_path: Path) -> Iterator[PveApiDouble]:
    double = PveApiDouble(tmp_path / "api")
    double.add_vm(VMID).qga = vm.qga
    try:
        yield double
    finally:
        double.close()


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


def test_a_missing_program_is_the_agents_spawn_error(agent: Transport) -> None:
    with agent as t, pytest.raises(TransportError, match="Failed to execute child process"):
        t.run(["/nonexistent/vzdh"], timeout=60)


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
