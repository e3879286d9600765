"""No way into the guest (`transport = "none"`): for a guest whose stacks are all controllers reached
over HTTPS (stacks/controller.py). There is no marker of the hook's in such a guest (the controller
keeps its own), so reading finds none; anything that would run a command in the guest is refused."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import ConnectError
from .base import Transport

if TYPE_CHECKING:
    from ..config import GuestConfig


class NoTransport(Transport):
    name = "none"

    @classmethod
    def for_guest(cls, guest: GuestConfig) -> NoTransport:
        return cls(f"guest {guest.vmid} (no transport: its controller is reached by url)")

    def _exec(self, argv: Sequence[str], stdin: bytes | None, timeout: float) -> tuple[int, bytes, bytes]:
        raise ConnectError(f"{self.target}: cannot run {argv[0] if argv else 'a command'} in it")

    def connect(self, timeout: float) -> None:
        """Nothing to connect: the controllers' carriers connect themselves."""

    def read_file(self, path: str, *, limit: int, timeout: float) -> bytes | None:
        return None  # the hook writes no marker into a guest it cannot reach

    def remove_file(self, path: str, *, timeout: float) -> None:
        """No marker to remove."""
