"""Exception hierarchy: one root carrying an exit code; only cli.py turns these into exit codes and text."""

from __future__ import annotations

from collections.abc import Sequence


class HookError(Exception):
    """Root of every error the hook raises on purpose."""

    exit_code = 1


class ConfigError(HookError):
    """The configuration is unreadable or invalid; `problems` lists every `key.path: message`."""

    exit_code = 2

    def __init__(self, problems: Sequence[str], source: str = "") -> None:
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        if len(self.problems) == 1:
            text = f"{where}{self.problems[0]}"
        else:
            text = f"{where}{len(self.problems)} problems\n" + "\n".join(f"  {p}" for p in self.problems)
        super().__init__(text)


class TransportError(HookError):
    """A command could not be run in the guest, or ran and failed.

    Carries what ran, its exit status (None when it never finished) and the tail of its stderr,
    so that the message tells the admin what ran and what it said.
    """

    def __init__(
        self,
        message: str,
        *,
        command: str = "",
        exit_status: int | None = None,
        stderr: str = "",
    ) -> None:
        self.command = command
        self.exit_status = exit_status
        self.stderr_tail = tail(stderr)
        parts = [message]
        if command:
            parts.append(f"command: {command}")
        if exit_status is not None:
            parts.append(f"exit status {exit_status}")
        if self.stderr_tail:
            parts.append(f"stderr: {self.stderr_tail}")
        super().__init__("; ".join(parts))


class ConnectError(TransportError):
    """The guest could not be reached (refused, timed out, authentication, host key)."""


class GuestFrozen(ConnectError):
    """The guest is frozen (an LXC container under the cgroup freezer): a command would block until it is thawed."""


class ConnectionLost(ConnectError):
    """The connection went away while a command ran: it may or may not have had its effect."""


class HostKeyError(ConnectError):
    """The guest's SSH host key is unknown or changed: refused, never auto-added."""


class CommandTimeout(TransportError):
    """A command did not finish within its timeout; the guest-side process may still run."""


class ControllerError(HookError):
    """The guest answered but its stacks or marker are not in the expected state."""


class MarkerError(ControllerError):
    """A marker read back from a guest is too large, not JSON, or not of the expected schema."""


def tail(text: str, lines: int = 3, limit: int = 400) -> str:
    """The last `lines` non-empty lines of `text`, joined with ' | ', at most `limit` characters."""
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()][-lines:]
    joined = " | ".join(kept)
    return joined if len(joined) <= limit else "..." + joined[-limit:]
