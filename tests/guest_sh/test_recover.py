"""examples/guest/vzdump-hook-recover under dash and busybox sh, against real marker files written by
vzdump_hook.guest.marker (valid, expired, from before this boot, from a restored backup) and hand-made ones
(corrupt, hostile, foreign), with a stand-in docker that records every call."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest

from tests.guest_sh.conftest import RECOVER, Guest, no_changing_calls
from tests.guest_sh.fakedocker import cid
from vzdump_hook.errors import MarkerError
from vzdump_hook.guest import marker as markers
from vzdump_hook.guest.marker import Marker, StackRecord
from vzdump_hook.node.job import JobId

VMID = 101
JOB = JobId("pve1", "0b5c3d1e-boot", 4242, 987654)


def boot_time() -> float:
    with open("/proc/uptime") as f:
        return time.time() - float(f.read().split()[0])


def record(name: str, services: tuple[str, ...] = ("app",), workdir: str | None = None,
           files: tuple[str, ...] | None = None, compose: tuple[str, ...] = ("docker", "compose")) -> StackRecord:
    workdir = workdir or f"/srv/{name}"
    files = files if files is not None else (f"{workdir}/compose.yaml",)
    return StackRecord(name, compose, workdir, files, tuple(cid(name, i) for i in range(len(services))), True, services)


def marker_bytes(stacks: tuple[StackRecord, ...], *, deadline_in: float = 600, written_ago: float = 5,
                 state: str = "stopped", vmid: int = VMID) -> bytes:
    now = time.time()
    return Marker(JOB, vmid, "qemu", "snapshot", now - written_ago, now - written_ago + deadline_in, state,
                  stacks).to_json()


def put(g: Guest, data: bytes, mtime: float | None = None) -> None:
    g.marker.write_bytes(data)
    g.marker.chmod(0o600)
    if mtime is not None:
        os.utime(g.marker, (mtime, mtime))


def setup_stacks(g: Guest, *names: str, **knobs: Any) -> tuple[StackRecord, ...]:
    """Projects in the stand-in docker, stopped (as the hook left them); their records, stop order."""
    recs = []
    for n in names:
        g.docker.add_project(n, ("app", "worker"), running=False, **knobs.get(n, {}))
        recs.append(record(n, ("app", "worker")))
    return tuple(recs)


def compose_calls(g: Guest) -> list[tuple[list[str], str]]:
    return [(c["argv"], c["cwd"]) for c in g.docker.calls()
            if c["argv"][:2] == ["docker", "compose"] and "version" not in c["argv"]]


def recover(g: Guest, *args: str) -> tuple[int, str]:
    p = g.run(RECOVER, "--conf", str(g.conf), *args)
    return p.returncode, (p.stdout + p.stderr).decode()


@pytest.fixture(autouse=True)
def conf(guest: Guest) -> None:
    guest.write_conf(MARKER=str(guest.marker), VMID=str(VMID), DEADLINE_GRACE="0", WAIT_DOCKER="1")


# -- when it acts -----------------------------------------------------------------------------------


def test_no_marker_nothing_to_do(guest: Guest) -> None:
    code, out = recover(guest)
    assert code == 0 and "no marker" in out
    code, out = recover(guest, "--quiet")
    assert code == 0 and out == ""
    assert guest.docker.calls() == []


def test_marker_of_a_running_backup_is_left_alone(guest: Guest) -> None:
    recs = setup_stacks(guest, "db", "web")
    data = marker_bytes(recs, deadline_in=600)
    put(guest, data)  # written now, in this boot
    code, out = recover(guest)
    assert code == 0, out
    assert "the node is at work, nothing to do" in out and "lists web, db" in out
    assert guest.docker.calls() == []
    assert guest.marker.read_bytes() == data
    assert guest.docker.running() == {"db": False, "web": False}


def test_expired_marker_starts_exactly_the_listed_stacks_last_stopped_first(guest: Guest) -> None:
    recs = setup_stacks(guest, "db", "web")
    guest.docker.add_project("other", running=False)  # stopped before the backup: not ours to start
    put(guest, marker_bytes(recs, deadline_in=10, written_ago=20))
    code, out = recover(guest)
    assert code == 0, out
    assert "deadline passed" in out and "started web, db; marker removed" in out
    assert not guest.marker.exists()
    assert guest.docker.running() == {"db": True, "web": True, "other": False}
    calls = compose_calls(guest)
    assert [a for a, _ in calls] == [
        ["docker", "compose", "-p", "web", "-f", "/srv/web/compose.yaml", "start", "app", "worker"],
        ["docker", "compose", "-p", "db", "-f", "/srv/db/compose.yaml", "start", "app", "worker"],
    ]


def test_grace_delays_deadline_recovery(guest: Guest) -> None:
    recs = setup_stacks(guest, "db")
    put(guest, marker_bytes(recs, deadline_in=10, written_ago=20))
    guest.write_conf(MARKER=str(guest.marker), VMID=str(VMID), DEADLINE_GRACE="3600")
    code, out = recover(guest)
    assert code == 0 and "nothing to do" in out
    assert guest.marker.exists() and guest.docker.running() == {"db": False}


def test_marker_from_before_this_boot_is_acted_on_before_its_deadline(guest: Guest) -> None:
    # the node (or the guest) died mid-backup and the guest rebooted: the marker's file is older than
    # this boot, whatever its deadline says (the node's clock)
    recs = setup_stacks(guest, "db")
    put(guest, marker_bytes(recs, deadline_in=10**7), mtime=boot_time() - 600)
    code, out = recover(guest)
    assert code == 0, out
    assert "written before this boot" in out and not guest.marker.exists()
    assert guest.docker.running() == {"db": True}


def test_restored_backup_with_a_stopping_marker_and_an_edited_compose_file(guest: Guest) -> None:
    # a backup restored days later: the marker inside it says "stopping" (taken mid-quiesce), its
    # times are old, and compose can no longer load one project: its containers are started by id
    recs = setup_stacks(guest, "db", "web", web={"compose_broken": True})
    put(guest, marker_bytes(recs, deadline_in=600, written_ago=3 * 86400, state="stopping"),
        mtime=time.time() - 3 * 86400)
    code, out = recover(guest)
    assert code == 0, out
    assert guest.docker.running() == {"db": True, "web": True}
    assert not guest.marker.exists()
    starts = [a for a in guest.docker.argvs() if a[:2] == ["docker", "start"]]
    assert starts == [["docker", "start", cid("web", 0), cid("web", 1)]]


def test_check_says_what_it_would_do_and_changes_nothing(guest: Guest) -> None:
    recs = setup_stacks(guest, "db")
    data = marker_bytes(recs, deadline_in=1, written_ago=100)
    put(guest, data)
    code, out = recover(guest, "--check")
    assert code == 0 and "would start db and remove it" in out
    assert guest.docker.calls() == [] and guest.marker.read_bytes() == data


def test_force_acts_on_a_marker_whose_job_may_run(guest: Guest) -> None:
    recs = setup_stacks(guest, "db")
    put(guest, marker_bytes(recs))
    code, out = recover(guest, "--force")
    assert code == 0 and "forced" in out and not guest.marker.exists()


# -- partial failures ---------------------------------------------------------------------------------


def test_a_stack_that_does_not_start_keeps_the_marker_and_is_retried(guest: Guest) -> None:
    recs = setup_stacks(guest, "db", "web", db={"start_fails": True})
    data = marker_bytes(recs, deadline_in=1, written_ago=100)
    put(guest, data)
    code, out = recover(guest)
    assert code == 1, out
    assert "STILL DOWN: db (started: web)" in out
    assert guest.marker.read_bytes() == data  # never half-applied: the marker still lists both
    assert guest.docker.running() == {"db": False, "web": True}
    state = guest.docker.load()
    state["projects"]["db"]["start_fails"] = False
    guest.docker.save(state)
    code, out = recover(guest)
    assert code == 0, out
    assert not guest.marker.exists() and guest.docker.running() == {"db": True, "web": True}


def test_a_restart_loop_is_not_up(guest: Guest) -> None:
    recs = setup_stacks(guest, "db", db={"restart_loop": True})
    put(guest, marker_bytes(recs, deadline_in=1, written_ago=100))
    code, out = recover(guest)
    assert code == 1 and "db: not running after start" in out and guest.marker.exists()


def test_containers_recreated_since_the_stop_count_when_their_services_run(guest: Guest) -> None:
    guest.docker.add_project("db", ("app", "worker"), running=False)  # new containers (new ids) since
    old = StackRecord("db", ("docker", "compose"), "/srv/db", ("/srv/db/compose.yaml",),
                      (cid("old-db", 0), cid("old-db", 1)), True, ("app", "worker"))
    put(guest, marker_bytes((old,), deadline_in=1, written_ago=100))
    code, out = recover(guest)
    assert code == 0, out
    assert guest.docker.running() == {"db": True} and not guest.marker.exists()


def test_containers_removed_since_the_stop_are_still_down(guest: Guest) -> None:
    # `compose down` since: nothing of the project exists, compose has nothing to start
    guest.docker.add_project("db", (), running=False)
    data = marker_bytes((record("db", ("app",)),), deadline_in=1, written_ago=100)
    put(guest, data)
    code, out = recover(guest)
    assert code == 1 and "(no longer exists)" in out and "STILL DOWN: db" in out, out
    assert guest.marker.read_bytes() == data


def test_docker_not_answering_leaves_everything_for_the_next_run(guest: Guest) -> None:
    recs = setup_stacks(guest, "db")
    put(guest, marker_bytes(recs, deadline_in=1, written_ago=100))
    guest.docker.set(engine_down=True)
    code, out = recover(guest)
    assert code == 1 and "docker does not answer" in out and guest.marker.exists()


def test_a_marker_replaced_while_starting_is_not_removed(guest: Guest) -> None:
    new = marker_bytes((record("db"),), deadline_in=600).decode()
    recs = setup_stacks(guest, "db", db={"on_start_write": [str(guest.marker), new]})
    put(guest, marker_bytes(recs, deadline_in=1, written_ago=100))
    code, out = recover(guest)
    assert code == 0 and "changed meanwhile" in out
    assert guest.marker.read_text() == new


# -- what it reads ------------------------------------------------------------------------------------


def test_paths_and_names_are_used_literally(guest: Guest) -> None:
    odd = guest.root / "d b $(touch PWNED) `touch PWNED2` 'q' caf\u00e9"
    odd.mkdir()
    rec = StackRecord("db", ("docker-compose",), str(odd), (f"{odd}/x;y.yml", f"{odd}/*"), (cid("db", 0),), True,
                      ("app",))
    guest.docker.add_project("db", ("app",), workdir=str(odd), files=list(rec.files), running=False)
    put(guest, marker_bytes((rec,), deadline_in=1, written_ago=100))  # json.dumps escapes the é as \u00e9
    code, out = recover(guest)
    assert code == 0, out
    v1 = [c for c in guest.docker.calls() if c["argv"][0] == "docker-compose"]
    assert [c["argv"] for c in v1] == [["docker-compose", "-p", "db", "-f", f"{odd}/x;y.yml", "-f", f"{odd}/*",
                                        "start", "app"]]
    assert v1[0]["cwd"] == str(odd)
    assert not list(guest.root.rglob("PWNED*"))


def test_services_absent_means_all_of_the_project(guest: Guest) -> None:
    guest.docker.add_project("db", ("app",), running=False)
    d = json.loads(marker_bytes((record("db"),), deadline_in=1, written_ago=100))
    del d["stacks"][0]["services"]  # markers of older versions
    put(guest, json.dumps(d).encode())
    code, out = recover(guest)
    assert code == 0, out
    assert [a for a, _ in compose_calls(guest)] == [["docker", "compose", "-p", "db", "-f", "/srv/db/compose.yaml",
                                                     "start"]]


def _valid() -> dict[str, Any]:
    d: dict[str, Any] = json.loads(marker_bytes((record("db"),), deadline_in=1, written_ago=100))
    return d


def _with(path: str, value: Any) -> bytes:
    d = _valid()
    keys = path.split(".")
    obj: Any = d
    for k in keys[:-1]:
        obj = obj[int(k)] if isinstance(obj, list) else obj[k]
    last = keys[-1]
    if value is _DELETE:
        del obj[last]
    elif isinstance(obj, list):
        obj[int(last)] = value
    else:
        obj[last] = value
    return json.dumps(d).encode()


_DELETE = object()


def _raw_valid() -> bytes:
    return marker_bytes((record("db"),), deadline_in=1, written_ago=100)


CORRUPT: dict[str, bytes] = {
    "empty": b"",
    "not-json": b"this is not json\n",
    "truncated": _raw_valid()[:-40],
    "trailing-garbage": _raw_valid() + b"x",
    "two-objects": _raw_valid() + _raw_valid(),
    "array": b"[1, 2]",
    "schema-2": _with("schema", 2),
    "no-schema": _with("schema", _DELETE),
    "no-job": _with("job", _DELETE),
    "job-pid-string": _with("job.pid", "1"),
    "state-unknown": _with("state", "running"),
    "vmid-float": _with("vmid", 101.5),
    "vmid-bool": _with("vmid", True),
    "deadline-string": _with("deadline", "soon"),
    "stacks-object": _with("stacks", {"db": 1}),
    "stack-not-object": _with("stacks", ["db"]),
    "name-semicolon": _with("stacks.0.name", "db;rm -rf /"),
    "name-dollar": _with("stacks.0.name", "$(reboot)"),
    "name-backtick": _with("stacks.0.name", "`reboot`"),
    "name-newline": _with("stacks.0.name", "db\nstack evil"),
    "name-upper": _with("stacks.0.name", "DB"),
    "compose-sh": _with("stacks.0.compose", ["sh", "-c"]),
    "compose-string": _with("stacks.0.compose", "docker compose"),
    "workdir-relative": _with("stacks.0.workdir", "srv/db"),
    "workdir-newline": _with("stacks.0.workdir", "/srv/db\nstack evil"),
    "files-not-list": _with("stacks.0.files", "/srv/db/compose.yaml"),
    "file-empty": _with("stacks.0.files", [""]),
    "container-not-hex": _with("stacks.0.containers", ["$(reboot)aaaaaaaaaa"]),
    "container-short": _with("stacks.0.containers", ["abc"]),
    "container-upper": _with("stacks.0.containers", ["A" * 64]),
    "stopped-missing": _with("stacks.0.stopped", _DELETE),
    "service-space": _with("stacks.0.services", ["app worker"]),
    "service-dash-first": _with("stacks.0.services", ["-rm"]),
    "too-many-stacks": _with("stacks", [_valid()["stacks"][0]] * 257),
    "too-large": _raw_valid().replace(b'"mode"', b'"pad": "' + b"x" * 70000 + b'", "mode"'),
    "nested-deep": b'{"x": ' + b"[" * 500 + b"]" * 500 + b"}",
    "lone-surrogate": _raw_valid().replace(b'"/srv/db"', b'"/srv/\\ud800db"'),
    "bad-escape": _raw_valid().replace(b'"/srv/db"', b'"/srv/\\xdb"'),
    "unterminated-string": b'{"schema": 1, "tool": "vzdump-hook\n',
    "nul-byte": _raw_valid().replace(b'"qemu"', b'"qe\x00mu"'),
    # a later duplicate would replace what was checked before it: refused (issue 9)
    "duplicate-key": _raw_valid().replace(b'"state": "stopped"', b'"state": "bogus", "state": "stopped"'),
    "duplicate-stacks": _raw_valid().replace(b'"state": "stopped"', b'"stacks": [], "state": "stopped"'),
    "schema-float": _with("schema", 1.0),
    "schema-true": _with("schema", True),
    "deadline-1e300": _with("deadline", 1e300),
    "deadline-400-digits": _raw_valid().replace(b'"deadline": ', b'"deadline": ' + b"9" * 400 + b', "x": '),
    "vmid-huge": _with("vmid", 10**20),
    "services-string": _with("stacks.0.services", "app"),
    "services-null": _with("stacks.0.services", None),
}

# Python's json accepts a lone UTF-16 surrogate (the node would fail later, sending it); the sh reader
# refuses it, as it refuses any control character in a string.
STRICTER_THAN_THE_NODE = {"lone-surrogate"}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_unusable_marker_is_left_in_place_and_reported(case: str, guest: Guest) -> None:
    data = CORRUPT[case]
    guest.docker.add_project("db", ("app",), running=False)
    put(guest, data, mtime=boot_time() - 600)  # it would be acted on at once if it were valid
    code, out = recover(guest)
    assert code == 2, out
    assert "UNUSABLE marker" in out and "left in place, nothing started" in out
    assert guest.marker.read_bytes() == data
    assert guest.docker.calls() == []
    if case in STRICTER_THAN_THE_NODE:
        return
    with pytest.raises(MarkerError):  # (a control: the node refuses the same markers)
        markers.parse(data)


VALID_VARIANTS: dict[str, bytes] = {
    "as-written": _raw_valid(),
    "compact": json.dumps(_valid(), separators=(",", ":")).encode(),
    "one-line-per-key": json.dumps(_valid(), indent=4).encode(),
    "keys-reordered": json.dumps(dict(reversed(list(_valid().items())))).encode(),
    "escaped-slashes": _raw_valid().replace(b'"/srv/db"', b'"\\/srv\\/db"'),
    "unknown-keys": _with("extra", {"nested": [1, 2, {"a": None}]}),
    "no-tool": _with("tool", _DELETE),
    "crlf": _raw_valid().replace(b"\n", b"\r\n"),
}


@pytest.mark.parametrize("case", sorted(VALID_VARIANTS))
def test_any_valid_json_layout_is_read(case: str, guest: Guest) -> None:
    data = VALID_VARIANTS[case]
    markers.parse(data)  # (a control: the node reads it too)
    guest.docker.add_project("db", ("app",), running=False)
    put(guest, data)
    code, out = recover(guest)
    assert code == 0, out
    assert "started db; marker removed" in out
    assert [a for a, _ in compose_calls(guest)] == [["docker", "compose", "-p", "db", "-f", "/srv/db/compose.yaml",
                                                     "start", "app"]]


def test_foreign_tool_is_left_alone(guest: Guest) -> None:
    data = _with("tool", "someone-else")
    guest.docker.add_project("db", ("app",), running=False)
    put(guest, data, mtime=boot_time() - 600)
    code, out = recover(guest)
    assert code == 2 and 'FOREIGN marker' in out and "someone-else" in out
    assert guest.marker.read_bytes() == data and guest.docker.calls() == []


def test_marker_of_another_guest_is_left_alone(guest: Guest) -> None:
    guest.docker.add_project("db", ("app",), running=False)
    data = marker_bytes((record("db"),), deadline_in=1, written_ago=100, vmid=202)
    put(guest, data, mtime=boot_time() - 600)
    code, out = recover(guest)
    assert code == 2 and "for guest 202, this is guest 101" in out
    assert guest.marker.read_bytes() == data and no_changing_calls(guest.docker.argvs())
    # without VMID in the settings (a guest set up by hand) the marker is used
    guest.write_conf(MARKER=str(guest.marker), DEADLINE_GRACE="0")
    code, out = recover(guest)
    assert code == 0 and not guest.marker.exists()


def test_settings_errors(guest: Guest) -> None:
    guest.write_conf(MARKER="relative/marker.json")
    code, out = recover(guest)
    assert code == 2 and "MARKER must be an absolute path" in out
    code, out = recover(guest, "--bogus")
    assert code == 2 and "usage" in out


# -- what the node's key may write (issue 9): nothing the wrapper would refuse is started ----------------


def _unusable(g: Guest, data: bytes, why: str) -> None:
    put(g, data, mtime=boot_time() - 600)  # acted on at once if it were usable
    code, out = recover(g)
    assert code == 2 and "UNUSABLE marker" in out and why in out, out
    assert no_changing_calls(g.docker.argvs()), g.docker.argvs()
    assert g.marker.read_bytes() == data


def test_a_container_of_another_project_is_not_started(guest: Guest) -> None:
    # the wrapper refuses `docker start` of a container that is not of the project named
    guest.docker.add_project("db", ("app",), running=False)
    guest.docker.add_project("other", ("app",), running=False)
    foreign = cid("other", 0)
    rec = StackRecord("db", ("docker", "compose"), "/srv/db", ("/srv/db/compose.yaml",), (cid("db", 0), foreign), True,
                      ())
    _unusable(guest, marker_bytes((rec,), deadline_in=1, written_ago=100),
              f"container {foreign[:12]} is not one of that project")
    assert guest.docker.running() == {"db": False, "other": False}


@pytest.mark.parametrize(("workdir", "files"), [
    ("/tmp/evil", ("/srv/db/compose.yaml",)),
    ("/srv/db", ("/tmp/evil/compose.yaml",)),
    ("/srv/db", ("/srv/db/compose.yaml", "/tmp/evil/post-start.yaml")),
    ("/srv/db", ()),
])
def test_a_working_directory_or_compose_file_other_than_the_labels_is_refused(guest: Guest, workdir: str,
                                                                              files: tuple[str, ...]) -> None:
    # compose runs `post_start` hooks of the files it is given: only the project's own files are
    guest.docker.add_project("db", ("app",), running=False)
    rec = StackRecord("db", ("docker", "compose"), workdir, files, (cid("db", 0),), True, ("app",))
    _unusable(guest, marker_bytes((rec,), deadline_in=1, written_ago=100),
              "are not those docker's labels give for that project")


def test_a_compose_file_in_the_markers_directory_is_refused(guest: Guest) -> None:
    # the marker is JSON, hence YAML: the key that writes it must not be able to write a compose file
    mdir = str(guest.marker.parent)
    guest.docker.add_project("db", ("app",), running=False, workdir="/srv/db", files=[f"{mdir}/compose.yaml"])
    rec = StackRecord("db", ("docker", "compose"), "/srv/db", (f"{mdir}/compose.yaml",), (cid("db", 0),), True,
                      ("app",))
    _unusable(guest, marker_bytes((rec,), deadline_in=1, written_ago=100), "a compose file in the marker's directory")
    guest.docker.add_project("db", ("app",), running=False, workdir=mdir, files=[])
    rec = StackRecord("db", ("docker", "compose"), mdir, (), (cid("db", 0),), True, ("app",))
    _unusable(guest, marker_bytes((rec,), deadline_in=1, written_ago=100),
              "working directory in the marker's directory")


def _insecure_cases(g: Guest) -> dict[str, tuple[Any, str]]:
    def dir_mode() -> None:
        g.marker.parent.chmod(0o755)

    def file_mode() -> None:
        g.marker.chmod(0o644)

    def file_owner() -> None:
        os.chown(g.marker, 1000, 1000)

    def dir_owner() -> None:
        os.chown(g.marker.parent, 1000, 1000)

    def file_symlink() -> None:
        real = g.root / "elsewhere.json"
        real.write_bytes(g.marker.read_bytes())
        real.chmod(0o600)
        g.marker.unlink()
        g.marker.symlink_to(real)

    def dir_symlink() -> None:
        real = g.root / "realdir"
        g.marker.parent.rename(real)
        g.marker.parent.symlink_to(real)

    return {
        "dir-mode": (dir_mode, "its directory " + str(g.marker.parent) + " has mode 755"),
        "file-mode": (file_mode, "it has mode 644"),
        "file-owner": (file_owner, "it is owned by uid 1000"),
        "dir-owner": (dir_owner, "is owned by uid 1000"),
        "file-symlink": (file_symlink, "it is a symlink"),
        "dir-symlink": (dir_symlink, "is a symlink"),
    }


@pytest.mark.parametrize("case", ["dir-mode", "file-mode", "file-owner", "dir-owner", "file-symlink", "dir-symlink"])
def test_an_insecure_marker_is_refused_naming_the_problem(guest: Guest, case: str) -> None:
    recs = setup_stacks(guest, "db")
    data = marker_bytes(recs, deadline_in=1, written_ago=100)
    put(guest, data)
    change, why = _insecure_cases(guest)[case]
    change()
    code, out = recover(guest)
    assert code == 2 and "INSECURE" in out and why in out, out
    assert guest.docker.calls() == [] and guest.marker.read_bytes() == data


def test_marker_owner_setting_allows_the_ssh_user(guest: Guest) -> None:
    # a guest set up without root (examples/guest/README.md): the SSH user owns the marker
    recs = setup_stacks(guest, "db")
    put(guest, marker_bytes(recs, deadline_in=1, written_ago=100))
    os.chown(guest.marker.parent, 65534, 65534)
    os.chown(guest.marker, 65534, 65534)
    guest.write_conf(MARKER=str(guest.marker), VMID=str(VMID), DEADLINE_GRACE="0", MARKER_OWNER="nobody")
    code, out = recover(guest)
    assert code == 0 and not guest.marker.exists(), out


@pytest.mark.parametrize("setting", ["DEADLINE_GRACE", "WAIT_DOCKER", "VMID"])
def test_huge_numbers_in_the_settings_are_refused_before_arithmetic(guest: Guest, setting: str) -> None:
    values = {"MARKER": str(guest.marker), "VMID": str(VMID), "DEADLINE_GRACE": "0", "WAIT_DOCKER": "1"}
    values[setting] = "9" * 30
    guest.write_conf(**values)
    recs = setup_stacks(guest, "db")
    put(guest, marker_bytes(recs, deadline_in=1, written_ago=100))
    code, out = recover(guest)
    assert code == 2 and f"{setting} must be a number" in out, out
    assert guest.docker.calls() == []


def test_parsing_stops_at_the_first_duplicate_key(guest: Guest) -> None:
    # 16000 array items, then 5400 duplicate keys: 34.6 s with busybox awk when each duplicate
    # rescanned every value parsed (measured before the change). The parse must stop at the first
    # duplicate: what follows it is left unparsed, shown by a structural error after the duplicates
    # (tokens fine, brackets wrong) that a parser going on past the first duplicate would report.
    # No wall-clock bound: under a loaded CI the tokeniser alone took 11 s of a 10 s bound.
    data = ('{"big":[' + ",".join(["0"] * 16000) + "]," + ",".join(['"d":0'] * 5400) + "]]]}").encode()
    assert len(data) <= 65536
    put(guest, data, mtime=boot_time() - 600)
    code, out = recover(guest)
    assert code == 2 and "duplicate key" in out and "expected" not in out, out
    # the same tail without the duplicates is refused for the brackets: the tail is a real trap
    put(guest, data.replace(b',"d":0', b"", 5399), mtime=boot_time() - 600)
    code, out = recover(guest)
    assert code == 2 and "expected" in out and "duplicate" not in out, out


def test_a_stack_of_no_existing_project_cannot_name_another_projects_container(guest: Guest) -> None:
    # found by tests/fuzz/test_fuzz_recover.py: a project with no container has no labels to check,
    # and the containers it lists were started by id
    guest.docker.add_project("db", ("app",), running=False)
    rec = StackRecord("evil", ("docker", "compose"), "/srv/evil", (), (cid("db", 0),), True, ())
    _unusable(guest, marker_bytes((rec,), deadline_in=1, written_ago=100),
              f"container {cid('db', 0)[:12]} is not one of that project")
    assert guest.docker.running() == {"db": False}


# -- container stacks ---------------------------------------------------------------------------------


def test_container_stacks_start_one_by_one_last_stopped_first_and_only_allowed_ones(guest: Guest) -> None:
    guest.write_conf(MARKER=str(guest.marker), VMID=str(VMID), DEADLINE_GRACE="0", WAIT_DOCKER="1",
                     CONTAINERS="db-app-1 db-worker-1", CONTAINER_LABELS="com.docker.compose.project=web")
    guest.docker.add_project("db", ("app", "worker"), running=False)
    guest.docker.add_project("web", ("app",), running=False)
    guest.docker.add_project("other", ("app",), running=False)
    app = StackRecord.container("app", "docker", ("db-app-1", "db-worker-1"), (cid("db", 0), cid("db", 1)),
                                stopped=True)
    # (the stand-in is podman too)
    web = StackRecord.container("web", "podman", ("web-app-1",), (cid("web", 0),), stopped=True)
    put(guest, marker_bytes((app, web), deadline_in=10, written_ago=20))
    code, out = recover(guest)
    assert code == 0 and "started web, app; marker removed" in out, out
    assert guest.docker.running() == {"db": True, "web": True, "other": False}
    starts = [a for a in guest.docker.argvs() if "start" in a]
    assert starts == [["podman", "container", "start", cid("web", 0)], ["docker", "container", "start", cid("db", 1)],
                      ["docker", "container", "start", cid("db", 0)]]
    # a marker naming a container the settings do not allow: nothing started, the marker kept
    guest.docker.set_running("db", False)
    other = StackRecord.container("app", "docker", ("db-app-1", "other-app-1"), (cid("db", 0), cid("other", 0)),
                                  stopped=True)
    data = marker_bytes((other,), deadline_in=10, written_ago=20)
    put(guest, data)
    before = len(guest.docker.calls())
    code, out = recover(guest)
    assert code == 2 and "is not one that CONTAINERS or CONTAINER_LABELS" in out, out
    assert no_changing_calls(guest.docker.argvs()[before:]) and guest.marker.read_bytes() == data


def test_a_recorded_id_that_is_another_containers_name_is_not_started(guest: Guest) -> None:
    # issue 20: docker and podman take a container's name where no container has the id given; a marker
    # listing as an "id" the 64-hex NAME of a container the settings do not allow got that one started
    victim = cid("victim", 0)
    guest.write_conf(MARKER=str(guest.marker), VMID=str(VMID), DEADLINE_GRACE="0", WAIT_DOCKER="1",
                     CONTAINERS="db-app-1")
    guest.docker.add_project("db", ("app",), running=False)
    guest.docker.add_project("other", ("app",), running=False, names=(victim,))
    assert cid("other", 0) != victim  # (its id is another)
    for engine in ("docker", "podman"):
        rec = StackRecord.container("app", engine, ("db-app-1", "innocent"), (cid("db", 0), victim), stopped=True)
        other = cid("other", 0)[:12]
        why = f"app: container {victim[:12]} is not the id of a container ({engine} gives the container {other} for it"
        _unusable(guest, marker_bytes((rec,), deadline_in=1, written_ago=100), why)
        assert guest.docker.running() == {"db": False, "other": False}


def test_a_recorded_container_that_no_longer_exists_is_reported_and_not_started(guest: Guest) -> None:
    # only the ids checked are started: one that no container has is not asked for at all
    guest.write_conf(MARKER=str(guest.marker), VMID=str(VMID), DEADLINE_GRACE="0", WAIT_DOCKER="1",
                     CONTAINERS="db-app-1")
    guest.docker.add_project("db", ("app",), running=False)
    gone = cid("gone", 0)
    rec = StackRecord.container("app", "docker", ("db-app-1", "gone"), (cid("db", 0), gone), stopped=True)
    data = marker_bytes((rec,), deadline_in=1, written_ago=100)
    put(guest, data)
    code, out = recover(guest)
    assert code == 1 and f"app: not running after start: {gone[:12]} (no longer exists)" in out, out
    assert "STILL DOWN: app" in out, out
    assert guest.docker.running() == {"db": True} and guest.marker.read_bytes() == data
    assert [a for a in guest.docker.argvs() if "start" in a] == [["docker", "container", "start", cid("db", 0)]]
