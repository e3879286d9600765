"""check --cluster: what each node runs, from the reports nodes write into the cluster file system."""

from __future__ import annotations

import json
import time
from pathlib import Path

from click.testing import CliRunner

from vzdump_hook import config as configuration
from vzdump_hook.admin.cli import cli
from vzdump_hook.node import cluster
from vzdump_hook.node.job import node_name
from vzdump_hook.phase.runner import RUN_DIR_ENV, STATE_DIR_ENV, run_phase


def make_cluster(tmp: Path) -> tuple[Path, Path]:
    pve = tmp / "pve"
    for n in (node_name(), "pve2", "pve3", "pve4"):
        (pve / "nodes" / n / "qemu-server").mkdir(parents=True)
    (pve / "nodes" / "pve2" / cluster.FILE).write_text(json.dumps({"version": "0.0.1",
                                                                   "script": "/usr/local/bin/vzdump-hook",
                                                                   "at": time.time()}))
    (pve / "nodes" / "pve4" / cluster.FILE).write_text(json.dumps({"version": cluster.installed_version(),
                                                                   "script": None, "at": time.time() - 30 * 86400}))
    cfg = tmp / "config.toml"
    cfg.write_text(f'[hook]\npve_dir = "{pve}"\n')
    return pve, cfg


def test_job_start_reports_this_node_and_check_cluster_reads_every_node(tmp_path: Path) -> None:
    pve, cfg = make_cluster(tmp_path)
    env = {configuration.CONFIG_ENV: str(cfg), RUN_DIR_ENV: str(tmp_path / "run"),
           STATE_DIR_ENV: str(tmp_path / "state")}
    assert run_phase(["job-start"], env) == 0
    mine = json.loads((pve / "nodes" / node_name() / cluster.FILE).read_text())
    assert mine["version"] == cluster.installed_version()
    r = CliRunner().invoke(cli, ["check", "--cluster", "--config", str(cfg)])
    assert r.exit_code == 1, r.output
    lines = dict(line.split(": ", 1) for line in r.output.splitlines())
    assert lines[node_name()].startswith(f"vzdump-hook {cluster.installed_version()} (reported ")
    assert lines["pve2"].startswith(f"PROBLEM: runs vzdump-hook 0.0.1, this node {cluster.installed_version()}")
    assert lines["pve3"] == "PROBLEM: no report: vzdump-hook not installed, or it has not run a job or `check` since"
    assert lines["pve4"].startswith("PROBLEM: last report 30 days old")


def test_an_unchanged_recent_report_is_not_rewritten(tmp_path: Path) -> None:
    pve, _ = make_cluster(tmp_path)
    cluster.report(str(pve), node_name(), vzdump_conf=str(tmp_path / "none"))
    path = pve / "nodes" / node_name() / cluster.FILE
    before = path.stat().st_mtime_ns
    cluster.report(str(pve), node_name(), vzdump_conf=str(tmp_path / "none"))
    assert path.stat().st_mtime_ns == before
    (tmp_path / "vzdump.conf").write_text("script: /usr/local/bin/vzdump-hook\n")
    cluster.report(str(pve), node_name(), vzdump_conf=str(tmp_path / "vzdump.conf"))
    assert json.loads(path.read_text())["script"] == "/usr/local/bin/vzdump-hook"


def test_not_a_pve_node_writes_nothing(tmp_path: Path) -> None:
    cluster.report(str(tmp_path / "nopve"), "n1")
    assert not (tmp_path / "nopve").exists()


def test_answers_about_guests_recovery_are_forgotten_after_an_upgrade(tmp_path: Path) -> None:
    from vzdump_hook.node.state import RECHECK_GAP, forget_recovery_answers, keep_recovery_answer, recovery_answer

    now = time.time()
    state = str(tmp_path / "state")
    keep_recovery_answer(state, 101, "current", now)
    keep_recovery_answer(state, 102, "NOT INSTALLED", now - RECHECK_GAP - 1)
    assert recovery_answer(state, 101, now) == "current" and recovery_answer(state, 102, now) is None  # too old
    forget_recovery_answers(state, unless_version="1.0")  # first stamp: everything from before is stale
    assert recovery_answer(state, 101, now) is None
    keep_recovery_answer(state, 101, "current", now)
    forget_recovery_answers(state, unless_version="1.0")  # same version: kept
    assert recovery_answer(state, 101, now) == "current"
    forget_recovery_answers(state, unless_version="1.1")  # upgraded
    assert recovery_answer(state, 101, now) is None
    keep_recovery_answer(state, 101, "current", now)
    forget_recovery_answers(state, 101)  # guest install
    assert recovery_answer(state, 101, now) is None
