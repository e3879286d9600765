"""The SSH transport against a real OpenSSH sshd in its own network namespace."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from vzdump_hook.errors import CommandTimeout, ConnectError, HostKeyError
from vzdump_hook.transports.ssh import SshTransport
from vzdump_hook.transports.tables import SshConfig

pytestmark = pytest.mark.integration


def transport(g: Any, **over: Any) -> SshTransport:
    cfg = dict(host=g.host, port=g.port, user=g.user, identity_file=g.identity_file, known_hosts=g.known_hosts_file,
               connect_timeout=2.0)
    cfg.update(over)
    return SshTransport(SshConfig(**cfg))


def test_runs_commands_with_exit_status_stdout_stderr_and_stdin(test_guest: Any) -> None:
    with transport(test_guest) as t:
        r = t.run(["sh", "-c", 'echo out; echo err >&2; cat; exit 3'], timeout=10, stdin=b"from stdin\n")
        assert (r.exit_status, r.stdout, r.stderr) == (3, "out\nfrom stdin\n", "err\n")
        assert not r.ok


def test_arguments_are_quoted_never_interpreted(test_guest: Any, tmp_path: Path) -> None:
    evil = f"{tmp_path}/x; touch {tmp_path}/pwned $(touch {tmp_path}/pwned2) `touch {tmp_path}/pwned3`\nnewline"
    with transport(test_guest) as t:
        r = t.run(["printf", "%s", evil], timeout=10)
    assert r.stdout == evil
    assert not list(tmp_path.glob("pwned*"))


def test_atomic_file_write_read_remove(test_guest: Any, tmp_path: Path) -> None:
    path = f"{tmp_path}/dir with space/marker.json"
    data = b'{"x": 1}\n' * 1000
    with transport(test_guest) as t:
        assert t.read_file(path, limit=100, timeout=10) is None
        t.write_file(path, data, timeout=10)
        assert Path(path).read_bytes() == data
        assert oct(Path(path).stat().st_mode & 0o777) == "0o600"
        assert not [p for p in Path(path).parent.iterdir() if ".tmp." in p.name]
        assert t.read_file(path, limit=100, timeout=10) == data[:101]  # limit+1: oversize is noticed
        t.remove_file(path, timeout=10)
    assert not Path(path).exists()


def test_unknown_host_key_is_refused_with_fingerprint_and_how_to_trust(test_guest: Any, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyError) as ei:
        transport(test_guest, known_hosts=str(empty)).connect(5)
    msg = str(ei.value)
    assert test_guest.host_key_fingerprint in msg
    assert "`vzdump-hook trust VMID` shows it next to the command that prints the same fingerprint in the guest" in msg
    assert empty.read_text() == ""  # never auto-added


def test_changed_host_key_is_refused(test_guest: Any, tmp_path: Path) -> None:
    import subprocess

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    other = (tmp_path / "other.pub").read_text().split()
    kh = tmp_path / "known_hosts"
    kh.write_text(f"{test_guest.host} {other[0]} {other[1]}\n")
    with pytest.raises(HostKeyError, match="CHANGED"):
        transport(test_guest, known_hosts=str(kh)).connect(5)


def test_wrong_key_fails_authentication(test_guest: Any, tmp_path: Path) -> None:
    import subprocess

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "id")], check=True)
    with pytest.raises(ConnectError, match="authentication failed"):
        transport(test_guest, identity_file=str(tmp_path / "id")).connect(5)


def test_missing_identity_file(test_guest: Any, tmp_path: Path) -> None:
    with pytest.raises(ConnectError, match="does not exist"):
        transport(test_guest, identity_file=str(tmp_path / "nope")).connect(5)


def test_connect_timeout_when_packets_are_dropped(test_guest: Any) -> None:
    test_guest.cut_off()
    start = time.monotonic()
    with pytest.raises(ConnectError, match="timed out"):
        transport(test_guest, connect_timeout=1.5).connect(10)
    assert 1.0 < time.monotonic() - start < 5


def test_refused_when_sshd_is_down(test_guest: Any) -> None:
    test_guest.stop_sshd()
    start = time.monotonic()
    with pytest.raises(ConnectError):
        transport(test_guest).connect(10)
    assert time.monotonic() - start < 2


def test_tcp_accepted_but_no_banner_is_bounded(test_guest: Any) -> None:
    test_guest.freeze()
    try:
        start = time.monotonic()
        with pytest.raises(ConnectError, match="banner"):
            transport(test_guest, connect_timeout=1.5).connect(10)
        assert time.monotonic() - start < 5
    finally:
        test_guest.thaw()


def test_command_that_hangs_times_out(test_guest: Any) -> None:
    with transport(test_guest) as t:
        start = time.monotonic()
        with pytest.raises(CommandTimeout):
            t.run(["sleep", "30"], timeout=1.0)
        assert time.monotonic() - start < 3
        assert t.run(["true"], timeout=5).ok  # the connection is still usable


def test_established_session_stalls_mid_command_is_bounded(test_guest: Any) -> None:
    with transport(test_guest) as t:
        t.connect(5)
        test_guest.cut_off()  # drops packets of the open connection too
        start = time.monotonic()
        with pytest.raises((CommandTimeout, ConnectError)):
            t.write_file("/tmp/vzdh-never", b"x" * 300_000, timeout=2.0)
        assert time.monotonic() - start < 6


def test_parallel_commands_on_one_connection(test_guest: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with transport(test_guest) as t, ThreadPoolExecutor(8) as pool:
        start = time.monotonic()
        results = list(pool.map(lambda i: t.run(["sh", "-c", f"sleep 1; echo {i}"], timeout=10), range(8)))
        assert [r.stdout.strip() for r in results] == [str(i) for i in range(8)]
        assert time.monotonic() - start < 4


def _bad_known_hosts_lines(g: Any) -> dict[str, str]:
    good = Path(g.known_hosts_file).read_text().split("\n")[0].split()
    key = f"{good[-2]} {good[-1]}"
    return {
        "revoked": f"@revoked {g.host} {key}",
        "cert-authority": f"@cert-authority *.example {key}",
        "truncated key": f"{g.host} {good[-2]} {good[-1][:40]}",
        "not base64": f"{g.host} {good[-2]} AAAA!!!!",
        "unknown key type": f"{g.host} ssh-foo AAAAB3NzaC1yc2E=",
        "no key": f"{g.host}",
    }


@pytest.mark.parametrize("case", ["revoked", "cert-authority", "truncated key", "not base64", "unknown key type",
                                  "no key"])
def test_an_unsupported_known_hosts_line_is_a_clear_error_for_that_file_only(test_guest: Any, tmp_path: Path,
                                                                             case: str) -> None:
    bad = tmp_path / "bad_known_hosts"
    lines = Path(test_guest.known_hosts_file).read_text().splitlines()
    bad.write_text("\n".join(["# a comment", "", *lines, _bad_known_hosts_lines(test_guest)[case]]) + "\n")
    with pytest.raises(ConnectError) as ei:
        transport(test_guest, known_hosts=str(bad)).connect(5)
    msg = str(ei.value)
    assert f"{bad} line {len(lines) + 3}" in msg and "internal error" not in msg, msg
    with transport(test_guest) as t:  # a guest whose file is fine connects
        assert t.run(["true"], timeout=10).ok
