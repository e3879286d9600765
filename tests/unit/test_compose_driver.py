"""stacks/compose.py against FakeTransport: listing, stopping (killed detection, fallbacks), starting."""

from __future__ import annotations

import pytest

from vzdump_hook.errors import ControllerError, TransportError
from vzdump_hook.guest.marker import StackRecord
from vzdump_hook.stacks import compose as compose_mod
from vzdump_hook.stacks.compose import ComposeDriver

from .fakes import FakeContainer, FakeGuest, FakeTransport, container_id


def driver(g: FakeGuest, compose: tuple[str, ...] | None = None) -> ComposeDriver:
    return ComposeDriver(FakeTransport(g), compose=compose)


@pytest.fixture
def g() -> FakeGuest:
    g = FakeGuest()
    g.add_project("db", 2, files=["/srv/db/compose.yaml", "/srv/db/compose.prod.yaml"])
    g.add_project("web", 1, workdir="/opt/web app")
    return g


# -- running() / detect() -----------------------------------------------------------------------


def test_running_lists_projects_with_their_containers(g: FakeGuest) -> None:
    found = driver(g).running((), 10)
    assert sorted(found) == ["db", "web"]
    db = found["db"]
    assert db == StackRecord(
        "db",
        ("docker", "compose"),
        "/srv/db",
        ("/srv/db/compose.yaml", "/srv/db/compose.prod.yaml"),
        (container_id("db", 0), container_id("db", 1)),
        services=("svc0", "svc1"),
    )
    assert db.stopped is False
    assert found["web"].workdir == "/opt/web app"
    assert g.calls == [("ps", ""), ("detect", "")]


def test_running_leaves_out_stopped_projects_and_containers(g: FakeGuest) -> None:
    g.add_project("old", 1, running=False)
    g.projects["db"].containers[container_id("db", 1)].running = False
    found = driver(g).running((), 10)
    assert sorted(found) == ["db", "web"]
    assert found["db"].containers == (container_id("db", 0),)


def test_running_ignores_malformed_lines(g: FakeGuest) -> None:
    good = container_id("x", 0)
    g.extra_ps_lines = [
        f"{good}\tBad-Name\t/srv/x\t/srv/x/c.yaml\tapp",  # not a compose project name
        f"{good}\tx\trelative/dir\t/srv/x/c.yaml\tapp",  # workdir not absolute
        f"{good[:12]}\tx\t/srv/x\t/srv/x/c.yaml\tapp",  # short id (we ask for --no-trunc)
        f"{good}\tx\t/srv/x\t/srv/x/c.yaml\t-bad service",  # not a service name
        f"{good}\tx\t/srv/x\t/srv/x/c.yaml",  # 4 fields
        "garbage",
        "",
        f"{good}\tok\t/srv/ok\t\tapp",  # no files label: compose looks in workdir
    ]
    found = driver(g).running((), 10)
    assert sorted(found) == ["db", "ok", "web"]
    assert found["ok"].files == () and found["ok"].containers == (good,)


def test_configured_compose_command_is_not_detected(g: FakeGuest) -> None:
    found = driver(g, ("docker-compose",)).running((), 10)
    assert found["db"].compose == ("docker-compose",)
    assert g.verbs("detect") == []


def test_detect_compose_v1() -> None:
    g = FakeGuest(compose="docker-compose")
    g.add_project("db")
    d = driver(g)
    assert d.running((), 10)["db"].compose == ("docker-compose",)
    assert d.compose == ("docker-compose",)


def test_detect_once(g: FakeGuest) -> None:
    d = driver(g)
    d.running((), 10)
    d.running((), 10)
    assert len(g.verbs("detect")) == 1


def test_no_compose_in_the_guest(g: FakeGuest) -> None:
    g.compose = "none"
    with pytest.raises(ControllerError, match="neither `docker compose` nor `docker-compose` found"):
        driver(g).running((), 10)


def test_docker_not_running(g: FakeGuest) -> None:
    g.docker_down = True
    with pytest.raises(TransportError) as ei:
        driver(g).running((), 10)
    e = ei.value
    assert "cannot list containers" in str(e)
    assert e.exit_status == 1 and "Cannot connect to the Docker daemon" in e.stderr_tail
    assert e.command.startswith("docker ps --no-trunc")


# -- stop() -------------------------------------------------------------------------------------


def test_stop_sends_compose_stop_in_the_project_dir(g: FakeGuest) -> None:
    d = driver(g)
    rec = d.running((), 10)["db"]
    out = d.stop(rec, 7.9, 20)
    assert out.clean and out.name == "db" and out.killed == () and out.error == ""
    argv = next(a for a in g.argvs if a[:3] == ["sh", "-c", compose_mod._IN_DIR])
    assert argv == [
        "sh",
        "-c",
        compose_mod._IN_DIR,
        "sh",
        "/srv/db",
        "docker",
        "compose",
        "-p",
        "db",
        "-f",
        "/srv/db/compose.yaml",
        "-f",
        "/srv/db/compose.prod.yaml",
        "stop",
        "-t",
        "7",
    ]
    assert g.down_stacks() == ["db"] and g.running_stacks() == ["web"]


def test_stop_timeout_is_at_least_one_second(g: FakeGuest) -> None:
    d = driver(g)
    d.stop(d.running((), 10)["web"], 0.2, 20)
    assert any(a[-3:] == ["stop", "-t", "1"] for a in g.argvs)


def test_guest_text_never_reaches_the_script(g: FakeGuest) -> None:
    """Workdir and files come from the guest: they travel as arguments, the script is a constant."""
    evil = '/srv/x"; reboot; echo "'
    g.add_project("x", workdir=evil, files=[f"{evil}/c.yaml"])
    d = driver(g)
    d.stop(d.running((), 10)["x"], 5, 20)
    argv = next(a for a in g.argvs if a[:3] == ["sh", "-c", compose_mod._IN_DIR])
    assert argv[2] == compose_mod._IN_DIR and argv[4] == evil
    assert "reboot" not in argv[2]


def test_stubborn_container_is_reported_killed(g: FakeGuest) -> None:
    g.projects["db"].stubborn = True
    d = driver(g)
    out = d.stop(d.running((), 10)["db"], 5, 20)
    assert out.killed == (container_id("db", 0)[:12], container_id("db", 1)[:12])
    assert not out.clean and out.error == ""
    assert g.down_stacks() == ["db"]


def test_container_that_exited_137_before_is_not_reported(g: FakeGuest) -> None:
    g.add_project("old", 1, running=False)
    g.projects["old"].containers[container_id("old", 0)].exit_code = 137
    d = driver(g)
    out = d.stop(d.running((), 10)["db"], 5, 20)
    assert out.clean


def test_stop_falls_back_to_docker_stop_for_containers_compose_does_not_know(g: FakeGuest) -> None:
    g.projects["db"].compose_broken = True
    d = driver(g)
    out = d.stop(d.running((), 10)["db"], 5, 20)
    assert out.clean
    assert g.verbs("docker-stop") == [f"{container_id('db', 0)[:12]} {container_id('db', 1)[:12]}"]
    assert any(a[:4] == ["docker", "stop", "-t", "5"] for a in g.argvs)
    assert g.down_stacks() == ["db"]


def test_stop_never_raises_when_compose_hangs(g: FakeGuest) -> None:
    g.projects["db"].stop_hangs = True
    d = driver(g)
    out = d.stop(d.running((), 10)["db"], 5, 20)
    assert not out.clean and "no answer" in out.error
    assert out.killed == ()


def test_stop_never_raises_when_the_guest_goes_away(g: FakeGuest) -> None:
    d = driver(g)
    rec = d.running((), 10)["db"]
    g.unreachable = True
    out = d.stop(rec, 5, 20)
    assert not out.clean and "connection refused" in out.error


def test_stop_reports_containers_still_running(g: FakeGuest) -> None:
    d = driver(g)
    rec = d.running((), 10)["db"]
    g.projects["db"].compose_broken = True
    keep = container_id("db", 0)
    original = g._stop_container

    def never_stops(p, c):  # type: ignore[no-untyped-def]
        if c.id != keep:
            original(p, c)

    g._stop_container = never_stops  # type: ignore[method-assign]
    out = d.stop(rec, 5, 20)
    assert not out.clean
    assert out.error.startswith(f"still running after stop: {keep[:12]}")
    assert "no such file" in out.error  # compose's own complaint is kept


def test_disallowed_compose_command_is_refused(g: FakeGuest) -> None:
    d = driver(g)
    rec = StackRecord("db", ("sh", "-c"), "/srv/db", (), (container_id("db", 0),))
    out = d.stop(rec, 5, 20)
    assert "not allowed" in out.error
    with pytest.raises(ControllerError, match="not allowed"):
        d.start(rec, 20)
    assert not any(a[:3] == ["sh", "-c", compose_mod._IN_DIR] for a in g.argvs)


# -- start() / is_up() --------------------------------------------------------------------------


def test_start_brings_the_recorded_containers_back(g: FakeGuest) -> None:
    d = driver(g)
    rec = d.running((), 10)["db"]
    d.stop(rec, 5, 20)
    assert d.start(rec, 20) >= 0
    assert g.running_stacks() == ["db", "web"]
    argv = [a for a in g.argvs if a[:3] == ["sh", "-c", compose_mod._IN_DIR]][-1]
    assert argv[4:] == ["/srv/db", "docker", "compose", "-p", "db", "-f", "/srv/db/compose.yaml",
                        "-f", "/srv/db/compose.prod.yaml", "start", "svc0", "svc1"]
    assert d.is_up(rec, 10)


def test_start_failure_raises_with_the_stack_and_what_docker_said(g: FakeGuest) -> None:
    d = driver(g)
    rec = d.running((), 10)["db"]
    d.stop(rec, 5, 20)
    g.projects["db"].start_fails = True
    with pytest.raises(ControllerError) as ei:
        d.start(rec, 20)
    msg = str(ei.value)
    assert msg.startswith("stack db: not running after start: ")
    assert container_id("db", 0)[:12] in msg and "port is already allocated" in msg
    assert len(g.verbs("docker-start")) == 1  # the fallback was tried
    assert not d.is_up(rec, 10)


def test_start_falls_back_to_docker_start(g: FakeGuest) -> None:
    d = driver(g)
    rec = d.running((), 10)["db"]
    d.stop(rec, 5, 20)
    g.projects["db"].compose_broken = True
    d.start(rec, 20)
    assert g.verbs("docker-start") == [f"{container_id('db', 0)[:12]} {container_id('db', 1)[:12]}"]
    assert g.running_stacks() == ["db", "web"]


def test_restart_loop_is_not_up(g: FakeGuest) -> None:
    d = driver(g)
    rec = d.running((), 10)["db"]
    d.stop(rec, 5, 20)
    g.projects["db"].restart_loop = True
    with pytest.raises(ControllerError, match="not running after start"):
        d.start(rec, 20)
    assert not d.is_up(rec, 10)


def test_start_without_recorded_containers_relies_on_compose(g: FakeGuest) -> None:
    d = driver(g)
    rec = StackRecord("gone", ("docker", "compose"), "/srv/gone", (), ())
    with pytest.raises(ControllerError, match="compose failed"):
        d.start(rec, 20)


def test_start_of_containers_recreated_since_is_not_an_error(g: FakeGuest) -> None:
    """A container recreated by the admin (new id, same service) counts: the service runs again."""
    d = driver(g)
    rec = d.running((), 10)["db"]
    d.stop(rec, 5, 20)
    g.projects["db"].containers.pop(container_id("db", 1))
    new = container_id("db", 7)
    g.projects["db"].containers[new] = FakeContainer(new, "svc1", running=False)
    d.start(rec, 20)
    assert g.running_stacks() == ["db", "web"]


def test_start_of_containers_removed_since_without_replacement_is_an_error(g: FakeGuest) -> None:
    """`compose down` during the backup: the service that ran before does not run now: not up."""
    d = driver(g)
    rec = d.running((), 10)["db"]
    d.stop(rec, 5, 20)
    g.projects["db"].containers.pop(container_id("db", 1))
    with pytest.raises(ControllerError, match="no longer exists"):
        d.start(rec, 20)


def test_is_up_false_without_containers(g: FakeGuest) -> None:
    d = driver(g)
    assert not d.is_up(StackRecord("x", ("docker", "compose"), "/srv/x", (), ()), 10)
    assert d.is_up(d.running((), 10)["web"], 10)


def test_start_does_not_start_containers_that_were_down_before(g: FakeGuest) -> None:
    init = container_id("db", 1)
    g.projects["db"].containers[init].running = False  # e.g. a one-shot migration service that exited 0
    d = driver(g)
    rec = d.running((), 10)["db"]
    assert rec.containers == (container_id("db", 0),)
    d.stop(rec, 5, 20)
    d.start(rec, 20)
    assert g.projects["db"].containers[container_id("db", 0)].running
    assert not g.projects["db"].containers[init].running


def test_running_leaves_out_containers_in_a_restart_loop(g: FakeGuest) -> None:
    """A stack that was crash-looping before the backup is not stopped, so it is not 'started' after."""
    g.add_project("loop", 1)
    g.projects["loop"].containers[container_id("loop", 0)].restarting = True
    assert "loop" not in driver(g).running((), 10)
