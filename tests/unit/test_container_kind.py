"""The container kind: config entries (every problem by its key path), marker records, and the driver
against an in-memory engine at the transport boundary (which containers are recorded, the order of the
stops and starts, killed containers, a container gone meanwhile). The real engines:
tests/integration/test_container_kind.py."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from vzdump_hook.errors import ControllerError, MarkerError
from vzdump_hook.guest import marker as markers
from vzdump_hook.guest.marker import Marker, StackRecord
from vzdump_hook.node.job import JobId
from vzdump_hook.node.state import GuestRecord
from vzdump_hook.stacks import Kind
from vzdump_hook.stacks.container import ContainerDriver
from vzdump_hook.stacks.container_table import Table
from vzdump_hook.stacks.table import StackSpec
from vzdump_hook.transports.base import Transport

from .test_config import parse, problems

GUEST = '[guests.101]\nssh = { host = "h" }\n'


def cid(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


# -- config -----------------------------------------------------------------------------------


def test_container_entries_by_name_and_by_label() -> None:
    g = parse(GUEST + 'stacks = [{ kind = "container", name = "app", containers = ["web", "db"], stop_timeout = 20 },'
                      ' { kind = "container", name = "pods", label = "io.podman.compose.project=shop",'
                      ' engine = "podman" }]\n').guests[101]
    assert g.stacks == (
        StackSpec("app", 20.0, Table(containers=("web", "db"))),
        StackSpec("pods", None, Table(label="io.podman.compose.project=shop", engine="podman")),
    )


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ('{ kind = "container", name = "a" }', "guests.101.stacks[0].containers: give either containers"),
        ('{ kind = "container", name = "a", containers = ["x"], label = "k=v" }',
         "guests.101.stacks[0].containers: give either containers"),
        ('{ kind = "container", name = "a", containers = [] }',
         "guests.101.stacks[0].containers: must be a list of 1-64 container names"),
        ('{ kind = "container", name = "a", containers = "web" }',
         "guests.101.stacks[0].containers: must be a list of 1-64"),
        ('{ kind = "container", name = "a", containers = ["web", "-rm"] }',
         "guests.101.stacks[0].containers[1]: not a container name"),
        ('{ kind = "container", name = "a", containers = ["we b"] }',
         "guests.101.stacks[0].containers[0]: not a container name"),
        ('{ kind = "container", name = "a", containers = ["x", "x"] }',
         "guests.101.stacks[0].containers: a container is listed twice"),
        ('{ kind = "container", name = "a", label = "k=v w" }',
         'guests.101.stacks[0].label: must be "KEY" or "KEY=VALUE"'),
        ('{ kind = "container", name = "a", label = "=v" }',
         'guests.101.stacks[0].label: must be "KEY" or "KEY=VALUE"'),
        ('{ kind = "container", name = "a", label = 3 }', 'guests.101.stacks[0].label: must be "KEY" or "KEY=VALUE"'),
        ('{ kind = "container", name = "a", containers = ["x"], engine = "lxc" }',
         "guests.101.stacks[0].engine: must be one of 'docker', 'podman'"),
        ('{ kind = "container", containers = ["x"] }', "guests.101.stacks[0].name: missing"),
        ('{ kind = "container", name = "a", containers = ["x"], units = ["a.service"] }',
         "guests.101.stacks[0].units: unknown key"),
        ('{ kind = "systemd", name = "a", units = ["a.service"], containers = ["x"] }',
         "guests.101.stacks[0].containers: unknown key"),
        ('{ name = "db", label = "k=v" }', "guests.101.stacks[0].label: unknown key"),
    ],
)
def test_a_bad_container_entry_is_named_by_its_key_path(entry: str, expected: str) -> None:
    got = problems(GUEST + f"stacks = [{entry}]\n")
    assert any(p.startswith(expected) for p in got), got


def test_one_container_or_label_in_two_stacks_is_refused() -> None:
    got = problems(GUEST + 'stacks = [{ kind = "container", name = "a", containers = ["x"] },'
                           ' { kind = "container", name = "b", containers = ["y", "x"] }]\n')
    assert got == ["guests.101.stacks: container x is in stacks 'a' and 'b'"]
    got = problems(GUEST + 'stacks = [{ kind = "container", name = "a", label = "k=v" },'
                           ' { kind = "container", name = "b", label = "k=v" }]\n')
    assert got == ["guests.101.stacks: label k=v is in stacks 'a' and 'b'"]


# -- marker -----------------------------------------------------------------------------------


def test_a_container_record_round_trips_through_the_marker_and_the_host_state() -> None:
    rec = StackRecord.container("app", "podman", ("web", "db"), (cid("web"), cid("db")), stopped=True)
    compose = StackRecord("web", ("docker", "compose"), "/srv/web", ("/srv/web/compose.yaml",), ("ab" * 32,), True,
                          ("app",))
    m = Marker(JobId("n", "b", 1, 2), 101, "lxc", "snapshot", 1700000000.0, 1700000600.0, "stopped", (compose, rec))
    back = markers.parse(m.to_json())
    assert back.stacks == (compose, rec) and back.stacks[1].kind is Kind.CONTAINER
    line = [ln for ln in m.to_json().decode().splitlines() if '"name": "app"' in ln][0]
    assert f'"engine": "podman", "names": ["web", "db"], "containers": ["{cid("web")}", "{cid("db")}"]' in line
    gr = GuestRecord(101, "lxc", "snapshot", {}, stacks=[compose, rec])
    assert GuestRecord.from_json(gr.to_json()).stacks == [compose, rec]


@pytest.mark.parametrize(
    ("old", "new", "why"),
    [
        (b'"engine": "docker"', b'"engine": "lxc"', r"stacks\[0\]\.engine must be one of"),
        (b'"names": ["web"]', b'"names": ["web", "db"]', r"stacks\[0\]\.containers must list 1-64 ids, one per name"),
        (b'"names": ["web"]', b'"names": ["-web"]', r"stacks\[0\]\.names must be container names"),
        (b'"engine": "docker", ', b"", r"stacks\[0\]\.engine missing"),
    ],
)
def test_a_bad_container_record_is_refused(old: bytes, new: bytes, why: str) -> None:
    rec = StackRecord.container("app", "docker", ("web",), (cid("web"),))
    data = Marker(JobId("n", "b", 1, 2), 101, "lxc", "snapshot", 1700000000.0, 1700000600.0, "stopped",
                  (rec,)).to_json()
    assert old in data
    with pytest.raises(MarkerError, match=why):
        markers.parse(data.replace(old, new))


# -- driver -----------------------------------------------------------------------------------


@dataclass
class Ctr:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    running: bool = True
    exit_code: int = 0
    oom: bool = False
    stubborn: bool = False  # ignores SIGTERM: killed at the stop timeout (exit 137)
    start_fails: bool = False

    @property
    def id(self) -> str:
        return cid(self.name)


class Engine(Transport):
    """An in-memory engine behind the transport: answers exactly the argv the driver sends. A reference
    to a container is resolved as docker and podman resolve it: the container of that id, else the one
    of that name (which may look like an id)."""

    def __init__(self, engine: str, *ctrs: Ctr, answers: str = "docker") -> None:
        super().__init__("fake")
        self.engine, self.answers = engine, answers
        self.ctrs = {c.name: c for c in ctrs}
        self.calls: list[str] = []

    def _exec(self, argv: Sequence[str], stdin: bytes | None, timeout: float) -> tuple[int, bytes, bytes]:
        assert timeout > 0
        if argv[:2] == ["sh", "-c"]:
            self.calls.append("detect")
            return 0, f"{self.answers}\n".encode(), b""
        assert argv[0] == self.engine and argv[1] == "container", argv
        verb, rest = argv[2], list(argv[3:])
        by_id = {c.id: c for c in self.ctrs.values()}
        by_id = {**{c.name: c for c in self.ctrs.values()}, **by_id}  # an id before a name
        if verb == "ls":
            label = next((f[6:] for f in rest if f.startswith("label=")), None)
            every = rest[0] == "-a"  # every container, running or not (else --filter status=running)
            self.calls.append(f"ls{' -a' if every else ''} {label or ''}".strip())
            key, _, value = (label or "").partition("=")
            out = [f"{c.id}\t{c.name}" for c in self.ctrs.values()
                   if (every or c.running)
                   and (label is None or (key in c.labels and (not value or c.labels[key] == value)))]
            return 0, "".join(x + "\n" for x in out).encode(), b""
        if verb == "inspect":
            ids = rest[2:]
            found = [by_id[i] for i in ids if i in by_id]
            out = [f"{c.id} {str(c.running).lower()} false {c.exit_code} {str(c.oom).lower()}" for c in found]
            return ((0 if len(out) == len(ids) else 1), "".join(x + "\n" for x in out).encode(),
                    b"Error: No such container" if len(out) != len(ids) else b"")
        c = by_id.get(rest[-1])
        self.calls.append(f"{verb} {c.name if c else rest[-1][:12]}")
        if c is None:
            return 1, b"", b"Error: No such container"
        if verb == "stop":
            assert rest[:2] == ["-t", "7"]
            c.running, c.exit_code = False, 137 if c.stubborn else 0
            return 0, b"", b""
        if verb == "start" and not c.start_fails:
            c.running = True
            return 0, b"", b""
        return 1, b"", b"Error: cannot start"

    def close(self) -> None:
        pass


def spec(name: str, **kw: object) -> StackSpec:
    return StackSpec(name, table=Table(**kw))  # type: ignore[arg-type]


def test_only_the_listed_containers_that_run_are_recorded_in_the_given_order() -> None:
    e = Engine("docker", Ctr("db"), Ctr("web"), Ctr("cache", running=False), Ctr("other"))
    d = ContainerDriver(e)
    found = d.running((spec("app", containers=("web", "cache", "db")),), 10)
    assert found == {"app": StackRecord.container("app", "docker", ("web", "db"), (cid("web"), cid("db")))}
    assert e.calls == ["detect", "ls", "ls -a"]  # cache does not run: does it exist?
    assert d.absent() == []  # it does (stopped: left alone)
    e.calls.clear()
    assert d.running((spec("app", containers=("web", "db")),), 10) and e.calls == ["ls"]  # all run: one listing


def test_a_listed_name_or_label_that_selects_nothing_is_absent_with_its_key() -> None:
    e = Engine("docker", Ctr("accc-side"), Ctr("parked", {"app": "blog"}, running=False))
    d = ContainerDriver(e)
    found = d.running((spec("app", containers=("accc-side", "accc-typo")), spec("ghost", containers=("nope",)),
                       spec("shop", label="app=shop"), spec("blog", label="app=blog")), 10)
    assert list(found) == ["app"]
    assert [(a.stack, a.key, a.what) for a in d.absent()] == [
        ("app", "containers[1]", "docker container 'accc-typo' does not exist"),
        ("ghost", "containers[0]", "docker container 'nope' does not exist"),
        ("shop", "label", "label 'app=shop' selects no container"),
    ]  # blog's label selects a stopped container: it exists, left alone


def test_label_matches_are_recorded_in_the_order_of_their_names() -> None:
    e = Engine("podman", Ctr("z", {"app": "shop"}), Ctr("a", {"app": "shop"}), Ctr("m", {"app": "blog"}),
               Ctr("n", {"app": "shop"}, running=False))
    found = ContainerDriver(e).running((spec("shop", label="app=shop", engine="podman"),
                                        spec("any", label="app", engine="podman")), 10)
    assert found["shop"].names == ("a", "z") and found["shop"].engine == "podman"
    assert found["any"].names == ("m",)  # a and z are the first stack's already
    assert "detect" not in e.calls  # configured engine: not detected


def test_nothing_running_means_no_stack() -> None:
    e = Engine("docker", Ctr("web", running=False))
    assert ContainerDriver(e).running((spec("app", containers=("web", "gone")),), 10) == {}


def test_stop_goes_in_order_and_start_in_reverse_one_container_at_a_time() -> None:
    e = Engine("docker", Ctr("a"), Ctr("b"), Ctr("c"))
    d = ContainerDriver(e)
    rec = StackRecord.container("app", "docker", ("b", "a", "c"), (cid("b"), cid("a"), cid("c")))
    out = d.stop(rec, 7, 30)
    assert out.clean and e.calls == ["stop b", "stop a", "stop c"]
    assert not any(c.running for c in e.ctrs.values()) and not d.is_up(rec, 10)
    e.calls.clear()
    d.start(rec, 30)
    assert e.calls == ["start c", "start a", "start b"] and d.is_up(rec, 10)


def test_a_container_killed_at_the_timeout_or_by_the_oom_killer_makes_the_stop_unclean() -> None:
    e = Engine("docker", Ctr("a", stubborn=True), Ctr("b"), Ctr("c"))
    rec = StackRecord.container("app", "docker", ("a", "b", "c"), (cid("a"), cid("b"), cid("c")))
    out = ContainerDriver(e).stop(rec, 7, 30)
    assert out.killed == ("a",) and not out.error and not out.clean
    e.ctrs["c"].oom = True
    assert ContainerDriver(e).stop(rec, 7, 30).killed == ("a", "c")


def test_a_container_that_will_not_start_or_is_gone_is_named() -> None:
    e = Engine("docker", Ctr("a", running=False, start_fails=True), Ctr("b", running=False))
    rec = StackRecord.container("app", "docker", ("a", "b", "gone"), (cid("a"), cid("b"), cid("gone")))
    with pytest.raises(ControllerError, match=r"stack app: not running after start: a, gone \(no longer exists\)"):
        ContainerDriver(e).start(rec, 30)
    assert e.ctrs["b"].running  # the others are started all the same


def test_a_recorded_id_that_is_another_containers_name_is_neither_started_nor_stopped() -> None:
    # issue 20: a marker (the node's recover, a stale marker at backup-start) lists as an id 64 hex digits
    # that no container has as its id, but one has as its name; the engine would take it for that name
    victim = cid("victim")  # the name of a container, not its id
    e = Engine("docker", Ctr("a", running=False), Ctr(victim, running=False))
    assert e.ctrs[victim].id != victim
    rec = StackRecord.container("app", "docker", ("a", "innocent"), (cid("a"), victim))
    d = ContainerDriver(e)
    with pytest.raises(ControllerError) as err:
        d.start(rec, 30)
    assert f"stack app: container {victim} is not the id of a container" in str(err.value), err.value
    assert not e.ctrs[victim].running and f"start {victim}" not in e.calls
    assert e.ctrs["a"].running and e.calls == ["start a"]  # the stack's real container is started all the same
    e.ctrs[victim].running = True
    e.calls.clear()
    out = d.stop(rec, 7, 30)
    assert f"container {victim} is not the id of a container" in out.error and not out.clean, out
    assert e.ctrs[victim].running and e.calls == ["stop a"] and not e.ctrs["a"].running


def test_no_engine_in_the_guest_is_an_error() -> None:
    e = Engine("docker", answers="none")
    with pytest.raises(ControllerError, match="neither docker nor podman answers"):
        ContainerDriver(e).running((spec("app", containers=("a",)),), 10)


# -- guest.conf and the shipped example ---------------------------------------------------------------


def test_guest_install_writes_the_containers_and_labels_the_wrapper_may_act_on() -> None:
    from vzdump_hook.guest.install import Layout, conf_text

    g = parse(GUEST + 'stacks = ["db", { kind = "container", name = "a", containers = ["web", "worker"] },'
                      ' { kind = "container", name = "b", label = "app=shop" },'
                      ' { kind = "container", name = "c", label = "tier" }]\n').guests[101]
    lines = conf_text(g, Layout("/")).decode().splitlines()
    assert "KINDS=compose container" in lines
    assert "CONTAINERS=web worker" in lines and "CONTAINER_LABELS=app=shop tier" in lines


def test_the_shipped_example_has_container_stacks() -> None:
    from pathlib import Path

    from vzdump_hook import config

    g = config.load(str(Path(__file__).resolve().parents[2] / "examples" / "config.toml")).guests[105]
    assert g.stacks == (StackSpec("app", 60.0, Table(containers=("app-web", "app-db"))),
                        StackSpec("shop", None, Table(label="io.podman.compose.project=shop", engine="podman")))


def test_a_container_stack_may_take_its_stop_timeout_once_per_container() -> None:
    from vzdump_hook import config
    from vzdump_hook.stacks.kinds import Stacks

    g = parse(GUEST + 'max_downtime = 100\nstacks = [{ kind = "container", name = "a", containers = ["x", "y", "z"],'
                      ' stop_timeout = 40 }]\n')
    assert config.warnings(g) == ["guests.101.stop_timeout: a stop may take 120 s, longer than max_downtime (100 s): "
                                  "the guest's recovery may start stacks while the backup still needs them down"]
    stacks = Stacks(Engine("docker"), g.guests[101], JobId("n", "b", 1, 2))
    rec = StackRecord.container("a", "docker", ("x", "y", "z"), (cid("x"), cid("y"), cid("z")))
    assert stacks.stop_bound(rec, 40) == 120
    assert stacks.stop_bound(StackRecord.systemd("s", ("a.service",)), 40) == 40


def test_container_stacks_take_the_per_stack_strategies() -> None:
    from vzdump_hook.stacks.table import ReadySpec

    g = parse(GUEST + 'stacks = [{ kind = "container", name = "a", containers = ["db"], group = 2,'
                      ' before_stop = ["sync"], ready = { command = ["pg_isready"] } }]\n').guests[101]
    (spec,) = g.stacks or ()
    assert (spec.group, spec.before_stop, spec.ready) == (2, ("sync",), ReadySpec(command=("pg_isready",)))
    assert spec.table == Table(("db",))
    got = problems(GUEST + 'stacks = [{ kind = "container", name = "a", containers = ["db"],'
                           ' ready = { healthy = true } }]\n')
    assert got and got[0].startswith("guests.101.stacks[0].ready.healthy: only `healthy = true`, "
                                     "and only for compose stacks"), got
