"""agent transport: its pvesh and https clients against the PVE API double (tests/infra/pve_api.py),
its VM being this host (commands run as plain processes: no namespaces needed here)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.infra.pve_api import PveApiDouble, make_pvesh
from vzdump_hook.errors import CommandTimeout, ConnectError, TransportError
from vzdump_hook.transports import agent as agent_mod
from vzdump_hook.transports.agent import AgentTransport, output_bytes
from vzdump_hook.transports.tables import AgentConfig


@pytest.fixture
def api(tmp_path: Path) -> Iterator[PveApiDouble]:
    a = PveApiDouble(tmp_path / "api")
    a.add_vm(101)
    yield a
    a.close()


@pytest.fixture
def token(tmp_path: Path, api: PveApiDouble) -> Path:
    t = tmp_path / "token"
    t.write_text(api.secret + "\n")
    t.chmod(0o600)
    return t


def https(api: PveApiDouble, token: Path, **over: object) -> AgentTransport:
    cfg = dict(api="https", host="127.0.0.1", port=api.port, token_id=api.token_id,
               token_file=str(token), verify=str(api.ca_file), node=api.node)
    cfg.update(over)
    return AgentTransport(101, AgentConfig(**cfg))  # type: ignore[arg-type]


@pytest.fixture(params=["https", "pvesh"])
def transport(request: pytest.FixtureRequest, api: PveApiDouble, token: Path, tmp_path: Path) -> AgentTransport:
    if request.param == "https":
        return https(api, token)
    return AgentTransport(101, AgentConfig(pvesh=make_pvesh(api, tmp_path / "pvesh"), node=api.node))


def test_exec_polls_until_exited_and_returns_status_output_and_stdin(transport: AgentTransport,
                                                                     api: PveApiDouble) -> None:
    api.exec_busy_polls = 3  # the agent reports `exited: 0` three times, whatever the machine's speed
    r = transport.run(["sh", "-c", "cat; echo err >&2; exit 4"], timeout=10, stdin=b"hello\n")
    assert (r.exit_status, r.stdout, r.stderr) == (4, "hello\n", "err\n")
    assert len(api.calls("exec-status")) >= 4  # it went on polling until the agent said exited
    assert api.calls("exec")[-1]["command"] == ["sh", "-c", "cat; echo err >&2; exit 4"]


def test_a_signal_is_reported_as_128_plus_its_number(transport: AgentTransport) -> None:
    assert transport.run(["sh", "-c", "kill -9 $$"], timeout=10).exit_status == 137


def test_a_long_command_times_out_within_the_timeout(transport: AgentTransport) -> None:
    start = time.monotonic()
    with pytest.raises(CommandTimeout, match="may still run"):
        transport.run(["sleep", "20"], timeout=1.0)
    assert time.monotonic() - start < 4.0  # bounded (the command sleeps 20 s); slack for a loaded machine


def test_a_hung_api_is_bounded_by_the_timeout(api: PveApiDouble, token: Path) -> None:
    api.delay = 3
    start = time.monotonic()
    with pytest.raises(CommandTimeout):
        https(api, token).run(["true"], timeout=1.0)
    assert time.monotonic() - start < 2.5


@pytest.mark.parametrize(
    ("knob", "text"),
    [("agent_configured", "No QEMU guest agent configured"), ("agent_running", "QEMU guest agent is not running")],
)
def test_an_agent_that_is_off_is_a_clear_connect_error(transport: AgentTransport, api: PveApiDouble,
                                                       knob: str, text: str) -> None:
    setattr(api.vms[101], knob, False)
    with pytest.raises(ConnectError) as ei:
        transport.connect(5)
    msg = str(ei.value)
    assert text in msg and "qemu-guest-agent" in msg and "qm set 101 --agent enabled=1" in msg


def test_a_vm_that_does_not_exist_or_wrong_node(api: PveApiDouble, token: Path) -> None:
    with pytest.raises(TransportError, match="does not exist"):
        AgentTransport(999, https(api, token).cfg).run(["true"], timeout=5)
    with pytest.raises(TransportError, match="no such cluster node"):
        https(api, token, node="other").run(["true"], timeout=5)


def test_a_wrong_token_is_refused_with_what_to_check(api: PveApiDouble, token: Path) -> None:
    token.write_text("not-the-secret\n")
    with pytest.raises(ConnectError, match=r"refused the token root@pam!vzdh .*401"):
        https(api, token).connect(5)


def test_tls_is_verified_against_the_configured_ca(api: PveApiDouble, token: Path, tmp_path: Path) -> None:
    from tests.infra.pve_api import make_ca

    other_ca, _, _ = make_ca(tmp_path / "other")
    with pytest.raises(ConnectError, match="TLS certificate not trusted"):
        https(api, token, verify=str(other_ca)).connect(5)
    with pytest.raises(ConnectError, match="TLS certificate not trusted"):
        https(api, token, verify=True).connect(5)  # the system's CAs do not know the test CA
    with pytest.raises(ConnectError, match="not found"):
        https(api, token, verify=str(tmp_path / "nope.pem")).connect(5)
    assert not api.requests  # nothing was sent over an unverified connection


def test_unreadable_token_file(api: PveApiDouble, tmp_path: Path) -> None:
    with pytest.raises(ConnectError, match="cannot read the API token file"):
        https(api, tmp_path / "absent").connect(5)


def test_bytes_come_back_as_the_guest_wrote_them(transport: AgentTransport) -> None:
    status, out, err = transport._exec(["printf", "\\377\\205\\000\\342\\200\\250|"], None, 10)
    assert (status, out) == (0, b"\xff\x85\x00\xe2\x80\xa8|")
    assert output_bytes("caf\u00e9") == b"caf\xe9"  # PVE: one character per byte
    assert output_bytes("\u2028") == "\u2028".encode()  # a server that decoded UTF-8 first


def test_truncated_stdout_is_refused_truncated_stderr_noted(transport: AgentTransport, api: PveApiDouble) -> None:
    api.max_output = 100
    with pytest.raises(TransportError, match="truncated"):
        transport.run(["head", "-c", "1000", "/dev/zero"], timeout=10)
    r = transport.run(["sh", "-c", "head -c 1000 /dev/zero >&2; echo ok"], timeout=10)
    assert r.stdout == "ok\n" and r.stderr.endswith("[stderr truncated by the guest agent]\n")


def test_stdin_limits_are_kept_before_sending(transport: AgentTransport, api: PveApiDouble) -> None:
    with pytest.raises(TransportError, match="binary input refused"):
        transport.run(["cat"], timeout=5, stdin=b"\x00\xff")
    with pytest.raises(TransportError, match="too large"):
        transport.run(["cat"], timeout=5, stdin=b"x" * (agent_mod.INPUT_LIMIT + 1))
    # fits PVE's maxLength, not pveproxy's POST limit once form-encoded
    with pytest.raises(TransportError, match="too large"):
        transport.run(["cat"], timeout=5, stdin=b'{"a": 1}' * 6000)
    assert not api.calls("exec")
    assert transport.run(["cat"], timeout=10, stdin=b'{"a": 1}\n' * 500).stdout == '{"a": 1}\n' * 500


def test_write_file_small_ascii_goes_as_input_data_large_as_file_write_parts(transport: AgentTransport,
                                                                             api: PveApiDouble,
                                                                             tmp_path: Path) -> None:
    small, large = tmp_path / "d" / "small.json", tmp_path / "d2" / "sub" / "large.bin"
    transport.write_file(str(small), b'{"x": 1}\n', timeout=10)
    assert small.read_bytes() == b'{"x": 1}\n' and not api.calls("file-write")
    data = os.urandom(100_000)
    transport.write_file(str(large), data, timeout=20)
    assert large.read_bytes() == data and oct(large.stat().st_mode & 0o777) == "0o600"
    writes = api.calls("file-write")
    assert len(writes) == 4 and all(w["encode"] == "0" and len(w["content"]) <= 60 * 1024 for w in writes)
    assert sorted(p.name for p in large.parent.iterdir()) == ["large.bin"]  # parts removed
    assert transport.read_file(str(large), limit=200_000, timeout=10) == data
    assert transport.read_file(str(tmp_path / "absent"), limit=10, timeout=10) is None


def test_a_failed_file_write_leaves_no_parts(transport: AgentTransport, api: PveApiDouble, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    real = api.file_write
    count = {"n": 0}

    def second_fails(vm: object, path: str, data: bytes) -> None:
        count["n"] += 1
        if count["n"] == 2:
            from tests.infra.pve_api import _ApiError

            raise _ApiError(500, "Agent error: Guest agent command failed, error was 'No space left on device'")
        real(vm, path, data)  # type: ignore[arg-type]

    monkeypatch.setattr(api, "file_write", second_fails)
    target = tmp_path / "m" / "marker.json"
    with pytest.raises(TransportError, match="No space left"):
        transport.write_file(str(target), os.urandom(70_000), timeout=20)
    assert not list(target.parent.iterdir())


def test_requests_is_imported_only_when_a_command_is_sent() -> None:
    import subprocess

    code = (
        "import sys; from vzdump_hook.config import validate_guest; "
        "from vzdump_hook.transports.tables import AgentConfig; from vzdump_hook.transports import open_transport;"
        "t = open_transport(validate_guest(101, {'transport': 'agent'}));"
        "print(any(m.startswith(('proxmoxer', 'requests')) for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_local_backend_runs_pvesh_by_absolute_path_with_a_fixed_environment(
        api: PveApiDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    monkeypatch.setenv("VZDH_LEAK", "1")
    t = AgentTransport(101, AgentConfig(pvesh=make_pvesh(api, tmp_path / "pv"), node=api.node))
    t.run(["true"], timeout=10)
    calls = [json.loads(x) for x in (tmp_path / "pv" / "pvesh-calls.jsonl").read_text().splitlines()]
    assert calls[0]["argv"][:2] == ["create", f"/nodes/{api.node}/qemu/101/agent/exec"]
    assert "VZDH_LEAK" not in calls[0]["env"] and calls[0]["env"]["PATH"] == "/usr/sbin:/usr/bin:/sbin:/bin"
    with pytest.raises(ConnectError, match="cannot run"):
        AgentTransport(101, AgentConfig(pvesh=str(tmp_path / "no-pvesh"), node=api.node)).connect(5)


def test_a_program_the_agent_cannot_start_is_exit_127_as_from_a_shell(transport: AgentTransport) -> None:
    """qemu-ga answers a spawn failure with an API error; the transport reports it as a shell would
    (127, the agent's words on stderr), so "is the wrapper there?" is asked the same way everywhere."""
    r = transport.run(["/nonexistent/vzdh-wrapper", "status"], timeout=10)
    assert r.exit_status == 127 and "Failed to execute child process" in r.stderr, r
    assert "/nonexistent/vzdh-wrapper" in r.stderr


def test_the_guest_side_of_a_guest_reached_by_its_agent_is_not_installed_not_unknown(transport: AgentTransport,
                                                                                    tmp_path: Path) -> None:
    """Before `guest install`, the wrapper is not there: check says what backup-start says (NOT
    INSTALLED), and `guest install`'s first look does not fail (it was: agent/exec failed)."""
    from vzdump_hook import config as configuration
    from vzdump_hook.guest import installed
    from vzdump_hook.guest.shipped import Layout

    guest = configuration.validate_guest(101, {"transport": "agent", "marker_path": str(tmp_path / "m" / "marker.json"),
                                               "agent": {"node": "pve1"}, "stacks": ["web"]})
    setup = installed.inspect(transport, guest, Layout(str(tmp_path / "guest-root")), time.monotonic() + 30)
    assert setup.recovery == "NOT INSTALLED" and not setup.restricted, setup
