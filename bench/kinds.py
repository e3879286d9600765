#!/usr/bin/env python3
"""App downtime by stack kind, LXC snapshot mode: a native PostgreSQL 15 under systemd (kind systemd)
next to the same PostgreSQL in a compose project (kind compose).

Both guests are reached with `pct exec` (the pct stand-in, tests/infra/pct_standin.py): the systemd one
is a Debian 12 root booted with systemd-nspawn (tests/infra/systemd_guest.py; Debian's
postgresql@15-main, stopped and started by the hook with systemctl), the compose one a namespace
container whose docker is the host's engine (vzdh/postgres:15, stopped and started with docker
compose). The installed hook is played by the vzdump stand-in with a simulated transfer of --transfer
seconds; a thread polls each PostgreSQL with pg_isready every 50 ms from the host, under a light write
load (one INSERT per connection every 20 ms). App downtime = from the start of pre-stop to the first
poll that finds PostgreSQL accepting connections again.

Run as root from the repository: ``python3 bench/kinds.py [--runs 3] [--transfer 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

# first: puts the repository on sys.path
from _common import Load, PgPoller, machine, need_root, pg_ready, reproduce, scratch_dir

from tests.infra import compose
from tests.infra.compose import PG_BIN
from tests.infra.pct_standin import NsContainer, make_pct
from tests.infra.systemd_guest import SystemdGuest, support_problem
from tests.infra.vzdump import Context, GuestSpec, GuestType, Mode, Moment, run_job
from tests.integration.hookenv import installed_hook

COMPOSE_VMID, SYSTEMD_VMID = 101, 182
SOCK = "/var/lib/postgresql/vzdh-sock"


def prepare_pg(root: Path) -> None:
    """Before the boot: the native PostgreSQL also listens in SOCK (on the guest's disk: the host's
    psql reaches it) and trusts local connections."""
    import shutil

    uid, gid = next((int(f[2]), int(f[3]))
                    for f in (ln.split(":") for ln in (root / "etc/passwd").read_text().splitlines())
                    if f[0] == "postgres")
    sock = root / SOCK.lstrip("/")
    sock.mkdir(mode=0o775)
    shutil.chown(sock, uid, gid)
    (root / "etc/postgresql/15/main/conf.d/vzdh.conf").write_text(
        f"unix_socket_directories = '/var/run/postgresql,{SOCK}'\n")
    hba = root / "etc/postgresql/15/main/pg_hba.conf"
    hba.write_text("local all all trust\n" + hba.read_text())


def measure(hook: str, env: dict[str, str], vmid: int, poller: PgPoller, transfer: float,
            socket_dir: Path) -> tuple[float, float, str]:
    """(downtime, point in time after the stop, note) of one LXC snapshot job."""
    marks: dict[str, float] = {}

    def on_phase(phase: str, ctx: Context) -> None:
        if phase == "pre-stop" and ctx.moment is Moment.BEFORE_PHASE:
            marks["stop"] = ctx.time

    def on_pit(ctx: Context) -> None:
        marks["pit"] = ctx.time

    result = run_job(hook, [GuestSpec(vmid, GuestType.LXC, Mode.SNAPSHOT)], extra_env=env, transfer_seconds=transfer,
                     timeout=300, on_phase=on_phase, on_point_in_time=on_pit)
    pg_ready(socket_dir)
    time.sleep(0.2)  # a few polls past the recovery
    t0 = marks.get("stop", float("nan"))
    samples = poller.window(t0, time.monotonic())
    down = [i for i, (_, ok) in enumerate(samples) if not ok]
    if not down or not result.ok:
        return (float("nan"), float("nan"),
                "no poll saw PostgreSQL down" if result.ok else f"job {result.status.value}: {result.error}")
    up = next((t for t, ok in samples[down[-1] + 1:] if ok), float("nan"))
    return up - t0, marks.get("pit", t0) - t0, ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transfer", type=float, default=5.0, help="simulated archive transfer, seconds (default 5)")
    parser.add_argument("--runs", type=int, default=3, help="runs per kind; the median is shown (default 3)")
    args = parser.parse_args(argv)
    need_root()
    problem = support_problem()
    if problem:
        sys.exit(f"kinds.py: {problem}")
    print(f"reproduce: {reproduce('kinds.py', sys.argv[1:] if argv is None else argv)}")
    print(machine(), flush=True)
    hook = installed_hook()
    results: dict[str, list[tuple[float, float, str]]] = {"compose": [], "systemd": []}
    with scratch_dir("vzdh-bench-kinds-") as tmp:
        ct = NsContainer(COMPOSE_VMID, tmp / "ct")
        sd = SystemdGuest(SYSTEMD_VMID, tmp / "sd", prepare=prepare_pg)
        project = compose.make_project("bench", {"db": "postgres"}, workdir=tmp / "p")
        pollers: dict[str, PgPoller] = {}
        loads: list[Load] = []
        try:
            compose.up(project)
            compose.wait_pg_ready(project, timeout=60)
            sockets = {"compose": project.socket_dir(), "systemd": sd.file(SOCK)}
            pg_ready(sockets["systemd"])
            for kind, sock in sockets.items():
                subprocess.run([f"{PG_BIN}/psql", "-Xq", "-h", str(sock), "-U", "postgres",
                                "-c", "create table t (id bigserial primary key, v int)"],
                               check=True, capture_output=True)
                pollers[kind] = PgPoller(sock)
                pollers[kind].start()
                loads.append(Load(sock))
                loads[-1].start()
            cfg = tmp / "config.toml"
            cfg.write_text(
                f'[hook]\npve_dir = "{tmp / "pve"}"\n'
                f'[guests.{COMPOSE_VMID}]\ntransport = "pct"\npct = {{ path = "{make_pct(tmp / "ct")}" }}\n'
                f'stacks = ["{project.name}"]\ncompose_command = "docker compose"\nstop_timeout = 30\n'
                f'[guests.{SYSTEMD_VMID}]\ntransport = "pct"\npct = {{ path = "{make_pct(tmp / "sd")}" }}\n'
                f'stacks = [{{ kind = "systemd", name = "pg", units = ["postgresql@15-main.service"] }}]\n'
                'stop_timeout = 30\n')
            env = {"VZDUMP_HOOK_CONFIG": str(cfg), "VZDUMP_HOOK_RUN_DIR": str(tmp / "run"),
                   "VZDUMP_HOOK_STATE_DIR": str(tmp / "state")}
            time.sleep(1)
            for run in range(args.runs):
                for kind, vmid in (("compose", COMPOSE_VMID), ("systemd", SYSTEMD_VMID)):
                    m = measure(hook, env, vmid, pollers[kind], args.transfer, sockets[kind])
                    results[kind].append(m)
                    print(f"  {kind:8} run {run + 1}: down {m[0]:5.2f} s "
                          f"(point in time {m[1]:4.2f} s after the stop){'  ! ' + m[2] if m[2] else ''}", flush=True)
                    time.sleep(1)
        finally:
            for p in pollers.values():
                p.halt()
            for load in loads:
                load.halt()
            compose.down(project, remove_dir=False)
            sd.close()
            ct.close()

    def med(kind: str, i: int) -> float:
        values = [m[i] for m in results[kind] if not m[2]]
        return statistics.median(values) if values else float("nan")

    print()
    print("App downtime (s), LXC snapshot, pre-stop start -> PostgreSQL accepts connections again "
          "(pg_isready every 50 ms);")
    print(f"both guests through pct exec; transfer {args.transfer:g} s; "
          f"write load one INSERT per connection every 20 ms; median of {args.runs} run(s)")
    print(f"{'kind':8}  {'downtime':>8}  {'PIT after stop':>14}")
    for kind in results:
        print(f"{kind:8}  {med(kind, 0):8.2f}  {med(kind, 1):12.2f} s")
    diff = med("systemd", 0) - med("compose", 0)
    print(f"systemd - compose: {diff:+.2f} s (target: at most +0.10 s)")
    return 0 if all(not m[2] for ms in results.values() for m in ms) else 1


if __name__ == "__main__":
    sys.exit(main())
