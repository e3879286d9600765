"""Files the program writes as root (security issue 20, findings 3 and 4), tried as the attacker would:
another local user who owns the parent of the metrics textfile's directory (Debian gives
/var/lib/prometheus to the `prometheus` user; node_exporter's textfile directory below it is root's)
plants links and swaps directories; any local user (`nobody`) tries to read what the hook keeps under
its state and run directories, where the webhook's url (for healthchecks and ntfy, the secret) must
not be found at all."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_failsafe import launcher
from vzdump_hook.config import HookSettings
from vzdump_hook.node import report, safefile
from vzdump_hook.node.state import GuestRecord, Status

pytestmark = pytest.mark.integration

NOBODY = pwd.getpwnam("nobody")
SECRET = "d2b1c7e0-secret-ping-uuid"


@pytest.fixture
def world() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp_path is root's alone: nothing there would be
    readable by another user whatever the hook did)."""
    base = Path(tempfile.mkdtemp(prefix="vzdh-files-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=30)


def record() -> GuestRecord:
    return GuestRecord(vmid=101, vmtype="lxc", mode="snapshot", guest_table={}, status=Status.RESUMED, stacks=[])


def textfile_layout(world: Path) -> tuple[Path, Path, Path]:
    """(the prometheus user's directory, root's textfile directory below it, a victim file of root's)."""
    prom = world / "prometheus"
    prom.mkdir()
    os.chown(prom, NOBODY.pw_uid, NOBODY.pw_gid)
    textdir = prom / "node-exporter"
    textdir.mkdir(mode=0o755)
    victim = world / "victim"
    victim.write_text("root's own file\n")
    return prom, textdir, victim


def settings(world: Path, metrics: Path) -> HookSettings:
    return HookSettings(state_dir=str(world / "state"), run_dir=str(world / "run"), metrics_file=str(metrics))


def test_a_link_at_the_metrics_file_is_replaced_never_followed(world: Path) -> None:
    _, textdir, victim = textfile_layout(world)
    metrics = textdir / "vzdump-hook.prom"
    metrics.symlink_to(victim)
    for pid in range(os.getpid() - 50, os.getpid() + 50):  # the old code's temporary names, planted ahead
        (textdir / f"vzdump-hook.prom.{pid}.tmp").symlink_to(victim)
    report.update_metrics(settings(world, metrics), [record()])
    assert victim.read_text() == "root's own file\n"
    assert (not metrics.is_symlink()
            and "vzdump_hook_stacks_down{vmid=\"101\"} 0" in metrics.read_text()), metrics.read_text()
    assert oct(metrics.stat().st_mode & 0o777) == oct(0o644)  # node_exporter's user reads it


@pytest.mark.parametrize("swap", ["link", "own-directory"])
def test_a_swapped_textfile_directory_is_refused(world: Path, swap: str, caplog: pytest.LogCaptureFixture) -> None:
    """The prometheus user renames root's directory away and puts a link (to a directory of root's) or a
    directory of its own, full of links, in its place: root writes nothing there."""
    prom, textdir, victim = textfile_layout(world)
    textdir.rename(prom / "moved")
    if swap == "link":
        textdir.symlink_to(world)  # root's directory, holding the victim
        target = world / "vzdump-hook.prom"
    else:
        textdir.mkdir()
        os.chown(textdir, NOBODY.pw_uid, NOBODY.pw_gid)
        (textdir / "vzdump-hook.prom").symlink_to(victim)
        target = victim
    (world / "state").mkdir(mode=0o700)
    before = sorted(p.name for p in world.iterdir())
    report.update_metrics(settings(world, textdir / "vzdump-hook.prom"), [record()])
    assert victim.read_text() == "root's own file\n"
    assert sorted(p.name for p in world.iterdir()) == before and (swap != "link" or not target.exists())
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "metrics:" in said and ("symbolic link" in said or "belongs to uid" in said), said


def test_a_directory_others_may_write_is_refused_naming_the_fix(world: Path) -> None:
    shared = world / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(safefile.UnsafePath, match=r"may be written by other users \(mode 1777\): chmod go-w"):
        safefile.write_atomic(str(shared / "f"), "x")
    assert not (shared / "f").exists()


def hook_env(world: Path, config: Path) -> dict[str, str]:
    return {"VZDUMP_HOOK_CONFIG": str(config), "VZDUMP_HOOK_RUN_DIR": str(world / "run"),
            "VZDUMP_HOOK_STATE_DIR": str(world / "state"), "STOREID": "local", "DUMPDIR": "/var/lib/vz/dump"}


def run_phase(hook: str, phase: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items()), hook, phase],
                          capture_output=True, text=True, timeout=120, cwd="/")


def readable_by_nobody(root: Path) -> list[str]:
    """Every file under `root` that the user nobody can open and read."""
    listing = as_nobody("find", str(root), "-type", "f", "-readable")
    return [line for line in listing.stdout.splitlines() if line]


def files_holding(root: Path, text: str) -> list[str]:
    """Files under `root` holding `text`, but for the run dir's config cache: a copy of the config
    (which holds the url too), root's alone (0600, checked here) in a 0700 directory on /run."""
    found = [p for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]
    for p in found:
        if p.name == "config-cache.json":
            assert (p.stat().st_mode & 0o777) == 0o600 and p.stat().st_uid == 0
    return [str(p) for p in found if p.name != "config-cache.json"]


def test_nobody_reads_anything_under_the_state_and_run_dirs_and_no_file_holds_the_webhook_url(world: Path,
                                                                                              tmp_path: Path) -> None:
    config = world / "config.toml"
    config.write_text(f'[hook]\nmetrics_file = "{world}/metrics/vzdump-hook.prom"\n'
                      f'[hook.notify]\nurl = "http://127.0.0.1:9/ping/{SECRET}"\nformat = "healthchecks"\n'
                      'timeout = 1\n[defaults]\n')
    config.chmod(0o600)
    control = world / "control"
    control.write_text("readable\n")
    assert readable_by_nobody(world) == [str(control)], "the reader does not work: the test would prove nothing"
    hook = launcher(tmp_path, sys.executable)
    env = hook_env(world, config)
    for phase in ("job-init", "job-start", "job-end"):
        r = run_phase(hook, phase, env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert SECRET not in r.stdout + r.stderr  # the task log names the receiver, not the secret
    for d in (world / "state", world / "run"):
        assert d.is_dir() and (d.stat().st_mode & 0o777) == 0o700, oct(d.stat().st_mode)
    assert readable_by_nobody(world) == [str(control)]
    assert files_holding(world / "state", SECRET) == [] and files_holding(world / "run", SECRET) == []
    queued = list((world / "state" / report.QUEUE_DIR).glob("*.json"))
    assert queued, "job-end's message should wait in the queue (the receiver does not listen)"


def test_an_older_install_is_fixed_at_the_next_run(world: Path, tmp_path: Path) -> None:
    """State and run dirs of 0755 with a 0644 settings.json and a queued message holding the url (as
    older versions wrote them): after the next job-start, nobody reads them and no file holds the url,
    and the queued message still goes to the configured receiver."""
    url = f"http://127.0.0.1:9/ping/{SECRET}"
    state, run = world / "state", world / "run"
    state.mkdir(mode=0o755)
    run.mkdir(mode=0o755)
    (state / "settings.json").write_text(json.dumps({"notify": {"url": url, "format": "healthchecks", "token_file": "",
                                                                "timeout": 1.0}}))
    (state / "settings.json").chmod(0o644)
    queue = state / report.QUEUE_DIR
    queue.mkdir(mode=0o755)
    (queue / f"{time.time():017.6f}-0000abcd.json").write_text(json.dumps({"url": url, "headers": {}, "body": "old"}))
    assert len(readable_by_nobody(world)) == 2  # the control: the old layout leaks
    config = world / "config.toml"
    config.write_text(f'[hook.notify]\nurl = "{url}"\nformat = "healthchecks"\ntimeout = 1\n[defaults]\n')
    config.chmod(0o600)
    r = run_phase(launcher(tmp_path, sys.executable), "job-start", hook_env(world, config))
    assert r.returncode == 0, r.stdout + r.stderr
    assert readable_by_nobody(world) == [] and (state.stat().st_mode & 0o777) == 0o700
    assert files_holding(state, SECRET) == [] and files_holding(run, SECRET) == []
    kept = [json.loads(p.read_text()) for p in queue.glob("*.json")]
    assert [k["body"] for k in kept] == ["old"] and kept[0]["to"] == report.NotifyConfig(url).key()


def test_a_broken_config_queues_the_message_for_the_next_valid_one(world: Path, tmp_path: Path) -> None:
    """Remembered settings keep no url: job-end with a broken config queues its message, and the next job
    with a valid config sends it (here: tries to, and keeps it, the receiver being down)."""
    config = world / "config.toml"
    config.write_text(f'[hook.notify]\nurl = "http://127.0.0.1:9/ping/{SECRET}"\ntimeout = 1\n[defaults]\n')
    config.chmod(0o600)
    hook = launcher(tmp_path, sys.executable)
    env = hook_env(world, config)
    assert run_phase(hook, "job-start", env).returncode == 0
    config.write_text("[defaults\n")  # broken
    r = run_phase(hook, "job-end", env)
    assert "queued for the next job with a valid config" in r.stdout, r.stdout
    assert files_holding(world / "state", SECRET) == []
    assert len(list((world / "state" / report.QUEUE_DIR).glob("*.json"))) == 1
