"""SSH transport edge cases, deterministically: paramiko's client, transport and channel are scripted fakes.

Patched at the boundaries only: `paramiko.SSHClient` (the client the transport builds), the TCP
connect (`socket.create_connection`) and the transport's clock (`time` in ssh.py). The code under
test (`SshTransport._connect`, `_exec`, `_send`, `_drain`) runs unchanged.

A `FakeChannel` is driven by a script of steps; each step is a group of events that arrive together
(output on stdout/stderr, exit-status, EOF, close, the connection dropping). A step arrives when the
transport waits (`status_event.wait` or `time.sleep`), so nothing here synchronises with real sleeps;
a step can also arrive in the middle of a loop iteration (on a given read of `eof_received` /
`closed`), to hit the windows the two races fixed in ssh.py lived in (327c2b5: exit-status and close
arriving together; c30407d: exit-status arriving before the last output).

The fake channel follows paramiko's semantics where they matter: a closed channel still hands out
what it buffered; a close (and the transport dying, which unlinks its channels) sets `status_event`
with `exit_status` left at -1 (paramiko's `Channel._set_closed`); `recv` on an empty open channel
would block, and so does `recv_exit_status` before `status_event` is set: both fail the test here.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vzdump_hook.errors import CommandTimeout, ConnectError, TransportError
from vzdump_hook.transports import ssh as ssh_mod
from vzdump_hook.transports.base import display
from vzdump_hook.transports.ssh import SshTransport
from vzdump_hook.transports.tables import SshConfig

paramiko = ssh_mod._import_paramiko()

# -- the script -------------------------------------------------------------------------------------


def out(data: bytes) -> tuple[str, Any]:
    return ("out", data)


def err(data: bytes) -> tuple[str, Any]:
    return ("err", data)


def status(n: int) -> tuple[str, Any]:
    return ("status", n)


EOF = ("eof", None)
CLOSE = ("close", None)  # the server's close: paramiko sets status_event, exit_status stays as it is
DROP = ("drop", None)  # the connection dies: paramiko's transport thread unlinks its channels, then goes inactive
INACTIVE = ("inactive", None)  # the transport is no longer active, the channel not yet unlinked


@dataclass
class Step:
    """Events that arrive together: at the transport's next wait, or on the `nth` read of `on_read`
    (or, if that read has not come after a few waits, at a wait anyway)."""

    events: tuple[tuple[str, Any], ...]
    on_read: tuple[str, int] | None = None


def step(*events: tuple[str, Any], on_read: tuple[str, int] | None = None) -> Step:
    return Step(events, on_read)


# -- fakes ------------------------------------------------------------------------------------------


class Hang(AssertionError):
    """The transport would block or spin forever on a real channel."""


class Clock:
    """ssh.py's `time`: monotonic() and sleep(); a sleep is one tick of the running channel."""

    LIMIT = 200_000  # monotonic() calls in one test: far more means a loop that never ends

    def __init__(self) -> None:
        self.now = 1000.0
        self.calls = 0
        self.channel: FakeChannel | None = None

    def monotonic(self) -> float:
        self.calls += 1
        if self.calls > self.LIMIT:
            raise Hang("the transport keeps polling a channel that will never change")
        return self.now

    def sleep(self, dt: float) -> None:
        if self.channel is not None:
            self.channel.tick(dt)
        else:
            self.now += dt


class FakeEvent:
    """Channel.status_event: wait() is one tick of the channel (the script's next step arrives)."""

    def __init__(self, chan: FakeChannel) -> None:
        self.chan = chan
        self.flag = False

    def is_set(self) -> bool:
        return self.flag

    def set(self) -> None:
        self.flag = True

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is None and not self.flag:
            raise Hang("status_event.wait() without a timeout on a channel with no exit status")
        self.chan.tick(timeout or 0.0)
        return self.flag


class FakeChannel:
    def __init__(self, guest: Guest, steps: list[Step], *, send_chunk: int = 1 << 30, send_stalls: int = 0,
                 send_zero: bool = False, exec_error: BaseException | None = None) -> None:
        self.guest = guest
        self.clock = guest.clock
        self.steps = list(steps)
        self.send_chunk = send_chunk  # the most one send() takes (a small window)
        self.send_stalls = send_stalls  # this many send() calls time out first (a guest slow to read)
        self.send_zero = send_zero  # send() returns 0: the channel closed under us
        self.exec_error = exec_error
        self.transport: FakeTransport | None = None
        self.status_event = FakeEvent(self)
        self.exit_status = -1
        self._eof = False
        self._closed = False
        self.out_buf = bytearray()
        self.err_buf = bytearray()
        self.sent = bytearray()
        self.log: list[tuple[str, Any]] = []
        self.reads: dict[str, int] = {}
        self.closed_by_us = False
        self.command: str | None = None
        self.idle = 0  # ticks since a step arrived

    # the script
    def apply(self, s: Step) -> None:
        assert self.transport is not None
        for kind, arg in s.events:
            if kind == "out":
                self.out_buf += arg
            elif kind == "err":
                self.err_buf += arg
            elif kind == "status":
                self.exit_status = arg
                self.status_event.set()
            elif kind == "eof":
                self._eof = True
            elif kind == "close":
                self._set_closed()
            elif kind == "drop":
                self._set_closed()
                self.transport.active = False
            elif kind == "inactive":
                self.transport.active = False
            else:
                raise AssertionError(kind)

    def _set_closed(self) -> None:  # paramiko Channel._set_closed: waiters wake, exit_status untouched
        self._closed = True
        self.status_event.set()

    def tick(self, dt: float) -> None:
        self.log.append(("tick", dt))
        self.idle += 1
        if self.steps and (self.steps[0].on_read is None or self.idle > 3):
            self.idle = 0
            self.apply(self.steps.pop(0))
            self.clock.now += min(dt, 0.001)  # something arrived: the wait returned early
        else:
            self.clock.now += dt

    def _read(self, name: str) -> None:
        self.reads[name] = self.reads.get(name, 0) + 1
        if self.steps and self.steps[0].on_read == (name, self.reads[name]):
            self.idle = 0
            self.apply(self.steps.pop(0))

    @property
    def eof_received(self) -> bool:
        self._read("eof_received")
        return self._eof

    @property
    def closed(self) -> bool:
        self._read("closed")
        return self._closed

    # paramiko.Channel's API as ssh.py uses it
    def exec_command(self, command: str) -> None:
        self.log.append(("exec", command))
        self.command = command
        self.clock.channel = self
        if self.exec_error is not None:
            raise self.exec_error

    def settimeout(self, t: float | None) -> None:
        self.log.append(("settimeout", t))

    def send(self, data: Any) -> int:
        if self.send_stalls:
            self.send_stalls -= 1
            self.log.append(("send-stall", 0))
            self.clock.now += 0.5
            raise TimeoutError()
        if self.send_zero:
            return 0
        chunk = bytes(data[: self.send_chunk])
        self.sent += chunk
        self.log.append(("send", len(chunk)))
        return len(chunk)

    def shutdown_write(self) -> None:
        self.log.append(("shutdown_write", None))

    def recv_ready(self) -> bool:
        return bool(self.out_buf)

    def recv_stderr_ready(self) -> bool:
        return bool(self.err_buf)

    def recv(self, n: int) -> bytes:
        if not self.out_buf and not (self._eof or self._closed):
            raise Hang("recv() on an empty open channel blocks")
        data = bytes(self.out_buf[:n])
        del self.out_buf[:n]
        self.log.append(("recv", len(data)))
        return data

    def recv_stderr(self, n: int) -> bytes:
        if not self.err_buf and not (self._eof or self._closed):
            raise Hang("recv_stderr() on an empty open channel blocks")
        data = bytes(self.err_buf[:n])
        del self.err_buf[:n]
        self.log.append(("recv_stderr", len(data)))
        return data

    def exit_status_ready(self) -> bool:
        return self._closed or self.status_event.is_set()

    def recv_exit_status(self) -> int:
        if not self.status_event.is_set():
            raise Hang("recv_exit_status() before any exit status or close blocks forever")
        return self.exit_status

    def close(self) -> None:
        self.log.append(("close", None))
        self.closed_by_us = True
        self._closed = True
        if self.clock.channel is self:
            self.clock.channel = None


class FakeTransport:
    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.active = True
        self.keepalive: int | None = None
        self.channels: list[FakeChannel] = []
        self.open_error: BaseException | None = None

    def is_active(self) -> bool:
        return self.active

    def set_keepalive(self, n: int) -> None:
        self.keepalive = n

    def open_session(self, timeout: float | None = None) -> FakeChannel:
        assert timeout is not None and timeout > 0  # every channel open is bounded
        if not self.active:
            raise paramiko.SSHException("SSH session not active")
        if self.open_error is not None:
            raise self.open_error
        if not self.guest.commands:
            raise AssertionError("the test scripted no more commands")
        chan = self.guest.commands.pop(0)
        chan.transport = self
        self.channels.append(chan)
        return chan


class FakeClient:
    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.transport: FakeTransport | None = None
        self.closed = False
        self.connect_kwargs: dict[str, Any] = {}

    def load_host_keys(self, path: str) -> None:  # pragma: no cover - known_hosts is absent here
        pass

    def set_missing_host_key_policy(self, policy: Any) -> None:
        pass

    def connect(self, hostname: str, **kw: Any) -> None:
        self.connect_kwargs = dict(kw, hostname=hostname)
        failure = self.guest.connect_failures.pop(0) if self.guest.connect_failures else None
        if failure is not None:
            raise failure
        self.transport = FakeTransport(self.guest)

    def get_transport(self) -> FakeTransport | None:
        return self.transport

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.active = False


@dataclass
class Guest:
    """The far end: the clients built, the commands' scripts in order, connection failures to come."""

    clock: Clock
    clients: list[FakeClient] = field(default_factory=list)
    commands: list[FakeChannel] = field(default_factory=list)
    connect_failures: list[BaseException | None] = field(default_factory=list)
    tcp_failures: list[BaseException | None] = field(default_factory=list)

    def new_client(self) -> FakeClient:
        c = FakeClient(self)
        self.clients.append(c)
        return c

    def new_socket(self, address: Any, timeout: float | None = None) -> Any:
        failure = self.tcp_failures.pop(0) if self.tcp_failures else None
        if failure is not None:
            raise failure
        return _Sock()

    def command(self, *steps: Step, **kw: Any) -> FakeChannel:
        chan = FakeChannel(self, list(steps), **kw)
        self.commands.append(chan)
        return chan

    def ok(self, text: bytes = b"ok\n") -> FakeChannel:
        return self.command(step(out(text), status(0), EOF, CLOSE))


class _Sock:
    def setsockopt(self, *a: Any) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def guest(mocker: Any) -> Guest:
    clock = Clock()
    g = Guest(clock)
    mocker.patch.object(ssh_mod, "time", clock)
    mocker.patch.object(paramiko, "SSHClient", side_effect=g.new_client)
    mocker.patch.object(socket, "create_connection", side_effect=g.new_socket)  # ssh.py connects its own socket
    return g


@pytest.fixture
def t(tmp_path: Path) -> Iterator[SshTransport]:
    cfg = SshConfig(host="192.0.2.10", user="root", identity_file=str(tmp_path / "id_ed25519"),
                    known_hosts=str(tmp_path / "known_hosts"), connect_timeout=5.0)
    tr = SshTransport(cfg)
    yield tr
    tr.close()


ARGV = ["docker", "compose", "--project-directory", "/srv/app", "ps"]
SHOWN = display(ARGV)


def assert_names_command(e: TransportError) -> None:
    assert e.command == SHOWN
    assert f"command: {SHOWN}" in str(e)


# -- 1. exit status before the last output (c30407d) ----------------------------------------------

STATUS_FIRST = {
    "status-then-stdout-and-stderr": [step(out(b"one\n")), step(status(0)),
                                      step(out(b"two\n"), err(b"warn\n")), step(EOF), step(CLOSE)],
    "status-before-any-output": [step(status(0)), step(out(b"one\n")), step(err(b"warn\n")),
                                 step(out(b"two\n"), EOF), step(CLOSE)],
    "status-then-output-with-eof": [step(out(b"one\n"), status(0)),
                                    step(out(b"two\n"), err(b"warn\n"), EOF), step(CLOSE)],
    # the tail and EOF land after the transport drained, before it looks at eof_received
    "tail-between-drain-and-eof-check": [step(out(b"one\n"), status(0)),
                                         step(out(b"two\n"), err(b"warn\n"), EOF, on_read=("eof_received", 2)),
                                         step(CLOSE)],
    "status-then-stderr-then-close-without-eof": [step(out(b"one\n"), status(0)),
                                                  step(err(b"warn\n")), step(out(b"two\n"), CLOSE)],
}


@pytest.mark.parametrize("script", STATUS_FIRST.values(), ids=STATUS_FIRST.keys())
@pytest.mark.parametrize("code", [0, 3])
def test_exit_status_before_the_last_output_keeps_all_output(guest: Guest, t: SshTransport,
                                                             script: list[Step], code: int) -> None:
    steps = [Step(tuple(status(code) if k == "status" else (k, a) for k, a in s.events), s.on_read) for s in script]
    chan = guest.command(*steps)
    r = t.run(ARGV, timeout=30)
    assert (r.exit_status, r.stdout, r.stderr) == (code, "one\ntwo\n", "warn\n")
    assert r.command == SHOWN
    assert chan.command == "docker compose --project-directory /srv/app ps"
    # it waited for the end of the output, not just the status
    assert all(e == CLOSE for s in chan.steps for e in s.events)
    assert chan.closed_by_us


def test_large_output_split_around_the_status_is_complete_and_in_order(guest: Guest, t: SshTransport) -> None:
    parts = [bytes([65 + i]) * 70000 for i in range(6)]  # each larger than one recv(65536)
    guest.command(step(out(parts[0])), step(out(parts[1]), status(0)),
                  step(out(parts[2])), step(out(parts[3]), err(b"e" * 100000)),
                  step(out(parts[4])), step(out(parts[5]), EOF), step(CLOSE))
    code, o, e = t._exec(ARGV, None, 30)
    assert code == 0 and o == b"".join(parts) and e == b"e" * 100000


# -- 2. exit status and close together (327c2b5) ----------------------------------------------------

TOGETHER = {
    "status-eof-close": [step(out(b"x\n")), step(status(7), EOF, CLOSE)],
    "status-close-no-eof": [step(out(b"x\n")), step(status(7), CLOSE)],
    "everything-in-one-step": [step(out(b"x\n"), err(b"e\n"), status(7), EOF, CLOSE)],
    # lands between the loop's status check and its connection-lost check, as in the 327c2b5 race
    "between-status-check-and-lost-check": [step(out(b"x\n"), err(b"e\n")),
                                            step(status(7), CLOSE, on_read=("closed", 2))],
    "right-after-the-drain": [step(out(b"x\n"), err(b"e\n")), step(status(7), EOF, CLOSE, on_read=("eof_received", 1))],
}


@pytest.mark.parametrize("script", TOGETHER.values(), ids=TOGETHER.keys())
def test_exit_status_and_close_together_is_an_ended_command(guest: Guest, t: SshTransport, script: list[Step]) -> None:
    steps = [Step(tuple(e if e[0] != "err" else err(b"e\n") for e in s.events), s.on_read) for s in script]
    has_err = any(e[0] == "err" for s in steps for e in s.events)
    guest.command(*steps)
    r = t.run(ARGV, timeout=30)
    assert (r.exit_status, r.stdout, r.stderr) == (7, "x\n", "e\n" if has_err else "")
    guest.ok()
    assert t.run(["true"], timeout=30).ok  # the session is still held: no reconnect
    assert len(guest.clients) == 1


# -- 3. a channel that closes without an exit status -------------------------------------------------

NO_STATUS = {
    "close-after-eof": [step(out(b"partial\n")), step(EOF), step(CLOSE)],
    "close-without-eof": [step(out(b"partial\n"), err(b"dying\n")), step(CLOSE)],
    "connection-dropped": [step(out(b"partial\n")), step(DROP)],
}


@pytest.mark.parametrize("script", NO_STATUS.values(), ids=NO_STATUS.keys())
def test_a_channel_closed_without_exit_status_never_hangs_and_is_never_success(guest: Guest, t: SshTransport,
                                                                               script: list[Step]) -> None:
    guest.command(*script)
    start = guest.clock.now
    try:
        r = t.run(ARGV, timeout=30)
    except TransportError as e:
        assert_names_command(e)
    else:
        assert r.exit_status != 0 and not r.ok
    assert guest.clock.now - start < 1.0  # ended when the close came, not at the deadline


@pytest.mark.parametrize("script", NO_STATUS.values(), ids=NO_STATUS.keys())
def test_a_channel_closed_without_exit_status_is_an_error_naming_the_command(guest: Guest, t: SshTransport,
                                                                             script: list[Step]) -> None:
    guest.command(*script)
    with pytest.raises(TransportError) as ei:
        t.run(ARGV, timeout=30)
    assert_names_command(ei.value)
    assert not isinstance(ei.value, CommandTimeout)


def test_transport_inactive_before_the_channel_is_unlinked_is_connection_lost(guest: Guest, t: SshTransport) -> None:
    chan = guest.command(step(out(b"partial\n")), step(INACTIVE))
    start = guest.clock.now
    with pytest.raises(ConnectError, match="connection lost while running a command") as ei:
        t.run(ARGV, timeout=30)
    assert_names_command(ei.value)
    assert chan.closed_by_us and guest.clock.now - start < 1.0
    guest.ok()
    assert t.run(["true"], timeout=30).ok and len(guest.clients) == 2  # the next command reconnects


# -- 4. the held session dies between two runs ------------------------------------------------------


def test_a_held_session_that_went_inactive_is_replaced_by_a_new_connection(guest: Guest, t: SshTransport) -> None:
    first = guest.ok(b"first\n")
    assert t.run(ARGV, timeout=30).stdout == "first\n"
    assert len(guest.clients) == 1 and first.transport is guest.clients[0].transport
    guest.clients[0].transport.active = False  # type: ignore[union-attr]  # e.g. the guest rebooted between the phases
    second = guest.ok(b"second\n")
    r = t.run(ARGV, timeout=30)
    assert (r.exit_status, r.stdout) == (0, "second\n")
    assert len(guest.clients) == 2 and second.transport is guest.clients[1].transport
    assert guest.clients[1].transport.keepalive == 15  # type: ignore[union-attr]


def test_a_held_session_is_reused_while_it_is_alive(guest: Guest, t: SshTransport) -> None:
    guest.ok()
    guest.ok()
    t.connect(10)
    t.run(ARGV, timeout=30)
    t.run(ARGV, timeout=30)
    assert len(guest.clients) == 1 and len(guest.clients[0].transport.channels) == 2  # type: ignore[union-attr]


DEAD_BUT_ACTIVE = {
    "open_session-SSHException": ("open", paramiko.SSHException("SSH session not active")),
    "open_session-EOFError": ("open", EOFError()),
    "open_session-OSError": ("open", ConnectionResetError(104, "Connection reset by peer")),
    "exec_command-SSHException": ("exec", paramiko.SSHException("Channel closed.")),
    "exec_command-EOFError": ("exec", EOFError()),
}


@pytest.mark.parametrize(("where", "exc"), DEAD_BUT_ACTIVE.values(), ids=DEAD_BUT_ACTIVE.keys())
def test_a_held_session_that_fails_on_use_is_a_connect_error_and_the_next_run_reconnects(
        guest: Guest, t: SshTransport, where: str, exc: BaseException) -> None:
    guest.ok()
    t.run(ARGV, timeout=30)
    old = guest.clients[0]
    assert old.transport is not None
    if where == "open":
        old.transport.open_error = exc  # the transport still says active: it has not noticed yet
    else:
        guest.command(exec_error=exc)
    with pytest.raises(ConnectError) as ei:
        t.run(ARGV, timeout=30)
    assert_names_command(ei.value)
    assert old.closed  # the broken session is dropped, not kept for the next command
    guest.ok(b"again\n")
    assert t.run(ARGV, timeout=30).stdout == "again\n"
    assert len(guest.clients) == 2


RECONNECT_FAILS = {
    "refused": ("tcp", ConnectionRefusedError(111, "Connection refused"), "Connection refused"),
    "tcp-timeout": ("tcp", TimeoutError("timed out"), "timed out"),
    "no-banner": ("ssh", paramiko.SSHException("Error reading SSH protocol banner"), "no SSH banner/handshake"),
    "eof-in-handshake": ("ssh", EOFError(), "no SSH banner/handshake"),
    "auth": ("ssh", paramiko.AuthenticationException("Authentication failed."), "authentication failed"),
}


@pytest.mark.parametrize(("layer", "exc", "text"), RECONNECT_FAILS.values(), ids=RECONNECT_FAILS.keys())
def test_when_the_reconnect_fails_it_is_a_connect_error_and_a_later_run_tries_again(
        guest: Guest, t: SshTransport, layer: str, exc: BaseException, text: str) -> None:
    guest.ok()
    t.run(ARGV, timeout=30)
    guest.clients[0].transport.active = False  # type: ignore[union-attr]
    (guest.tcp_failures if layer == "tcp" else guest.connect_failures).append(exc)
    with pytest.raises(ConnectError, match=text) as ei:
        t.run(ARGV, timeout=30)
    assert "ssh root@192.0.2.10:22" in str(ei.value)
    assert guest.clients[1].closed  # the half-made connection is closed
    assert guest.clients[1].transport is None and not guest.clients[0].transport.channels[1:]  # type: ignore[union-attr]  # nothing ran
    # the guest is back: the next attempt (the resident's retry) connects afresh and runs
    guest.ok(b"back\n")
    assert t.run(ARGV, timeout=30).stdout == "back\n"
    assert len(guest.clients) == 3


def test_close_after_a_failed_start_makes_the_next_attempt_reconnect(guest: Guest, t: SshTransport) -> None:
    """resident._start closes the transport after a failed start: the old session, even if it still
    looks alive, is not reused."""
    guest.command(step(err(b"compose: error\n"), status(1), EOF, CLOSE))
    assert t.run(ARGV, timeout=30).exit_status == 1
    t.close()
    t.close()  # twice is fine
    assert guest.clients[0].closed
    guest.ok()
    assert t.run(ARGV, timeout=30).ok and len(guest.clients) == 2


def test_connect_uses_the_configured_identity_only(guest: Guest, t: SshTransport) -> None:
    t.connect(3)
    kw = guest.clients[0].connect_kwargs
    assert kw["hostname"] == "192.0.2.10" and kw["username"] == "root" and kw["port"] == 22
    assert kw["look_for_keys"] is False and kw["allow_agent"] is False
    assert kw["timeout"] == 3 and kw["banner_timeout"] == 3 and kw["auth_timeout"] == 3  # min(timeout, connect_timeout)


# -- 5. timeouts ------------------------------------------------------------------------------------


def test_a_command_that_outlives_its_timeout_is_a_command_timeout_and_its_channel_is_closed(guest: Guest,
                                                                                            t: SshTransport) -> None:
    chan = guest.command(step(out(b"working\n"), err(b"still going\n")))  # then nothing, ever
    start = guest.clock.now
    with pytest.raises(CommandTimeout, match="no answer within 5.0 s") as ei:
        t.run(ARGV, timeout=5)
    assert_names_command(ei.value)
    assert ei.value.exit_status is None and "still going" in ei.value.stderr_tail
    assert chan.closed_by_us
    assert 5.0 <= guest.clock.now - start < 5.2  # at the deadline, not later


def test_a_command_whose_output_ended_but_no_status_came_times_out(guest: Guest, t: SshTransport) -> None:
    chan = guest.command(step(out(b"done?\n"), EOF))  # EOF, but neither exit-status nor close
    with pytest.raises(CommandTimeout) as ei:
        t.run(ARGV, timeout=2)
    assert_names_command(ei.value)
    assert chan.closed_by_us


def test_status_without_end_of_output_times_out_rather_than_spinning(guest: Guest, t: SshTransport) -> None:
    chan = guest.command(step(out(b"x"), status(0)))  # status, then the output never ends
    with pytest.raises(CommandTimeout):
        t.run(ARGV, timeout=2)
    assert chan.closed_by_us


def test_a_guest_that_stops_reading_stdin_is_a_command_timeout_and_its_channel_is_closed(guest: Guest,
                                                                                         t: SshTransport) -> None:
    chan = guest.command(step(status(0), EOF, CLOSE), send_stalls=10**6)
    with pytest.raises(CommandTimeout, match="guest stopped reading input") as ei:
        t.run(ARGV, timeout=3, stdin=b"x" * 1000)
    assert_names_command(ei.value)
    assert chan.closed_by_us and ("shutdown_write", None) not in chan.log


def test_a_channel_that_takes_no_more_input_is_a_connect_error(guest: Guest, t: SshTransport) -> None:
    chan = guest.command(step(status(0), EOF, CLOSE), send_zero=True)
    with pytest.raises(ConnectError, match="channel closed while sending input") as ei:
        t.run(ARGV, timeout=3, stdin=b"data")
    assert_names_command(ei.value)
    assert chan.closed_by_us


def test_no_time_left_is_a_timeout_before_any_connection(guest: Guest, t: SshTransport) -> None:
    with pytest.raises(CommandTimeout, match="no time left"):
        t.run(ARGV, timeout=0)
    assert not guest.clients


# -- 6. stdin -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "window", "stalls"),
                         [(5, 1 << 30, 0), (200_000, 1 << 30, 0), (200_000, 4096, 0), (100_000, 7000, 3)])
def test_stdin_is_sent_in_full_then_eof_before_reading(guest: Guest, t: SshTransport,
                                                       size: int, window: int, stalls: int) -> None:
    data = bytes(i % 251 for i in range(size))
    chan = guest.command(step(out(b"got it\n")), step(status(0), EOF, CLOSE), send_chunk=window, send_stalls=stalls)
    r = t.run(["sh", "-c", "cat > /tmp/x; echo got it", "sh"], timeout=30, stdin=data)
    assert r.ok and r.stdout == "got it\n"
    assert bytes(chan.sent) == data  # all of it, once, in order (a stalled send is retried, not duplicated)
    kinds = [k for k, _ in chan.log]
    assert kinds[0] == "exec"
    eof_at = kinds.index("shutdown_write")
    assert kinds.count("shutdown_write") == 1
    assert all(k in ("settimeout", "send", "send-stall") for k in kinds[1:eof_at])  # input first, then EOF ...
    assert not [k for k in kinds[:eof_at] if k in ("recv", "recv_stderr", "tick")]  # ... before any reading or waiting
    assert [v for k, v in chan.log if k == "settimeout"][-1] is None  # blocking mode restored after sending
    assert all(0 < v <= 0.5 for k, v in chan.log if k == "settimeout" and v is not None)  # each send bounded
    assert max(n for k, n in chan.log if k == "send") <= 32768


@pytest.mark.parametrize("stdin", [None, b""])
def test_without_stdin_the_command_still_gets_eof(guest: Guest, t: SshTransport, stdin: bytes | None) -> None:
    chan = guest.ok()
    assert t.run(["cat"], timeout=30, stdin=stdin).ok
    kinds = [k for k, _ in chan.log]
    assert kinds[:2] == ["exec", "shutdown_write"] and "send" not in kinds
