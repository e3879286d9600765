"""Application consistency of a native PostgreSQL 15 under systemd (Debian's postgresql@15-main, no
container anywhere), proven as tests/integration/test_consistency.py proves it for compose: the installed
hook, run exactly as vzdump runs it (tests/infra/vzdump.py), against a guest whose init is a real
systemd (tests/infra/systemd_guest.py, reached with the `pct` stand-in), under a steady write load.

PGDATA (/var/lib/postgresql/15/main in the guest) is copied at the stand-in's point in time, and a
throw-away PostgreSQL started on the copy: without the hook it needs crash recovery (the negative
control); with a stack of kind systemd listing postgresql@15-main.service it starts clean and holds every
row whose INSERT was acknowledged before the stop began, and PostgreSQL serves the writer again after.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.infra.pct_standin import make_pct
from tests.infra.systemd_guest import SystemdGuest, support_problem
from tests.infra.vzdump import Context, GuestSpec, GuestType, JobStatus, Mode, run_job
from tests.integration.hookenv import installed_hook
from tests.integration.test_consistency import CLEAN_START, PG_BIN, PG_UID, Restored, Writer, restore

pytestmark = pytest.mark.integration

VMID = 182
UNIT = "postgresql@15-main.service"
PGDATA = "/var/lib/postgresql/15/main"
SOCK = "/var/lib/postgresql/vzdh-sock"  # a second socket directory, on the guest's disk: the host's psql reaches it
TRANSFER = 1.0


def _prepare(root: Path) -> None:
    """Before the boot: PostgreSQL also listens in SOCK and trusts local connections (the test's writer)."""
    uid, gid = next((int(f[2]), int(f[3]))
                    for f in (ln.split(":") for ln in (root / "etc/passwd").read_text().splitlines())
                    if f[0] == "postgres")
    sock = root / SOCK.lstrip("/")
    sock.mkdir(mode=0o775)
    shutil.chown(sock, uid, gid)
    (root / "etc/postgresql/15/main/conf.d/vzdh.conf").write_text("unix_socket_directories = "
                                                                  f"'/var/run/postgresql,{SOCK}'\n")
    hba = root / "etc/postgresql/15/main/pg_hba.conf"
    hba.write_text("local all all trust\n" + hba.read_text())


@pytest.fixture(scope="module")
def pg_guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemdGuest]:
    problem = support_problem()
    if problem:
        pytest.skip(problem)
    g = SystemdGuest(VMID, tmp_path_factory.mktemp("sdpg"), prepare=_prepare)
    try:
        assert g.state(UNIT) == "active", g.console_tail()
        psql(g, "create table t (id bigint primary key, at timestamptz not null default now())")
        yield g
    finally:
        g.close()


def psql(g: SystemdGuest, sql: str) -> str:
    r = subprocess.run([f"{PG_BIN}/psql", "-XAtq", "-h", str(g.file(SOCK)), "-U", "postgres", "-c", sql],
                       capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.fixture
def writer(pg_guest: SystemdGuest) -> Iterator[Writer]:
    psql(pg_guest, "truncate t")  # each writer counts from 1
    w = Writer(pg_guest.file(SOCK))
    w.start()
    until = time.monotonic() + 30
    while w.acked_count() <= 20:
        assert time.monotonic() < until, "the writer does not get rows in"
        time.sleep(0.05)
    yield w
    w.halt()


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vzdh-sdcons-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class PointInTime:
    """Copies PGDATA at the stand-in's point in time; notes what was acknowledged before, and whether
    PostgreSQL ran."""

    def __init__(self, g: SystemdGuest, w: Writer, dest: Path) -> None:
        self.g, self.w, self.dest = g, w, dest
        self.at: float | None = None
        self.acked: set[int] = set()
        self.pg_state = ""

    def __call__(self, ctx: Context) -> None:
        self.at = time.monotonic()
        self.acked = self.w.acked_until(self.at)
        self.pg_state = self.g.state(UNIT)
        subprocess.run(["cp", "-a", str(self.g.file(PGDATA)), str(self.dest)], capture_output=True, timeout=120)


def restored_copy(copy: Path, scratch: Path) -> Restored:
    """The copy started by a throw-away server: Debian keeps the cluster's config in /etc, so the copy
    gets an empty postgresql.conf and a trusting pg_hba.conf, and the data owner's uid."""
    (copy / "postgresql.conf").write_text("")
    (copy / "pg_hba.conf").write_text("local all all trust\n")
    subprocess.run(["chown", "-R", f"{PG_UID}:{PG_UID}", str(copy)], check=True)
    return restore(copy, scratch)


def job(g: SystemdGuest, tmp: Path, scratch: Path, w: Writer, vmtype: str, mode: str,
        configured: bool) -> tuple[str, PointInTime, float, JobStatus]:
    """One vzdump job for the guest, the hook configured for it (or for another vmid); the log, the point
    in time, when pre-stop began, the job's status."""
    stack = f'{{ kind = "systemd", name = "pg", units = ["{UNIT}"] }}'
    cfg = tmp / "config.toml"
    cfg.write_text(f'[hook]\npve_dir = "{tmp / "pve"}"\n[guests.{VMID if configured else VMID + 1}]\n'
                   'transport = "pct"\n'
                   f'pct = {{ path = "{make_pct(g.workdir)}" }}\nstacks = [{stack}]\nstop_timeout = 20\n')
    env = {"VZDUMP_HOOK_CONFIG": str(cfg), "VZDUMP_HOOK_RUN_DIR": str(tmp / "run"),
           "VZDUMP_HOOK_STATE_DIR": str(tmp / "state")}
    pit = PointInTime(g, w, scratch / "copy")
    began: list[float] = []

    def on_phase(phase: str, ctx: Context) -> None:
        if phase == "pre-stop" and not began:
            began.append(ctx.time)

    result = run_job(installed_hook(), [GuestSpec(VMID, GuestType(vmtype), Mode(mode))], extra_env=env,
                     transfer_seconds=TRANSFER, timeout=120, on_point_in_time=pit, on_phase=on_phase)
    return result.task_log(), pit, began[0] if began else 0.0, result.status


def test_negative_control_without_the_hook_the_copy_needs_crash_recovery(pg_guest: SystemdGuest, writer: Writer,
                                                                         tmp_path: Path, scratch: Path) -> None:
    log, pit, _, status = job(pg_guest, tmp_path, scratch, writer, "lxc", "snapshot", configured=False)
    assert status is JobStatus.OK, log
    assert pit.pg_state == "active", log
    restored = restored_copy(scratch / "copy", scratch)
    assert restored.crash_recovery and CLEAN_START not in restored.log, restored.log


@pytest.mark.parametrize(("vmtype", "mode"), [("lxc", "snapshot"), ("qemu", "snapshot")])
def test_with_the_hook_the_copy_starts_clean_and_holds_every_acknowledged_row(
        pg_guest: SystemdGuest, writer: Writer, tmp_path: Path, scratch: Path, vmtype: str, mode: str) -> None:
    log, pit, stop_began, status = job(pg_guest, tmp_path, scratch, writer, vmtype, mode, configured=True)
    assert status is JobStatus.OK, log
    assert f"pct {VMID} answers, will stop pg (no compose)" in log and f"pre-stop {VMID}: stopped pg" in log, log
    assert pit.pg_state in ("inactive", "failed") and pit.at is not None, log
    restored = restored_copy(scratch / "copy", scratch)
    assert restored.clean, f"the copy needed crash recovery:\n{restored.log}\n{log}"
    assert restored.ids is not None
    assert writer.acked_until(stop_began) <= pit.acked and len(pit.acked) > 20, (
        stop_began, pit.at, min(writer.acked_until(stop_began) - pit.acked), log)
    missing = pit.acked - restored.ids
    assert not missing, f"{len(missing)} acknowledged rows missing from the copy, e.g. {sorted(missing)[:5]}"
    assert restored.ids <= writer.sent_ids()
    # PostgreSQL runs again and takes rows: the writer gets more in than the copy holds
    assert pg_guest.state(UNIT) == "active"
    until = time.monotonic() + 30
    while writer.acked_count() <= len(restored.ids) + 10:
        assert time.monotonic() < until, f"the writer did not come back\n{log}"
        time.sleep(0.05)
    assert not pg_guest.file("/var/lib/vzdump-hook/marker.json").exists()
