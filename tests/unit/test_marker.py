"""marker.py: the JSON file in the guest. Written by us, read back as untrusted input."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from vzdump_hook.errors import MarkerError
from vzdump_hook.guest import marker
from vzdump_hook.guest.marker import MAX_SIZE, Marker, StackRecord
from vzdump_hook.node.job import JobId

from .fakes import container_id

JOB = JobId("pve1", "3f1c0b7e-boot", 4242, 987654)


def rec(name: str, n: int = 1, stopped: bool = True, compose: tuple[str, ...] = ("docker", "compose")) -> StackRecord:
    return StackRecord(
        name,
        compose,
        f"/srv/{name}",
        (f"/srv/{name}/compose.yaml", f"/srv/{name}/compose.override.yaml"),
        tuple(container_id(name, i) for i in range(n)),
        stopped,
    )


def make(stacks: tuple[StackRecord, ...] = (rec("db", 2), rec("web")), state: str = "stopped", **kw: Any) -> Marker:
    args: dict[str, Any] = dict(job=JOB, vmid=101, vmtype="qemu", mode="snapshot", written_at=1700000000.125,
                                deadline=1700000600.5, state=state, stacks=stacks)
    args.update(kw)
    return Marker(**args)


def doc(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = json.loads(make().to_json())
    d.update(over)
    return d


def stack_doc(**over: Any) -> dict[str, Any]:
    s = rec("db").to_dict()
    s.update(over)
    return s


def parse_obj(d: Any) -> Marker:
    return marker.parse(json.dumps(d).encode())


def with_stack(**over: Any) -> Marker:
    return parse_obj(doc(stacks=[stack_doc(**over)]))


# -- round trip and layout ---------------------------------------------------------------------


def test_round_trip() -> None:
    m = make()
    assert marker.parse(m.to_json()) == m


def test_round_trip_without_stacks() -> None:
    m = make(stacks=(), state="stopping")
    assert marker.parse(m.to_json()) == m


def test_round_trip_compose_v1_and_unicode_paths() -> None:
    s = StackRecord("app", ("docker-compose",), "/srv/Ünïcode dir", ("/srv/Ünïcode dir/docker-compose.yml",), (), True)
    m = make(stacks=(s,))
    assert marker.parse(m.to_json()) == m


def test_times_are_rounded_to_milliseconds() -> None:
    m = make(written_at=1700000000.123456, deadline=1700000600.987654)
    back = marker.parse(m.to_json())
    assert back.written_at == 1700000000.123 and back.deadline == 1700000600.988


def test_one_stack_per_line() -> None:
    """The guest-side recovery (POSIX sh, no JSON parser) reads stacks by lines."""
    stacks = (rec("db", 2), rec("web"),
              StackRecord("odd", ("docker", "compose"), '/srv/a\\b "q"', ("/srv/x.yaml",), (), True))
    text = make(stacks=stacks).to_json().decode()
    assert text.endswith("}\n")
    lines = text.splitlines()
    stack_lines = [ln for ln in lines if ln.lstrip().startswith('{"name"')]
    assert len(stack_lines) == 3
    for line, s in zip(stack_lines, stacks, strict=True):
        assert line.startswith("  {")
        obj = json.loads(line.strip().rstrip(","))
        assert obj == s.to_dict()
        assert obj["driver"] == "compose"
    # the head: one key per line, before the stacks
    start = lines.index(' "stacks": [')
    assert lines[0] == "{"
    for key in ("schema", "tool", "job", "vmid", "vmtype", "mode", "written_at", "deadline", "state"):
        assert any(ln.startswith(f' "{key}": ') for ln in lines[1:start]), key
    assert lines[start + 1 : start + 4] == stack_lines
    assert lines[start + 4 :] == [" ]", "}"]
    head = json.loads(text)
    assert head["schema"] == marker.SCHEMA == 1 and head["tool"] == "vzdump-hook"
    assert head["job"] == {"node": "pve1", "boot": "3f1c0b7e-boot", "pid": 4242, "start": 987654}


def test_newline_in_a_path_does_not_break_the_line_layout() -> None:
    s = StackRecord("db", ("docker", "compose"), "/srv/db", ("/srv/db/a.yaml",), (), True)
    text = make(stacks=(s, rec("web"))).to_json().decode()
    assert sum(1 for ln in text.splitlines() if '"name"' in ln) == 2


def test_stopped_stacks_and_expired() -> None:
    m = make(stacks=(rec("a", stopped=False), rec("b"), rec("c")))
    assert [s.name for s in m.stopped_stacks()] == ["b", "c"]
    assert make(deadline=time.time() - 1).expired
    assert not make(deadline=time.time() + 60).expired


def test_record_to_dict() -> None:
    s = rec("db", 1)
    assert s.to_dict() == {
        "name": "db",
        "driver": "compose",
        "compose": ["docker", "compose"],
        "workdir": "/srv/db",
        "files": ["/srv/db/compose.yaml", "/srv/db/compose.override.yaml"],
        "containers": [container_id("db", 0)],
        "stopped": True,
        "services": [],
    }


# -- size --------------------------------------------------------------------------------------


def test_size_limit() -> None:
    data = make().to_json()
    padded = data[:-2] + b" " * (MAX_SIZE - len(data)) + data[-2:]
    assert len(padded) == MAX_SIZE
    assert marker.parse(padded) == make()
    with pytest.raises(MarkerError, match=f"larger than {MAX_SIZE} bytes"):
        marker.parse(padded + b" ")


def test_max_size_is_64k() -> None:
    assert MAX_SIZE == 64 * 1024


# -- not JSON / not the schema ------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"{", b"not json", b"\xff\xfe{}", b'{"schema": 1,}', b"\x00" * 10])
def test_not_json(data: bytes) -> None:
    with pytest.raises(MarkerError, match="not JSON|not ASCII"):
        marker.parse(data)


@pytest.mark.parametrize("data", [b"[]", b"1", b'"x"', b"null"])
def test_not_an_object(data: bytes) -> None:
    with pytest.raises(MarkerError, match="not a JSON object"):
        marker.parse(data)


@pytest.mark.parametrize("schema", [None, 0, 2, "1", 1.5])
def test_wrong_schema(schema: Any) -> None:
    d = doc(schema=schema)
    if schema is None:
        del d["schema"]
    with pytest.raises(MarkerError, match="schema"):
        parse_obj(d)


@pytest.mark.parametrize("key", ["job", "vmid", "vmtype", "mode", "written_at", "deadline", "state", "stacks"])
def test_missing_top_level_key(key: str) -> None:
    d = doc()
    del d[key]
    with pytest.raises(MarkerError, match=f"{key}|job must"):
        parse_obj(d)


@pytest.mark.parametrize(
    ("key", "value"),
    [("vmid", "101"), ("vmid", True), ("vmid", 1.5), ("vmtype", 1), ("mode", None), ("written_at", "now"),
     ("deadline", False), ("stacks", {}), ("job", [])],
)
def test_wrong_types(key: str, value: Any) -> None:
    with pytest.raises(MarkerError, match="wrong type"):
        parse_obj(doc(**{key: value}))


@pytest.mark.parametrize(
    "job",
    [{}, {"node": "n", "boot": "b", "pid": 1}, {"node": "n", "boot": "b", "pid": "x", "start": 1},
     {"node": "n", "boot": "b", "pid": None, "start": 1}],
)
def test_bad_job(job: dict[str, Any]) -> None:
    with pytest.raises(MarkerError, match=r"job\.(node|boot|pid|start) (missing|has the wrong type)"):
        parse_obj(doc(job=job))


@pytest.mark.parametrize("state", ["stopping", "stopped"])
def test_state_values(state: str) -> None:
    assert parse_obj(doc(state=state)).state == state


@pytest.mark.parametrize("state", ["", "running", "STOPPED", "x" * 1000])
def test_unknown_state(state: str) -> None:
    with pytest.raises(MarkerError, match="state") as ei:
        parse_obj(doc(state=state))
    assert len(str(ei.value)) < 100  # untrusted text is cut


@pytest.mark.parametrize("state", [1, None, True])
def test_state_must_be_a_string(state: Any) -> None:
    with pytest.raises(MarkerError):
        parse_obj(doc(state=state))


def test_too_many_stacks() -> None:
    s = stack_doc(containers=[])
    assert len(parse_obj(doc(stacks=[s] * 256)).stacks) == 256
    with pytest.raises(MarkerError, match="too many stacks"):
        parse_obj(doc(stacks=[s] * 257))


# -- stacks: untrusted names, commands, paths, ids ----------------------------------------------


def test_stack_not_an_object() -> None:
    with pytest.raises(MarkerError, match=r"stacks\[0\] is not an object"):
        parse_obj(doc(stacks=["db"]))


@pytest.mark.parametrize("key", ["name", "compose", "workdir", "files", "containers", "stopped"])
def test_stack_key_missing(key: str) -> None:
    s = stack_doc()
    del s[key]
    with pytest.raises(MarkerError, match=rf"stacks\[0\]\.{key} missing"):
        parse_obj(doc(stacks=[s]))


@pytest.mark.parametrize("name", ["", "Web", "-rf", "../../etc", "db;reboot", "db$(id)", "a b", "x" * 129, "_x"])
def test_bad_stack_names(name: str) -> None:
    with pytest.raises(MarkerError, match=r"stacks\[0\]\.name .* is not a compose project name") as ei:
        with_stack(name=name)
    assert len(str(ei.value)) < 120


def test_stack_name_not_a_string() -> None:
    with pytest.raises(MarkerError, match="wrong type"):
        with_stack(name=["db"])


@pytest.mark.parametrize(
    "compose",
    [["rm", "-rf", "/"], ["docker"], ["docker", "compose", "-f", "/tmp/evil.yaml"], ["sh", "-c"], [],
     ["docker-compose", "down"], "docker compose"],
)
def test_bad_compose_commands(compose: Any) -> None:
    with pytest.raises(MarkerError, match=r"compose"):
        with_stack(compose=compose)


@pytest.mark.parametrize("compose", [["docker", "compose"], ["docker-compose"]])
def test_allowed_compose_commands(compose: list[str]) -> None:
    assert with_stack(compose=compose).stacks[0].compose == tuple(compose)


@pytest.mark.parametrize("workdir", ["", "srv/db", "./db", "~/db", "/srv/db\nrm -rf /", "/" + "x" * 4096])
def test_bad_workdir(workdir: str) -> None:
    with pytest.raises(MarkerError, match=r"stacks\[0\]\.workdir (must be an absolute path|has a control character)"):
        with_stack(workdir=workdir)


def test_workdir_not_a_string() -> None:
    with pytest.raises(MarkerError, match="workdir has the wrong type"):
        with_stack(workdir=None)


@pytest.mark.parametrize("files", ["/srv/db/compose.yaml", [""], ["/a\n/b"], [1], [None], ["/" + "x" * 4096]])
def test_bad_files(files: Any) -> None:
    with pytest.raises(MarkerError, match="files"):
        with_stack(files=files)


def test_files_may_be_empty() -> None:
    assert with_stack(files=[]).stacks[0].files == ()


@pytest.mark.parametrize(
    "containers",
    [
        ["abc"],  # too short
        ["A" * 64],  # uppercase
        ["g" * 64],  # not hex
        ["0" * 65],  # too long
        ["0" * 64 + "\n"],
        ["0" * 12 + ";reboot"],
        [123],
        "0" * 64,
        [None],
    ],
)
def test_bad_container_ids(containers: Any) -> None:
    with pytest.raises(MarkerError, match="containers"):
        with_stack(containers=containers)


@pytest.mark.parametrize("cid", ["0" * 12, "a" * 64, container_id("db", 3)])
def test_good_container_ids(cid: str) -> None:
    assert with_stack(containers=[cid]).stacks[0].containers == (cid,)


@pytest.mark.parametrize("stopped", ["yes", 1, None])
def test_stopped_must_be_a_bool(stopped: Any) -> None:
    with pytest.raises(MarkerError, match="stopped has the wrong type"):
        with_stack(stopped=stopped)


def test_error_names_the_stack_index() -> None:
    with pytest.raises(MarkerError, match=r"stacks\[1\]\.workdir"):
        parse_obj(doc(stacks=[stack_doc(), stack_doc(name="web", workdir="rel")]))


def test_unknown_extra_keys_are_ignored() -> None:
    """A newer writer may add keys; the stack is still usable."""
    d = doc(note="hi")
    d["stacks"][0]["health"] = "ok"
    assert parse_obj(d).stacks[0].name == "db"


# -- untrusted input must never raise anything but MarkerError -----------------------------------


def test_deeply_nested_json_is_a_marker_error() -> None:
    with pytest.raises(MarkerError):
        marker.parse(b"[" * 30000 + b"]" * 30000)  # 60000 bytes: within the size limit


def test_infinite_job_start_is_a_marker_error() -> None:
    with pytest.raises(MarkerError):
        marker.parse(json.dumps(doc(job={"node": "n", "boot": "b", "pid": 1, "start": 1e999}))
                     .replace("Infinity", "1e999").encode())


def test_services_round_trip_and_are_checked() -> None:
    s = StackRecord("db", ("docker", "compose"), "/srv/db", (), (container_id("db", 0),), True,
                    ("postgres", "pgbouncer"))
    m = make(stacks=(s,))
    assert marker.parse(m.to_json()).stacks[0].services == ("postgres", "pgbouncer")
    d = json.loads(m.to_json())
    d["stacks"][0]["services"] = ["ok", "$(reboot)"]
    with pytest.raises(MarkerError, match="services must be compose service names"):
        marker.parse(json.dumps(d).encode())


def test_lone_surrogate_escape_is_a_marker_error() -> None:
    d = json.loads(make().to_json())
    d["stacks"][0]["workdir"] = "/srv/\ud800x"
    with pytest.raises(MarkerError, match="not JSON"):
        marker.parse(json.dumps(d).encode())


# -- hostile markers (issue 9): always a MarkerError naming the field, never another exception ------


@pytest.mark.parametrize(("path", "value", "field"), [
    ("services", 5, "stacks[0].services"),
    ("services", None, "stacks[0].services"),
    ("services", True, "stacks[0].services"),
    ("services", "app", "stacks[0].services"),
    ("files", "/srv/db/compose.yaml", "stacks[0].files"),
    ("containers", {"a": 1}, "stacks[0].containers"),
    ("compose", "docker", "stacks[0].compose"),
    ("workdir", "/srv/db\tx", "stacks[0].workdir"),
    ("files", ["/srv/db/\x1b[2Jc.yaml"], "stacks[0].files"),
])
def test_hostile_stack_fields_are_marker_errors_with_their_path(path: str, value: Any, field: str) -> None:
    with pytest.raises(MarkerError) as ei:
        with_stack(**{path: value})
    assert field in str(ei.value)


@pytest.mark.parametrize(("key", "value"), [
    ("written_at", 10**400),
    ("deadline", 10**400),
    ("deadline", -1),
    ("deadline", 1e11),
    ("vmid", 10**400),
    ("vmid", -101),
    ("schema", True),
    ("schema", 1.0),
    ("tool", "someone-else"),
    ("tool", 5),
    ("vmtype", 5),
])
def test_out_of_range_and_wrongly_typed_head_fields_are_marker_errors(key: str, value: Any) -> None:
    with pytest.raises(MarkerError) as ei:
        parse_obj(doc(**{key: value}))
    assert key in str(ei.value)


@pytest.mark.parametrize("word", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused(word: str) -> None:
    text = json.dumps(doc()).replace('"deadline": 1700000600.5', f'"deadline": {word}')
    assert word in text
    with pytest.raises(MarkerError, match="deadline|not JSON"):
        marker.parse(text.encode())


@pytest.mark.parametrize("start", [10**400, -1, 1.5, True])
def test_job_integers_are_bounded_and_strict(start: Any) -> None:
    with pytest.raises(MarkerError, match=r"job\.start"):
        parse_obj(doc(job={"node": "n", "boot": "b", "pid": 1, "start": start}))


def test_job_node_with_a_control_character_is_refused() -> None:
    with pytest.raises(MarkerError, match=r"job\.node"):
        parse_obj(doc(job={"node": "n\nvzdump-hook: all good", "boot": "b", "pid": 1, "start": 1}))


def test_duplicate_keys_are_refused() -> None:
    text = make().to_json().replace(b'"state": "stopped"', b'"state": "bogus", "state": "stopped"')
    with pytest.raises(MarkerError, match="duplicate key 'state'"):
        marker.parse(text)


def test_a_string_with_a_control_character_anywhere_is_refused() -> None:
    # the guest's parser refuses them anywhere (it reads by lines); so does this one
    with pytest.raises(MarkerError, match="control character"):
        parse_obj(doc(note="a\u0007b"))
