"""Every read from a guest, a controller or a URL is bounded in bytes and in total time (security
issue 20, findings 2 and 6), against real hostile HTTP servers on loopback: one that answers 300 MiB,
one that never stops, one that trickles its headers or its body a byte at a time.

The program's own code paths are run in a child Python (`-I`, as the launcher runs it), whose peak
memory (ru_maxrss) and time are measured: the controller's HTTPS carrier with a pinned certificate
(stacks/controller.py), the `ready = { url }` check (controller.py), the agent transport's PVE API
client and the webhook (report.py) go through vzdump_hook/httpio.py. The control reads the same
300 MiB answer the way the program did before (`requests`, `.content`) and shows the memory it costs:
what the bounded reads rule out is real."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.controller.conftest import openssl_cert

pytestmark = pytest.mark.integration

HUGE = 300 * 1024 * 1024
MEMORY_LIMIT_KIB = 150 * 1024


class Hostile:
    """A loopback HTTP(S) server that answers every request in one hostile way (`mode`)."""

    def __init__(self, mode: str, tls: ssl.SSLContext | None = None) -> None:
        self.mode = mode
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by close()
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            conn.settimeout(60)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            if self.mode == "huge":
                conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {HUGE}\r\n\r\n".encode())
                block = b'{"api": 1, "ok": true, "pad": "' + b"A" * (1024 * 1024)
                sent = 0
                while sent < HUGE and not self.stop.is_set():
                    part = block[: min(len(block), HUGE - sent)]
                    conn.sendall(part)
                    sent += len(part)
            elif self.mode == "endless":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
                while not self.stop.is_set():
                    conn.sendall(b"B" * 65536)
            elif self.mode in ("trickle-head", "trickle-body"):
                head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                if self.mode == "trickle-body":
                    conn.sendall(head)
                    head = b""
                for byte in head + b" " * 100000:
                    if self.stop.wait(0.2):
                        break
                    conn.sendall(bytes([byte]))
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, str]:
    cert, key, fingerprint = openssl_cert(tmp_path, "hostile")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx, fingerprint


@pytest.fixture
def servers() -> Iterator[list[Hostile]]:
    made: list[Hostile] = []
    yield made
    for s in made:
        s.close()


def child(code: str, timeout: float = 120) -> dict[str, float | str]:
    """Run `code` (which sets `outcome`) in a child Python, isolated as the launcher runs the program;
    its outcome, wall time and peak memory (VmHWM: the peak of its own address space; ru_maxrss would
    keep the parent's high-water mark across fork and exec)."""
    prog = (
        "import json, time\n"
        "t0 = time.monotonic()\n"
        "try:\n" + "".join(f"    {line}\n" for line in code.strip().splitlines()) +
        "except Exception as e:\n"
        "    outcome = f'{type(e).__name__}: {e}'\n"
        "hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
        "print(json.dumps({'outcome': str(outcome), 'seconds': time.monotonic() - t0, 'maxrss_kib': hwm}))\n"
    )
    r = subprocess.run([sys.executable, "-I", "-c", prog], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def carrier_code(url: str, fingerprint: str, token: Path, timeout: float) -> str:
    return f"""
from vzdump_hook.stacks.controller_table import ControllerSpec
from vzdump_hook.stacks.controller import HttpCarrier
spec = ControllerSpec(url={url!r}, token_file={str(token)!r}, fingerprint={fingerprint.replace(':', '').lower()!r})
outcome = HttpCarrier(spec, 'appctl').send('status', {{}}, {timeout})
"""


@pytest.fixture
def token(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("t" * 32 + "\n")
    path.chmod(0o600)
    return path


def test_control_an_unbounded_read_of_the_huge_answer_costs_its_size(servers: list[Hostile]) -> None:
    servers.append(srv := Hostile("huge"))
    got = child(f"import requests\noutcome = len(requests.get({srv.url!r}, timeout=60).content)")
    assert got["outcome"] == str(HUGE), got
    assert float(got["maxrss_kib"]) > 300 * 1024, got  # the hostile server works: reading it whole costs 300 MiB


@pytest.mark.parametrize("mode", ["huge", "endless"])
def test_a_controller_answer_is_cut_at_its_cap(servers: list[Hostile], tls: tuple[ssl.SSLContext, str], token: Path,
                                               mode: str) -> None:
    servers.append(srv := Hostile(mode, tls[0]))
    got = child(carrier_code(srv.url, tls[1], token, 3.0))
    assert got["outcome"].startswith("Refused: controller appctl"), got
    assert "longer than 64 KiB" in got["outcome"], got
    assert float(got["maxrss_kib"]) < MEMORY_LIMIT_KIB, got
    assert float(got["seconds"]) < 3.0 + 5, got


@pytest.mark.parametrize("mode", ["trickle-head", "trickle-body"])
def test_a_trickled_controller_answer_ends_at_the_requests_timeout(servers: list[Hostile],
                                                                   tls: tuple[ssl.SSLContext, str], token: Path,
                                                                   mode: str) -> None:
    """One byte every 0.2 s keeps each socket read alive: the whole request still ends at its timeout."""
    servers.append(srv := Hostile(mode, tls[0]))
    got = child(carrier_code(srv.url, tls[1], token, 3.0))
    assert (got["outcome"].startswith("ConnectError: controller appctl")
            and "no whole answer within 3.0 s" in got["outcome"]), got
    assert 2.9 < float(got["seconds"]) < 3.0 + 5, got


@pytest.mark.parametrize("mode", ["huge", "endless", "trickle-head", "trickle-body"])
def test_a_ready_url_is_bounded(servers: list[Hostile], mode: str) -> None:
    """`ready = { url }`: only the status counts; the body is never read, the look ends at its timeout."""
    servers.append(srv := Hostile(mode))
    code = f"""
from vzdump_hook.stacks.table import ReadySpec
from vzdump_hook.guest.ready import Readiness
try:
    outcome = Readiness.look_once(None, None, ReadySpec(url={srv.url + '/health'!r}), 3.0)
except OSError as e:
    outcome = f'OSError: {{e}}'
"""
    got = child(code)
    if mode.startswith("trickle-head"):
        assert got["outcome"].startswith("OSError:") and "no whole answer within 3.0 s" in got["outcome"], got
    else:
        assert got["outcome"] == "True", got  # a 200 is ready, whatever follows it
    assert float(got["maxrss_kib"]) < MEMORY_LIMIT_KIB, got
    assert float(got["seconds"]) < 3.0 + 5, got


@pytest.mark.parametrize("mode", ["huge", "trickle-body"])
def test_the_webhook_receiver_cannot_hold_the_job(servers: list[Hostile], mode: str) -> None:
    servers.append(srv := Hostile(mode))
    code = f"""
from vzdump_hook.node import report
from vzdump_hook.config import NotifyConfig
cfg = NotifyConfig({srv.url + '/ping/secret-uuid'!r}, timeout=3.0)
report._send(cfg, report._request(cfg, report.Message('t', 'x', False, {{}})), 3.0)
outcome = 'sent'
"""
    got = child(code)
    if mode == "huge":
        assert (got["outcome"].startswith("TooLarge: notify http://127.0.0.1")
                and "secret-uuid" not in got["outcome"]), got
    else:
        assert got["outcome"].startswith("DeadlineExceeded:"), got
    assert float(got["maxrss_kib"]) < MEMORY_LIMIT_KIB, got
    assert float(got["seconds"]) < 3.0 + 5, got


def agent_code(servers: list[Hostile], tmp_path: Path, mode: str, timeout: float) -> str:
    """A hostile HTTPS "PVE API" (`mode`) with its CA, and the agent transport's connect() against it."""
    from tests.infra.pve_api import make_ca

    ca, cert, key = make_ca(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    servers.append(srv := Hostile(mode, ctx))
    token = tmp_path / "api-token"
    token.write_text("00000000-0000-0000-0000-000000000000\n")
    token.chmod(0o600)
    return f"""
from vzdump_hook.transports.tables import AgentConfig
from vzdump_hook.transports.agent import AgentTransport
cfg = AgentConfig(api='https', host='127.0.0.1', port={srv.port}, token_id='root@pam!hook', token_file={str(token)!r},
                  verify={str(ca)!r}, node='pve')
outcome = AgentTransport(101, cfg).connect({timeout})
"""


def test_the_agent_transports_api_answer_is_capped(servers: list[Hostile], tmp_path: Path) -> None:
    """The PVE API's answer carries a guest's output (agent/exec-status): read up to its cap, no further."""
    got = child(agent_code(servers, tmp_path, "endless", 20))
    assert got["outcome"].startswith("TransportError:") and "longer than 48 MiB" in got["outcome"], got
    assert float(got["maxrss_kib"]) < MEMORY_LIMIT_KIB, got


def test_a_trickled_api_answer_ends_at_the_requests_timeout(servers: list[Hostile], tmp_path: Path) -> None:
    start = time.monotonic()
    got = child(agent_code(servers, tmp_path, "trickle-body", 3))
    assert "ConnectError" in got["outcome"] and "within 3.0 s" in got["outcome"], got
    assert float(got["seconds"]) < 3.0 + 5 and time.monotonic() - start < 3.0 + 10, got
