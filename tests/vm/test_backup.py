"""A real point-in-time copy of the VM's disk, taken where vzdump takes it, read back with PostgreSQL.

The installed hook runs exactly as vzdump runs it (tests/infra/vzdump.py), QEMU snapshot mode, over ssh
to the VM, whose own Docker engine runs a compose PostgreSQL 15 under a write load from inside the VM.
At the stand-in's point in time the test does what vzdump does for a VM with the agent enabled:
``guest-fsfreeze-freeze`` through the real agent, start QEMU's backup job (upstream QEMU has no
Proxmox ``backup``; ``blockdev-backup`` ``sync=full`` is the same copy-before-write job: the copy is
the disk as it was when the job started), ``guest-fsfreeze-thaw``; the transfer is the job running to its
end. The copy is a raw ext4 disk; PGDATA is taken out of it with ``debugfs`` (no mount, no loop
device) and started by a throw-away PostgreSQL on the host:

- with the hook it starts clean ("database system was shut down at") and holds every row the writer
  had acknowledged before the point in time;
- without the hook (negative control) it needs crash recovery.

The same copy booted as a VM is a restored backup: the guest-side recovery (installed with
``vzdump-hook guest install``'s installer) starts the stack at its first boot, from the marker inside.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.infra import vm_compose
from tests.infra.compose import ComposeProject
from tests.infra.vm import TestVm, VmError
from tests.infra.vzdump import Context, GuestSpec, GuestType, JobResult, JobStatus, Mode, run_job
from tests.integration.hookenv import HookSetup, installed_hook
from tests.integration.test_consistency import CLEAN_START, restore
from tests.vm.conftest import VMID, MuxVm
from vzdump_hook import config as configuration
from vzdump_hook.guest.install import Installer, Layout

pytestmark = pytest.mark.integration
MARKER = "/var/lib/vzdump-hook/marker.json"
ACKED = "/run/vzdh-acked"  # the in-VM writer appends each acknowledged id here (tmpfs: not in the copy)


@dataclass
class App:
    project: ComposeProject

    def acked(self, vm: TestVm) -> set[int]:
        return {int(x) for x in vm.ok(f"cat {ACKED} 2>/dev/null || true").split()}


# The writer: bash in the VM, one psql session at a time (a coproc), not one psql per row. Each row is
# `insert ... returning id` in autocommit; psql prints the id once the server reported the command complete,
# which PostgreSQL does after the commit (as `psql -c` exits 0 only then): an id is appended to ACKED only after
# its row committed, and one that is not echoed back (error, lost connection: ON_ERROR_STOP, psql exits) is never
# acknowledged. When PostgreSQL stops, the session ends; the writer opens a new one once the socket is back and
# goes on with the next id. `read -t` on a fifo nobody writes is a sleep without a fork: PAUSE between rows.
# Under TCG this writes ~9 rows/s at ~0.2 CPU against ~2.5 rows/s at a whole CPU for a psql per row.
PAUSE = 0.1
WRITER = r"""
trap '' PIPE
rm -f {tick}; mkfifo {tick}; exec 5<>{tick}
i=0
while :; do
  if [ -S {socket} ]; then
    coproc PG {{ exec {psql} -v ON_ERROR_STOP=1 2>/dev/null; }}
    while i=$((i+1)) && echo "insert into t(id) values ($i) returning id;" >&"${{PG[1]}}" &&
          IFS= read -r id <&"${{PG[0]}}" && [ "$id" = "$i" ]; do
      echo $i >> {acked}
      read -t {pause} -u 5
    done
    kill "$PG_PID" 2>/dev/null; wait
  fi
  read -t 0.2 -u 5
done
"""


@pytest.fixture(scope="module")
def app(vm: TestVm) -> Iterator[App]:
    """PostgreSQL in the VM's docker, table t, a writer in the VM acknowledging rows (one for the module:
    setting it up costs minutes under TCG; each test leaves it running and writing)."""
    project = vm_compose.make(vm, "pg", {"db": "postgres"})
    vm_compose.up(vm, project)
    vm_compose.wait_pg_ready(vm, project)
    vm_compose.psql(vm, project, "create table t (id bigint primary key)")
    psql = shlex.join([f"{vm_compose.PG_BIN}/psql", "-XAtq", "-h", str(project.socket_dir()), "-U", "postgres"])
    script = WRITER.format(psql=psql, acked=ACKED, pause=PAUSE, tick="/run/vzdh-writer.tick",
                           socket=shlex.quote(str(project.socket_dir() / ".s.PGSQL.5432")))
    vm.ok(f"rm -f {ACKED}; setsid nohup bash -c {shlex.quote(script)} >/dev/null 2>&1 < /dev/null "
          f"& echo $! > /run/vzdh-writer.pid")
    a = App(project)
    until = time.monotonic() + 60
    while len(a.acked(vm)) < 20:
        assert time.monotonic() < until, "the writer in the VM does not get rows in"
        time.sleep(0.5)
    try:
        yield a
    finally:
        vm.ssh("kill -- -$(cat /run/vzdh-writer.pid) 2>/dev/null; rm -f /run/vzdh-writer.pid /run/vzdh-writer.tick")
        vm_compose.remove(vm, project)
        vm.ssh(f"rm -f {MARKER} {ACKED}")


@dataclass
class Copy:
    """What the point in time saw, and where the copy is."""

    disk: Path
    acked: set[int] | None = None
    pg_running: bool | None = None
    job_started: float | None = None


def play(vm: TestVm, app: App, setup: HookSetup, copy: Copy) -> JobResult:
    """A vzdump job for the VM in snapshot mode whose point in time is a real QEMU backup job."""

    def acked() -> set[int]:
        return app.acked(vm)

    def at_point_in_time(ctx: Context) -> None:
        copy.acked = acked()
        copy.pg_running = "db" in vm_compose.running_services(vm, app.project)
        # the target: a sparse raw file; zeroes are punched, not written (6 GiB disk, ~1.5 GiB of data)
        size = next(b["inserted"]["image"]["virtual-size"] for b in vm.qmp("query-block")
                    if b["device"] == "drive-virtio0")
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(copy.disk), str(size)], check=True, timeout=60)
        vm.qmp("blockdev-add", {"driver": "raw", "node-name": "vzdh-copy", "discard": "unmap", "detect-zeroes": "unmap",
                                "file": {"driver": "file", "filename": str(copy.disk), "discard": "unmap"}})
        vm.qga.call("guest-fsfreeze-freeze", timeout=60)
        try:
            vm.qmp("blockdev-backup", {"job-id": "vzdh-pit", "device": "drive0", "target": "vzdh-copy",
                                       "sync": "full", "auto-dismiss": False})
            copy.job_started = time.time()
        finally:
            vm.qga.call("guest-fsfreeze-thaw", timeout=60)

    def transfer(ctx: Context) -> None:
        until = time.monotonic() + 600
        while True:
            job = {j["id"]: j for j in vm.qmp("query-jobs")}["vzdh-pit"]
            if job["status"] == "concluded":
                vm.qmp("job-dismiss", {"id": "vzdh-pit"})
                vm.qmp("blockdev-del", {"node-name": "vzdh-copy"})
                assert "error" not in job, job
                return
            assert time.monotonic() < until, f"backup job still {job['status']}"
            time.sleep(0.5)

    return run_job(installed_hook(), [GuestSpec(VMID, GuestType.QEMU, Mode.SNAPSHOT, hostname="vzdh-vm")],
                   extra_env=setup.env, timeout=300, on_point_in_time=at_point_in_time, transfer=transfer)


def pgdata_of(copy: Path, project: ComposeProject, dest: Path) -> Path:
    """PGDATA of the project's db out of the copied disk (debugfs rdump keeps owners and modes)."""
    proc = subprocess.run(["debugfs", "-R", f"rdump {project.data_dir()} {dest}", str(copy)],
                          capture_output=True, text=True, timeout=300)
    out = dest / project.data_dir().name
    if proc.returncode != 0 or not (out / "global" / "pg_control").exists():
        raise VmError(f"debugfs rdump of {project.data_dir()} failed: {proc.stderr[-1000:]}")
    return out


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vzdh-vmb-", dir="/var/tmp"))  # room for a sparse 6 GiB copy
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def setup(tmp_path: Path, vm: TestVm) -> HookSetup:
    s = HookSetup(tmp_path)
    s.hook_table = {"qmp_dir": str(vm.qmp_dir)}
    return s


def _table(project: ComposeProject, **extra: Any) -> dict[str, Any]:
    return {"marker_path": MARKER, "stacks": [project.name], "stop_timeout": 30, "resume_wait": 60,
            "ssh": {"connect_timeout": 10}, **extra}


def test_with_the_hook_the_disk_copy_starts_clean_and_boots_as_a_restored_backup(
        vm: TestVm, app: App, setup: HookSetup, scratch: Path) -> None:
    guest = configuration.validate_guest(VMID, {"ssh": {"host": vm.host, "user": "root",
                                                        "identity_file": vm.identity_file,
                                                        "known_hosts": vm.known_hosts_file}, "marker_path": MARKER})
    lines: list[str] = []
    assert Installer(guest, Layout(), lines.append, restrict=False).run(), lines
    setup.write({VMID: (vm, _table(app.project))})
    copy = Copy(scratch / "disk.raw")
    result = play(vm, app, setup, copy)
    log = result.task_log()
    assert result.status is JobStatus.OK, log
    assert f"pre-stop {VMID}: stopped {app.project.name}" in log, log
    # upstream QEMU: no query-backup, so no early resume; the stacks start at backup-end, and the log says why
    assert f"pre-stop {VMID}: early resume off (QMP query-backup: CommandNotFound: " in log, log
    assert f"backup-end {VMID}: started {app.project.name}" in log, log
    assert copy.pg_running is False and copy.acked, log
    data = pgdata_of(copy.disk, app.project, scratch)
    restored = restore(data, scratch)
    assert restored.clean, f"the copy needed crash recovery:\n{restored.log}\n{log}"
    assert restored.ids is not None and copy.acked <= restored.ids, (
        f"acknowledged rows missing: {sorted(copy.acked - (restored.ids or set()))[:5]}")
    # the app is back in the running VM
    n = len(app.acked(vm))
    until = time.monotonic() + 60
    while len(app.acked(vm)) <= n + 10:
        assert time.monotonic() < until, "the writer did not come back after the backup"
        time.sleep(0.5)
    # the copy as a restored VM: the marker in it makes the guest-side recovery start the stack at boot
    restored_vm = MuxVm(vm.image, VMID + 100, vm.qmp_dir, disk=copy.disk)
    try:
        restored_vm.start()
        until = time.monotonic() + 180
        # the marker first: a cheap test, and the recovery removes it once the stack runs (docker's CLI costs ~1 s
        # of the VM's CPU a call under TCG, taken from the boot it waits for)
        while not (restored_vm.ssh(f"test ! -e {MARKER}").returncode == 0 and
                   vm_compose.running_services(restored_vm, app.project) == {"db"}):
            assert time.monotonic() < until, restored_vm.ok("journalctl -b -u vzdump-hook-recover --no-pager "
                                                            "| tail -20")
            time.sleep(1)
        assert "vzdump-hook-recover" in restored_vm.ok("journalctl -b -u vzdump-hook-recover.service --no-pager -o cat")
    finally:
        restored_vm.close()


def test_negative_control_without_the_hook_the_disk_copy_needs_crash_recovery(
        vm: TestVm, app: App, setup: HookSetup, scratch: Path) -> None:
    setup.write({VMID: (vm, _table(app.project, enabled=False))})
    copy = Copy(scratch / "disk.raw")
    result = play(vm, app, setup, copy)
    assert result.status is JobStatus.OK, result.task_log()
    assert copy.pg_running is True
    restored = restore(pgdata_of(copy.disk, app.project, scratch), scratch)
    assert any(s in restored.log for s in ("database system was interrupted", "not properly shut down",
                                           "redo starts")), restored.log
    assert CLEAN_START not in restored.log
