#!/usr/bin/env python3
"""Per-stack strategies (issue 11), LXC snapshot mode, a compose PostgreSQL 15 reached with `pct exec`
(the pct stand-in; the guest's docker is the host's engine), under the consistency tests' write load
(one INSERT per connection every 20 ms):

- **before_stop = CHECKPOINT.** PostgreSQL runs with shared_buffers large enough to hold the whole
  table, and checkpoints only on request (checkpoint_timeout 1 h, max_wal_size 16 GB). Before each run
  an UPDATE of every row leaves the table dirty in shared_buffers, so the shutdown checkpoint has all
  of it to write. App downtime as a client sees it (pg_isready every 50 ms from the host: the first
  failed poll after pre-stop began to the first successful one), with and without
  `before_stop = ["docker", "exec", ..., "psql", "-c", "CHECKPOINT"]`, alternating, in the same run.
- **ready.** With `ready = { command = ["pg_isready", ...] }` (the guest's pg_isready on the server's
  socket), the downtime the hook reports (its host record: from the first failed check during the stop
  to the first successful check after the start) next to the one the client measured in the same job;
  and the same pair without `ready` (the hook's downtime then runs from the stop command to the
  containers running).

Run as root from the repository: ``python3 bench/strategies.py [--runs 3] [--transfer 3] [--rows 2000000]``.
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
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
from tests.infra.vzdump import Context, GuestSpec, GuestType, Mode, Moment, run_job
from tests.integration.hookenv import installed_hook, toml_value

VMID = 101
PG_ARGS = ["-c", "shared_buffers=1GB", "-c", "checkpoint_timeout=1h", "-c", "max_wal_size=16GB",
           "-c", "min_wal_size=1GB"]


def psql(sock: Path, sql: str, timeout: float = 600) -> str:
    return subprocess.run([f"{PG_BIN}/psql", "-Xqt", "-h", str(sock), "-U", "postgres", "-c", sql], check=True,
                          capture_output=True, text=True, timeout=timeout).stdout.strip()


WALL = time.time() - time.monotonic()  # monotonic -> wall clock (the hook's records are wall clock)


def client_window(poller: PgPoller, t0: float, t1: float) -> tuple[float, float]:
    """(first failed poll after t0, first successful poll after the last failure), wall clock (nan: none failed)."""
    samples = poller.window(t0, t1)
    down = [i for i, (_, ok) in enumerate(samples) if not ok]
    if not down:
        return float("nan"), float("nan")
    up = next((t for t, ok in samples[down[-1] + 1:] if ok), float("nan"))
    return samples[down[0]][0] + WALL, up + WALL


def one_job(hook: str, env: dict[str, str], run_dir: Path, poller: PgPoller, sock: Path,
            transfer: float) -> tuple[float, float, str, float, float]:
    """(client-measured downtime, hook-reported downtime, problem, hook's start - client's, hook's end -
    client's) of one LXC snapshot job."""
    shutil.rmtree(run_dir, ignore_errors=True)
    marks: dict[str, float] = {}

    def on_phase(phase: str, ctx: Context) -> None:
        if phase == "pre-stop" and ctx.moment is Moment.BEFORE_PHASE:
            marks["stop"] = ctx.time

    result = run_job(hook, [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=env, transfer_seconds=transfer,
                     timeout=600, on_phase=on_phase)
    pg_ready(sock)
    time.sleep(0.3)  # a few polls past the start
    nan = float("nan")
    if not result.ok:
        return nan, nan, f"job {result.status.value}: {result.error}", nan, nan
    rec = json.loads(Path(glob.glob(str(run_dir / "jobs" / "*" / f"guest-{VMID}.json"))[0]).read_text())
    start = rec["app_down_at"] if rec.get("app_down_at") is not None else rec["stop_started"]  # as the hook counts it
    down, up = client_window(poller, marks["stop"], time.monotonic())
    return up - down, rec["resumed_at"] - start, "", start - down, rec["resumed_at"] - up


def write_config(path: Path, tmp: Path, pct: str, stack: dict[str, object]) -> None:
    path.write_text(f'[hook]\npve_dir = "{tmp / "pve"}"\n'
                    f'[guests.{VMID}]\ntransport = "pct"\npct = {{ path = "{pct}" }}\n'
                    f'stacks = [{toml_value(stack)}]\ncompose_command = "docker compose"\nstop_timeout = 120\n')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3,
                        help="runs per variant, alternating; the median is shown (default 3)")
    parser.add_argument("--transfer", type=float, default=3.0, help="simulated archive transfer, seconds (default 3)")
    parser.add_argument("--variants", default="plain,checkpoint,ready",
                        help="which variants to run (default: plain,checkpoint,ready)")
    parser.add_argument("--rows", type=int, default=2_000_000,
                        help="rows of the table dirtied before each run (default 2000000, about 250 MB)")
    args = parser.parse_args(argv)
    need_root()
    print(f"reproduce: {reproduce('strategies.py', sys.argv[1:] if argv is None else argv)}")
    print(machine(), flush=True)
    hook = installed_hook()
    with scratch_dir("vzdh-bench-strat-") as tmp:
        ct = NsContainer(VMID, tmp / "ct")
        project = compose.make_project("strat", {"db": {"kind": "postgres", "command": PG_ARGS}}, workdir=tmp / "p")
        poller: PgPoller | None = None
        load: Load | None = None
        results: dict[str, list[tuple[float, float, str, float, float]]] = {"plain": [], "checkpoint": [], "ready": []}
        try:
            compose.up(project)
            sock = project.socket_dir()
            pg_ready(sock)
            ctr = subprocess.run(["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={project.name}"],
                                 check=True, capture_output=True, text=True).stdout.split()[0]
            print(f"shared_buffers {psql(sock, 'show shared_buffers')}; filling {args.rows} rows ...", flush=True)
            psql(sock, "create table w (id bigserial primary key, v int)")
            psql(sock, "create table t as select g as id, 0 as v, repeat('x', 100) as pad "
                       f"from generate_series(1, {args.rows}) g")
            psql(sock, "checkpoint")
            size = psql(sock, "select pg_size_pretty(pg_relation_size('t'))")
            pct = make_pct(tmp / "ct")
            exec_ = ["docker", "exec", ctr]
            stacks: dict[str, dict[str, object]] = {
                "plain": {"name": project.name},
                "checkpoint": {"name": project.name,
                               "before_stop": [*exec_, "psql", "-Xq", "-h", "/run/postgresql", "-U", "postgres",
                                               "-c", "CHECKPOINT"],
                               "before_stop_timeout": 300},
                # the guest's own pg_isready on the server's socket (what a native or port-published PostgreSQL allows)
                "ready": {"name": project.name,
                          "ready": {"command": [f"{PG_BIN}/pg_isready", "-q", "-h", str(sock), "-U", "postgres",
                                                "-t", "1"]}},
            }
            configs = {}
            for name, stack in stacks.items():
                configs[name] = tmp / f"{name}.toml"
                write_config(configs[name], tmp, pct, stack)
            poller = PgPoller(sock)
            poller.start()
            load = Load(sock, "w")
            load.start()
            chosen = [v for v in args.variants.split(",") if v in stacks]
            for run in range(args.runs):
                for name in chosen:
                    # every row dirty in shared_buffers (no checkpoint runs by itself)
                    t0 = time.monotonic()
                    psql(sock, "update t set v = v + 1")
                    dirtied = time.monotonic() - t0
                    run_dir = tmp / f"run-{name}"
                    env = {"VZDUMP_HOOK_CONFIG": str(configs[name]), "VZDUMP_HOOK_RUN_DIR": str(run_dir),
                           "VZDUMP_HOOK_STATE_DIR": str(tmp / "state")}
                    m = one_job(hook, env, run_dir, poller, sock, args.transfer)
                    results[name].append(m)
                    print(f"  {name:10} run {run + 1}: client {m[0]:5.2f} s, hook reports {m[1]:5.2f} s "
                          f"(its start {m[3]:+.2f} s, its end {m[4]:+.2f} s from the client's; "
                          f"table dirtied in {dirtied:.1f} s){'  ! ' + m[2] if m[2] else ''}", flush=True)
        finally:
            if poller is not None:
                poller.halt()
            if load is not None:
                load.halt()
            compose.down(project, remove_dir=False)
            ct.close()

    def med(name: str, i: int) -> float:
        values = [m[i] for m in results[name] if not m[2]]
        return statistics.median(values) if values else float("nan")

    print()
    print("LXC snapshot through pct exec, compose PostgreSQL 15 (shared_buffers 1GB, checkpoints on request only), "
          f"table {size} dirtied before each job, write load one INSERT per connection every 20 ms, "
          f"transfer {args.transfer:g} s; median of {args.runs} run(s)")
    print(f"{'variant':24}  {'client-measured':>15}  {'hook-reported':>13}  {'reported - client':>17}")
    labels = {"plain": "no strategy", "checkpoint": "before_stop = CHECKPOINT", "ready": "ready = pg_isready"}
    for name in [n for n in results if results[n]]:
        print(f"{labels[name]:24}  {med(name, 0):13.2f} s  {med(name, 1):11.2f} s  "
              f"{med(name, 1) - med(name, 0):+15.2f} s")
    plain, ckpt = med("plain", 0), med("checkpoint", 0)
    print(f"before_stop = CHECKPOINT: client-measured downtime {100 * (1 - ckpt / plain):.0f}% shorter "
          "(target: at least 30%)")
    diff = abs(med("ready", 1) - med("ready", 0))
    print(f"ready: hook-reported vs client-measured differ by {diff:.2f} s (target: within 0.2 s)")
    return 0 if all(not m[2] for ms in results.values() for m in ms) else 1


if __name__ == "__main__":
    sys.exit(main())
