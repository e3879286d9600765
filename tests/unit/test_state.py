"""The host record of a guest (node/state.py): typed values in memory, plain values on disk."""

from __future__ import annotations

import json

import pytest

from vzdump_hook.node.state import GuestRecord, Status
from vzdump_hook.vzdump.phases import GuestType, Mode


def test_a_record_holds_the_guest_type_and_mode_as_enums_and_writes_their_values() -> None:
    rec = GuestRecord(101, GuestType.QEMU, Mode.STOP, {"stacks": ["db"]}, status=Status.QUIESCED)
    on_disk = json.loads(rec.to_json())
    assert (on_disk["vmtype"], on_disk["mode"], on_disk["status"]) == ("qemu", "stop", "quiesced")
    back = GuestRecord.from_json(rec.to_json())
    assert back == rec and back.vmtype is GuestType.QEMU and back.mode is Mode.STOP and back.status is Status.QUIESCED


def test_a_record_built_from_the_values_is_typed_and_an_unknown_value_is_refused() -> None:
    rec = GuestRecord(101, "lxc", "snapshot", {})  # type: ignore[arg-type]  # as read from an older record
    assert rec.vmtype is GuestType.LXC and rec.mode is Mode.SNAPSHOT
    with pytest.raises(ValueError):
        GuestRecord(101, "openvz", "snapshot", {})  # type: ignore[arg-type]
