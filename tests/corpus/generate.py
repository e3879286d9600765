"""Writes the marker corpus (tests/corpus/markers/NAME.json) and its verdicts (tests/corpus/verdicts.json):
one marker file per case, each valid or refused for a stated reason, read by both parsers (the node's
marker.parse and the guest's awk parser in vzdump-hook-recover; tests/guest_sh/test_corpus.py).

Every marker is of guest 101 and lists one stack, "db" (/srv/db, /srv/db/compose.yaml, service app,
container fakedocker.cid("db", 0)), expired (written 1700000000, deadline 1700000600), unless the case
changes that. Run `python -m tests.corpus.generate` after adding a case; the files are committed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CID = hashlib.sha256(b"db/0").hexdigest()  # fakedocker.cid("db", 0)
STACK: dict[str, Any] = {"name": "db", "driver": "compose", "compose": ["docker", "compose"], "workdir": "/srv/db",
                         "files": ["/srv/db/compose.yaml"], "containers": [CID], "stopped": True, "services": ["app"]}
HEAD: dict[str, Any] = {"schema": 1, "tool": "vzdump-hook",
                        "job": {"node": "pve1", "boot": "0b5c3d1e-boot", "pid": 4242, "start": 987654},
                        "vmid": 101, "vmtype": "qemu", "mode": "snapshot", "written_at": 1700000000.125,
                        "deadline": 1700000600.5, "state": "stopped"}


def doc() -> dict[str, Any]:
    """A fresh (deep) copy of the valid marker document."""
    d: dict[str, Any] = json.loads(json.dumps({**HEAD, "stacks": [STACK]}))
    return d


def layout(d: dict[str, Any]) -> bytes:
    """As the hook writes it (marker.Marker.to_json): the head indented, one stack per line."""
    if not isinstance(d.get("stacks"), list):
        return json.dumps(d, indent=1).encode()
    head = {k: v for k, v in d.items() if k != "stacks"}
    body = json.dumps(head, indent=1)[:-2]
    stacks = ",\n".join("  " + json.dumps(s, separators=(", ", ": ")) for s in d["stacks"])
    return f'{body},\n "stacks": [\n{stacks}\n ]\n}}\n'.encode()


def with_(path: str, value: Any) -> bytes:
    d = doc()
    obj: Any = d
    keys = path.split(".")
    for k in keys[:-1]:
        obj = obj[int(k)] if isinstance(obj, list) else obj[k]
    if value is DELETE:
        del obj[keys[-1]]
    elif isinstance(obj, list):
        obj[int(keys[-1])] = value
    else:
        obj[keys[-1]] = value
    return layout(d)


DELETE = object()
RAW = layout(doc())
SYSTEMD_STACK: dict[str, Any] = {"name": "db", "driver": "systemd", "units": ["db.service"], "triggers": ["db.socket"],
                                 "stopped": True}


CONTAINER_STACK: dict[str, Any] = {"name": "db", "driver": "container", "engine": "docker", "names": ["db-app"],
                                   "containers": [CID], "stopped": True}


def with_stack(base: dict[str, Any], **over: Any) -> bytes:
    """The marker with its stack `base` (SYSTEMD_STACK, CONTAINER_STACK), keys replaced (DELETE: removed)."""
    d = doc()
    stack = {**base, **over}
    d["stacks"] = [{k: v for k, v in stack.items() if v is not DELETE}]
    return layout(d)


def systemd(**over: Any) -> bytes:
    return with_stack(SYSTEMD_STACK, **over)


def container(**over: Any) -> bytes:
    return with_stack(CONTAINER_STACK, **over)


def raw_number(key: bytes, text: bytes) -> bytes:
    """RAW with the number after `"key": ` replaced by `text`, verbatim."""
    head, _, rest = RAW.partition(b'"' + key + b'": ')
    return head + b'"' + key + b'": ' + text + rest[rest.index(b","):]


# name -> (bytes, None for valid or a regex both parsers' messages must match)
CASES: dict[str, tuple[bytes, str | None]] = {
    # valid: any JSON layout of a valid marker
    "valid-as-written": (RAW, None),
    "valid-compact": (json.dumps(doc(), separators=(",", ":")).encode(), None),
    "valid-one-line-per-key": (json.dumps(doc(), indent=4).encode(), None),
    "valid-keys-reordered": (json.dumps(dict(reversed(list(doc().items())))).encode(), None),
    "valid-escaped-slashes": (RAW.replace(b'"/srv/db"', b'"\\/srv\\/db"'), None),
    "valid-unknown-keys": (with_("extra", {"nested": [1, 2, {"a": None}], "s": "x"}), None),
    "valid-no-tool": (with_("tool", DELETE), None),
    "valid-no-services": (with_("stacks.0.services", DELETE), None),
    "valid-crlf": (RAW.replace(b"\n", b"\r\n"), None),
    "valid-integer-times": (with_("deadline", 1700000600), None),
    "valid-exponent-time": (raw_number(b"deadline", b"1.7000006e9"), None),
    "valid-zero-time": (with_("written_at", 0), None),
    "valid-unicode-escape": (with_("vmtype", "q\u00e9mu"), None),
    "valid-v1": (with_("stacks.0.compose", ["docker-compose"]), None),
    # not JSON
    "empty": (b"", "empty|not JSON"),
    "not-json": (b"this is not json\n", "not JSON"),
    "truncated": (RAW[:-40], "not JSON|unterminated"),
    "trailing-garbage": (RAW + b"x", "not JSON"),
    "two-objects": (RAW + RAW, "not JSON"),
    "unterminated-string": (b'{"schema": 1, "tool": "vzdump-hook\n', "not JSON|unterminated"),
    "bad-escape": (RAW.replace(b'"/srv/db"', b'"/srv/\\xdb"'), "not JSON|escape"),
    "lone-surrogate": (RAW.replace(b'"/srv/db"', b'"/srv/\\ud800db"'), "not JSON|surrogate"),
    "nan": (raw_number(b"deadline", b"NaN"), "not JSON"),
    "infinity": (raw_number(b"deadline", b"Infinity"), "not JSON"),
    "minus-infinity": (raw_number(b"deadline", b"-Infinity"), "not JSON"),
    "leading-zero": (raw_number(b"vmid", b"0101"), "not JSON"),
    "bom": (b"\xef\xbb\xbf" + RAW, "not JSON|not ASCII"),
    "nul-byte": (RAW.replace(b'"qemu"', b'"qe\x00mu"'), "not JSON|NUL"),
    "raw-escape-character": (RAW.replace(b'"qemu"', b'"qe\x1bmu"'), "not JSON|control character"),
    "raw-utf8": (RAW.replace(b'"qemu"', "\"q\u00e9mu\"".encode()), "not ASCII"),
    "invalid-utf8": (RAW.replace(b'"qemu"', b'"q\xffmu"'), "not ASCII|not JSON"),
    "nested-deep": (b'{"x": ' + b"[" * 500 + b"]" * 500 + b"}", "nested too deeply|schema"),
    "too-large": (RAW.replace(b'"mode"', b'"pad": "' + b"x" * 70000 + b'", "mode"'), "larger than"),
    # the document
    "array": (b"[1, 2]", "not a JSON object"),
    "duplicate-key": (RAW.replace(b'"state": "stopped"', b'"state": "bogus", "state": "stopped"'), "duplicate key"),
    "duplicate-stacks": (RAW.replace(b'"state": "stopped"', b'"stacks": [], "state": "stopped"'), "duplicate key"),
    "duplicate-key-in-stack": (RAW.replace(b'"stopped": true', b'"stopped": true, "stopped": false'), "duplicate key"),
    "control-escape-in-unknown-key": (with_("note", "a\u001b[2Jb"), "control character"),
    "schema-2": (with_("schema", 2), "schema"),
    "schema-float": (with_("schema", 1.0), "schema"),
    "schema-exponent": (raw_number(b"schema", b"1e0"), "schema"),
    "schema-true": (with_("schema", True), "schema"),
    "schema-string": (with_("schema", "1"), "schema"),
    "no-schema": (with_("schema", DELETE), "schema"),
    "tool-foreign": (with_("tool", "someone-else"), "not (written by )?vzdump-hook"),
    "tool-int": (with_("tool", 5), "tool"),
    "no-job": (with_("job", DELETE), "job"),
    "job-not-object": (with_("job", "pve1"), "job"),
    "job-pid-string": (with_("job.pid", "1"), r"job\.pid"),
    "job-pid-negative": (with_("job.pid", -1), r"job\.pid"),
    "job-start-huge": (with_("job.start", 10**20), r"job\.start"),
    "job-start-400-digits": (with_("job.start", 10**400), r"job\.start"),
    "job-start-float": (with_("job.start", 1.5), r"job\.start"),
    "job-node-int": (with_("job.node", 7), r"job\.node"),
    "job-node-newline": (with_("job.node", "pve1\nvzdump-hook: forged"), "control character"),
    "state-unknown": (with_("state", "running"), "state"),
    "no-state": (with_("state", DELETE), "state"),
    "vmid-float": (with_("vmid", 101.5), "vmid"),
    "vmid-bool": (with_("vmid", True), "vmid"),
    "vmid-huge": (with_("vmid", 10**20), "vmid"),
    "vmid-string": (with_("vmid", "101"), "vmid"),
    "vmtype-int": (with_("vmtype", 5), "vmtype"),
    "deadline-string": (with_("deadline", "soon"), "deadline"),
    "deadline-1e300": (with_("deadline", 1e300), "deadline"),
    "deadline-1e11": (with_("deadline", 1e11), "deadline"),
    "deadline-400-digits": (raw_number(b"deadline", b"9" * 400), "deadline|not JSON"),
    "deadline-negative": (with_("deadline", -1), "deadline"),
    "deadline-null": (with_("deadline", None), "deadline"),
    "written-at-huge-exponent": (raw_number(b"written_at", b"1e99999"), "written_at"),
    "stacks-object": (with_("stacks", {"db": 1}), "stacks"),
    "stacks-missing": (with_("stacks", DELETE), "stacks"),
    "too-many-stacks": (with_("stacks", [dict(STACK)] * 257), "too many stacks"),
    "stack-not-object": (with_("stacks", ["db"]), r"stacks\[0\]"),
    # a stack
    "name-semicolon": (with_("stacks.0.name", "db;rm -rf /"), r"stacks\[0\]\.name"),
    "name-dollar": (with_("stacks.0.name", "$(reboot)"), r"stacks\[0\]\.name"),
    "name-backtick": (with_("stacks.0.name", "`reboot`"), r"stacks\[0\]\.name"),
    "name-upper": (with_("stacks.0.name", "DB"), r"stacks\[0\]\.name"),
    "name-dash-first": (with_("stacks.0.name", "-db"), r"stacks\[0\]\.name"),
    "name-int": (with_("stacks.0.name", 5), r"stacks\[0\]\.name"),
    "name-missing": (with_("stacks.0.name", DELETE), r"stacks\[0\]\.name"),
    "compose-sh": (with_("stacks.0.compose", ["sh", "-c"]), r"stacks\[0\]\.compose"),
    "compose-string": (with_("stacks.0.compose", "docker compose"), r"stacks\[0\]\.compose"),
    "compose-extra-word": (with_("stacks.0.compose", ["docker", "compose", "--env-file"]), r"stacks\[0\]\.compose"),
    "workdir-relative": (with_("stacks.0.workdir", "srv/db"), r"stacks\[0\]\.workdir"),
    "workdir-tab": (with_("stacks.0.workdir", "/srv/db\tx"), r"stacks\[0\]\.workdir|control character"),
    "workdir-list": (with_("stacks.0.workdir", ["/srv/db"]), r"stacks\[0\]\.workdir"),
    "files-string": (with_("stacks.0.files", "/srv/db/compose.yaml"), r"stacks\[0\]\.files"),
    "files-empty-path": (with_("stacks.0.files", [""]), r"stacks\[0\]\.files"),
    "files-int-item": (with_("stacks.0.files", [5]), r"stacks\[0\]\.files"),
    "containers-object": (with_("stacks.0.containers", {"a": 1}), r"stacks\[0\]\.containers"),
    "container-not-hex": (with_("stacks.0.containers", ["$(reboot)aaaaaaaaaa"]), r"stacks\[0\]\.containers"),
    "container-short": (with_("stacks.0.containers", ["abc"]), r"stacks\[0\]\.containers"),
    "container-long": (with_("stacks.0.containers", ["a" * 65]), r"stacks\[0\]\.containers"),
    "container-upper": (with_("stacks.0.containers", ["A" * 64]), r"stacks\[0\]\.containers"),
    "container-option": (with_("stacks.0.containers", ["--privileged"]), r"stacks\[0\]\.containers"),
    "stopped-missing": (with_("stacks.0.stopped", DELETE), r"stacks\[0\]\.stopped"),
    "stopped-int": (with_("stacks.0.stopped", 1), r"stacks\[0\]\.stopped"),
    "services-string": (with_("stacks.0.services", "app"), r"stacks\[0\]\.services"),
    "services-int": (with_("stacks.0.services", 5), r"stacks\[0\]\.services"),
    "services-null": (with_("stacks.0.services", None), r"stacks\[0\]\.services"),
    "services-true": (with_("stacks.0.services", True), r"stacks\[0\]\.services"),
    "service-space": (with_("stacks.0.services", ["app worker"]), r"stacks\[0\]\.services"),
    "service-dash-first": (with_("stacks.0.services", ["-rm"]), r"stacks\[0\]\.services"),
    "service-too-long": (with_("stacks.0.services", ["a" * 129]), r"stacks\[0\]\.services"),
    # the stack's kind (driver): compose when missing, else compose, systemd or container
    "driver-int": (with_("stacks.0.driver", 1), r"stacks\[0\]\.driver"),
    "driver-unknown": (with_("stacks.0.driver", "podman"), r"stacks\[0\]\.driver"),
    "driver-systemd-with-compose-keys": (with_("stacks.0.driver", "systemd"), r"stacks\[0\]\.units"),
    "unit-no-suffix": (systemd(units=["postgresql"]), r"stacks\[0\]\.units"),
    "unit-socket": (systemd(units=["postgresql.socket"]), r"stacks\[0\]\.units"),
    "unit-option": (systemd(units=["--now.service"]), r"stacks\[0\]\.units"),
    "unit-glob": (systemd(units=["post*.service"]), r"stacks\[0\]\.units"),
    "unit-escape": (systemd(units=["a\\x2d.service"]), r"stacks\[0\]\.units"),
    "unit-space": (systemd(units=["a b.service"]), r"stacks\[0\]\.units"),
    "unit-too-long": (systemd(units=["a" * 242 + ".service"]), r"stacks\[0\]\.units"),
    "units-empty": (systemd(units=[]), r"stacks\[0\]\.units"),
    "units-too-many": (systemd(units=[f"u{i}.service" for i in range(33)]), r"stacks\[0\]\.units"),
    "units-string": (systemd(units="db.service"), r"stacks\[0\]\.units"),
    "triggers-missing": (systemd(triggers=DELETE), r"stacks\[0\]\.triggers"),
    "trigger-service": (systemd(triggers=["db.service"]), r"stacks\[0\]\.triggers"),
    "trigger-path": (systemd(triggers=["db.path"]), r"stacks\[0\]\.triggers"),
    "trigger-timer-too-long": (systemd(triggers=["t" * 242 + ".timer"]), r"stacks\[0\]\.triggers"),
    "triggers-too-many": (systemd(triggers=[f"t{i}.timer" for i in range(65)]), r"stacks\[0\]\.triggers"),
    "systemd-stopped-missing": (systemd(stopped=DELETE), r"stacks\[0\]\.stopped"),
    "user-int": (systemd(user=1000), r"stacks\[0\]\.user"),
    "user-root": (systemd(user="root"), r"stacks\[0\]\.user"),
    "user-upper": (systemd(user="Alice"), r"stacks\[0\]\.user"),
    "user-option": (systemd(user="-alice"), r"stacks\[0\]\.user"),
    "user-space": (systemd(user="al ice"), r"stacks\[0\]\.user"),
    "user-too-long": (systemd(user="a" * 33), r"stacks\[0\]\.user"),
    # kind container: the engine, and the containers that ran (names and full ids, one id per name)
    "ctr-engine-missing": (container(engine=DELETE), r"stacks\[0\]\.engine"),
    "ctr-engine-unknown": (container(engine="lxc"), r"stacks\[0\]\.engine"),
    "ctr-engine-int": (container(engine=1), r"stacks\[0\]\.engine"),
    "ctr-engine-argv": (container(engine=["docker"]), r"stacks\[0\]\.engine"),
    "ctr-names-missing": (container(names=DELETE), r"stacks\[0\]\.names"),
    "ctr-names-string": (container(names="db-app"), r"stacks\[0\]\.names"),
    "ctr-name-option": (container(names=["-rm"]), r"stacks\[0\]\.names"),
    "ctr-name-space": (container(names=["db app"]), r"stacks\[0\]\.names"),
    "ctr-name-semicolon": (container(names=["db;reboot"]), r"stacks\[0\]\.names"),
    "ctr-name-too-long": (container(names=["a" * 129]), r"stacks\[0\]\.names"),
    "ctr-ids-missing": (container(containers=DELETE), r"stacks\[0\]\.containers"),
    "ctr-id-short": (container(containers=[CID[:12]]), r"stacks\[0\]\.containers"),
    "ctr-id-upper": (container(containers=[CID.upper()]), r"stacks\[0\]\.containers"),
    "ctr-id-name": (container(containers=["db-app"]), r"stacks\[0\]\.containers"),
    "ctr-fewer-ids-than-names": (container(names=["db-app", "db-web"]), r"stacks\[0\]\.containers"),
    "ctr-empty": (container(names=[], containers=[]), r"stacks\[0\]\.containers"),
    "ctr-too-many": (container(names=[f"c{i}" for i in range(65)], containers=[f"{i:064x}" for i in range(65)]),
                     r"stacks\[0\]\.containers"),
    "ctr-stopped-missing": (container(stopped=DELETE), r"stacks\[0\]\.stopped"),
    "ctr-stopped-string": (container(stopped="true"), r"stacks\[0\]\.stopped"),
}


def main() -> None:
    out = HERE / "markers"
    out.mkdir(exist_ok=True)
    for old in out.glob("*.json"):
        old.unlink()
    verdicts = {}
    for name, (data, reason) in sorted(CASES.items()):
        (out / f"{name}.json").write_bytes(data)
        verdicts[name] = {"verdict": "valid"} if reason is None else {"verdict": "refused", "reason": reason}
    (HERE / "verdicts.json").write_text(json.dumps(verdicts, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
