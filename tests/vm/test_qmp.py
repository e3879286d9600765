"""QMP against real QEMU (Debian's 7.2, upstream: no Proxmox `query-backup`), through the hook's own
QMP client (vzdump_hook/qemu/qmp.py) and as the hook uses it at `pre-stop`.

The QMP double (tests/infra/qmp_double.py) stays for Proxmox's backup job; what is checked here is what
any QEMU does: the greeting, capabilities negotiation, one client at a time, and the answer to a
command it does not have.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.infra.vm import TestVm
from vzdump_hook.qemu import qmp

pytestmark = pytest.mark.integration


def _line(sock: socket.socket) -> dict[str, object]:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        assert chunk, "QEMU closed the connection"
        buf += chunk
    return json.loads(buf.splitlines()[0])  # type: ignore[no-any-return]


def test_greeting_then_nothing_works_before_negotiation(vm: TestVm) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(vm.qmp_path))
        greeting = _line(s)["QMP"]
        assert greeting["version"]["qemu"]["major"] == 7 and "capabilities" in greeting  # type: ignore[index,operator]
        s.sendall(b'{"execute": "query-status"}\n')
        err = _line(s)["error"]
        assert err["class"] == "CommandNotFound" and "qmp_capabilities" in err["desc"]  # type: ignore[index]
        s.sendall(b'{"execute": "qmp_capabilities"}\n')
        assert _line(s) == {"return": {}}
        s.sendall(b'{"execute": "query-status", "id": 7}\n')
        reply = _line(s)
        assert reply["id"] == 7 and reply["return"]["status"] == "running"  # type: ignore[index]


def test_query_backup_is_command_not_found_in_upstream_qemu(vm: TestVm) -> None:
    with pytest.raises(qmp.QmpCommandError) as ei:
        qmp.query_backup(str(vm.qmp_path), timeout=10)
    assert ei.value.error_class == "CommandNotFound"
    assert str(ei.value) == "QMP query-backup: CommandNotFound: The command query-backup has not been found"


def test_one_client_at_a_time_a_second_gets_its_greeting_when_the_first_leaves(vm: TestVm) -> None:
    first = socket.socket(socket.AF_UNIX)
    first.settimeout(10)
    first.connect(str(vm.qmp_path))
    _line(first)
    with socket.socket(socket.AF_UNIX) as second:
        second.settimeout(1.5)
        second.connect(str(vm.qmp_path))  # the kernel's listen backlog takes it; QEMU does not
        with pytest.raises(TimeoutError):
            second.recv(1)
        # the hook's client, meanwhile, gives up within its timeout and says the socket is busy
        t0 = time.monotonic()
        with pytest.raises(qmp.QmpBusy):
            qmp.query_backup(str(vm.qmp_path), timeout=1.0)
        assert time.monotonic() - t0 < 3
        first.close()
        second.settimeout(10)
        assert "QMP" in _line(second)
