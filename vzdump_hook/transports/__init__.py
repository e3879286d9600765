"""Transports by name, imported lazily: every vzdump phase pays for what it imports."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import GuestConfig
    from .base import Transport

_REGISTRY = {
    "ssh": "vzdump_hook.transports.ssh:SshTransport",
    "pct": "vzdump_hook.transports.pct:PctTransport",
    "agent": "vzdump_hook.transports.agent:AgentTransport",
    "none": "vzdump_hook.transports.none:NoTransport",
}


def open_transport(guest: GuestConfig) -> Transport:
    """A Transport for `guest` (not yet connected: the first command connects)."""
    try:
        dotted = _REGISTRY[guest.transport]
    except KeyError:
        raise ConfigError([f"guests.{guest.vmid}.transport: unknown transport {guest.transport!r}"]) from None
    module, _, cls = dotted.partition(":")
    factory = getattr(importlib.import_module(module), cls)
    return factory.for_guest(guest)  # type: ignore[no-any-return]
