"""The controller kind's config table: how to reach the guest's own controller (docs/controller-api.md). A
command run in the guest over its transport (carrier A), or its HTTPS API (carrier B), verified by a CA
file or a pinned certificate fingerprint, with a bearer token read from a root-only file. Its record: the
job it was told to quiesce, in the node's records only (the controller keeps its own marker in the
guest, and the guest's marker never lists it). Its driver: stacks/controller.py."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

from . import Kind, KindTable, of_kind
from .checks import Problems, num, string, token_file_problem

if TYPE_CHECKING:
    from ..config import GuestConfig
    from ..guest.marker import StackFields, StackRecord
    from .table import StackSpec

# (patterns compiled on first use, by re)
_FINGERPRINT = r"[0-9A-Fa-f]{2}(:?[0-9A-Fa-f]{2}){31}"
# a controller command's words: no shell is involved, but the restricted wrapper matches them as words
_COMMAND_WORD = r"[A-Za-z0-9/-][A-Za-z0-9_./@:+=-]{0,255}"
KEYS = frozenset({"command", "url", "token_file", "ca_file", "fingerprint", "answer_within"})


@dataclass(frozen=True)
class Table(KindTable):
    kind: ClassVar[Kind] = Kind.CONTROLLER

    command: tuple[str, ...] = ()  # carrier A: the controller's command in the guest, e.g. ("vzdump-controller",)
    url: str = ""  # carrier B: https://HOST:PORT
    token_file: str = ""
    ca_file: str = ""
    fingerprint: str = ""  # SHA-256 of the certificate (DER), 64 hex digits
    answer_within: float | None = None  # bound for the answer to quiesce; None: the stack's stop timeout + 30 s

    @property
    def in_guest(self) -> bool:
        return bool(self.command)


ControllerSpec = Table  # the name the driver knows it by (stacks/controller.py)


def validate(path: str, item: Mapping[str, Any]) -> Table:
    """The carrier: `command` (run in the guest) or `url` (HTTPS, with token_file and ca_file or fingerprint)."""
    p = Problems()
    if ("command" in item) == ("url" in item):
        p.add(path, 'give either command (the controller\'s command in the guest, e.g. ["vzdump-controller"]) '
              "or url (its HTTPS API), not both")
        p.raise_any()
    vals: dict[str, Any] = {}
    if "answer_within" in item:
        vals["answer_within"] = num(p, f"{path}.answer_within", item["answer_within"], lo=1, hi=3600)
    if "command" in item:
        _command(p, path, item, vals)
    else:
        _url(p, path, item, vals)
    p.raise_any()
    return Table(**vals)


def _command(p: Problems, path: str, item: Mapping[str, Any], vals: dict[str, Any]) -> None:
    cmd = item["command"]
    if (not isinstance(cmd, list) or not 1 <= len(cmd) <= 8
            or not all(isinstance(w, str) and re.fullmatch(_COMMAND_WORD, w) for w in cmd) or cmd[0].startswith("-")):
        p.add(f"{path}.command", "must be a list of 1-8 words (letters, digits, '_./@:+=-'), the controller's command "
              f'without its arguments, e.g. ["vzdump-controller"] (got {cmd!r})')
    else:
        vals["command"] = tuple(cmd)
    for key in ("token_file", "ca_file", "fingerprint"):
        if key in item:
            p.add(f"{path}.{key}", "only for a controller reached by url")


def _url(p: Problems, path: str, item: Mapping[str, Any], vals: dict[str, Any]) -> None:
    url = item["url"]
    if not isinstance(url, str) or not re.fullmatch(r"https://[A-Za-z0-9.:\[\]-]+(:[0-9]{1,5})?/?", url):
        p.add(f"{path}.url", "must be https://HOST[:PORT] (TLS is required; the API's paths /v1/... are added) "
              f"(got {url!r})")
    else:
        vals["url"] = url.rstrip("/")
    token = string(p, f"{path}.token_file", item["token_file"], absolute=True) if "token_file" in item else None
    if "token_file" not in item:
        p.add(f"{path}.token_file", "missing (the file holding the controller's API token, mode 0600)")
    vals["token_file"] = token or ""
    if ("ca_file" in item) == ("fingerprint" in item):
        p.add(path, "give either ca_file (the CA, or the self-signed certificate, that the controller's certificate is "
              "checked against) or fingerprint (its SHA-256, pinned)")
    elif "ca_file" in item:
        vals["ca_file"] = string(p, f"{path}.ca_file", item["ca_file"], absolute=True) or ""
    else:
        fp = item["fingerprint"]
        if not isinstance(fp, str) or not re.fullmatch(_FINGERPRINT, fp):
            p.add(f"{path}.fingerprint", "must be the certificate's SHA-256 fingerprint, 64 hex digits "
                  f"(colons allowed), as `openssl x509 -noout -fingerprint -sha256` prints it (got {fp!r})")
        else:
            vals["fingerprint"] = fp.replace(":", "").lower()


def check_list(path: str, specs: Sequence[StackSpec]) -> list[str]:
    return []


def check_guest(path: str, specs: Sequence[StackSpec], transport: str, check_files: bool) -> list[str]:
    """A command with transport "none"; a token file that is not root's alone (`check_files`); two commands."""
    out: list[str] = []
    i_of = {spec.name: i for i, spec in enumerate(specs)}
    mine = of_kind(specs, Table)
    for spec, c in mine:
        i = i_of[spec.name]
        if c.command and transport == "none":
            out.append(f"{path}[{i}].command: needs a transport into the guest (transport is none): "
                       "give the guest ssh, pct or agent, or reach the controller by url")
        if check_files and c.token_file and (problem := token_file_problem(c.token_file)):
            out.append(f"{path}[{i}].token_file: {problem}")
    commands = [i_of[spec.name] for spec, c in mine if c.command]
    if len(commands) > 1:
        out.append(f"{path}[{commands[1]}].command: one controller reached by a command per guest "
                   "(the guest's restricted-key wrapper passes one)")
    return out


def record_dict(rec: StackRecord) -> dict[str, Any]:
    return {"job": rec.job, "stopped": rec.stopped, "quiesced": rec.quiesced}


def record_fields(f: StackFields) -> dict[str, Any]:
    """Refused: the guest's marker never lists a controller."""
    raise f.unknown()


def with_current_ways(recorded: GuestConfig, current: GuestConfig | None) -> GuestConfig:
    """`recorded` (the settings a record kept) with each controller's way in (command, url, token file,
    CA file, pin, answer_within) taken from `current` (the config now) where it has a controller of the
    same name: a token or pin fixed since the job is the one used. Everything else stays as recorded."""
    if current is None or not recorded.has_controllers:
        return recorded
    now = {s.name: s for s, _ in of_kind(current.stacks or (), Table)}
    stacks = tuple(replace(s, table=now[s.name].table) if s.kind is Kind.CONTROLLER and s.name in now else s
                   for s in recorded.stacks or ())
    return replace(recorded, stacks=stacks)
