#!/usr/bin/env python3
"""App downtime per backup type/mode: vzdump-hook vs. the baseline "resume at backup-end".

A compose PostgreSQL 15 in a test guest (sshd in a network namespace, tests/infra) under a light
write load; the installed vzdump-hook is played by the vzdump stand-in (tests/infra/vzdump.py) with a
simulated archive transfer of --transfer seconds (default 20). A thread polls PostgreSQL from the host
every 50 ms with pg_isready. App downtime = from the start of the hook's pre-stop (the stop is issued)
to the first poll that finds PostgreSQL accepting connections again.

Baseline, same run, same guest, same hook code: vzdump-hook behind a small sh wrapper that drops
pre-restart/post-restart calls made before backup-end, so no stack can be started before backup-end,
as a hook that "stops at pre-stop, starts at backup-end" does. Where the hook itself resumes at or
after backup-end (LXC stop) both columns measure the same thing; the ratio shows where the early
resume pays off.

QEMU: the point in time is the start of QEMU's backup job, which the hook learns from QMP
`query-backup` (its resident, vzdump_hook/resident/process.py, with qemu/watcher.py). QEMU's QMP socket is played by
the QMP double (tests/infra/qmp_double.py, `[hook] qmp_dir`): the stand-in's point in time starts the
job in it (qemu stop: vzdump's shutdown removes the socket, the paused restart brings it back). QEMU
already ran a backup job before (a leftover, which must not count). The baseline runs with
`early_resume = false`, so the QEMU rows compare the early resume with resume-at-backup-end.

Run as root from the repository: ``python3 bench/downtime.py [--transfer 20] [--runs 1]``.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from _common import PgPoller, machine, need_root, reproduce, scratch_dir  # first: puts the repository on sys.path

from tests.infra import compose
from tests.infra.compose import PG_BIN, ComposeProject
from tests.infra.guest import TestGuest
from tests.infra.qmp_double import QmpDouble
from tests.infra.vzdump import Context, GuestSpec, GuestType, JobResult, Mode, Moment, run_job
from tests.integration.hookenv import HookSetup, installed_hook

VMID = 101
ORDERS = ["lxc-snapshot", "lxc-suspend", "lxc-stop", "qemu-snapshot", "qemu-stop"]

BASELINE_WRAPPER = """#!/bin/sh
# Baseline for bench/downtime.py: vzdump-hook, but stacks may be started only from backup-end on.
# pre-restart/post-restart calls that come before backup-end are dropped (exit 0); those vzdump makes
# after backup-end (stop modes: restarting the guest) go through unchanged. QEMU: no early-resume
# early resume (its config has early_resume = false; its own run directory: all jobs of this benchmark
# have the same vzdump "worker", this process, so they share a job directory).
export VZDUMP_HOOK_CONFIG={config} VZDUMP_HOOK_RUN_DIR={run_dir}
flag={flagdir}/backup-end-seen.$3
case "$1" in
  backup-start) /bin/rm -f "$flag" ;;
  pre-restart|post-restart) [ -e "$flag" ] || exit 0 ;;
  backup-end) : > "$flag" ;;
esac
exec {hook} "$@"
"""


SH_HOOK = """#!/bin/sh
# The sh + OpenSSH reference for bench/downtime.py: stops the stack at pre-stop (after a synced marker
# file, as vzdump-hook does) and starts it at the earliest safe point, one `ssh` per call:
# lxc snapshot pre-restart, lxc suspend/stop post-restart, qemu backup-end (sh cannot watch QMP).
[ "$3" = {vmid} ] || exit 0
case "$1/$VMTYPE/$2" in
  pre-stop/*) exec {ssh} {stop} ;;
  pre-restart/lxc/snapshot | post-restart/lxc/suspend | post-restart/lxc/stop | backup-end/qemu/*)
    # stop modes: the guest may still be booting; try for up to 2 minutes
    i=0
    while ! {ssh} {start}; do
      i=$((i + 1)); [ $i -lt 120 ] || exit 0
      sleep 1
    done ;;
esac
exit 0
"""


def write_sh_hook(path: Path, guest: TestGuest, project: ComposeProject, marker: str) -> None:
    ssh = guest.ssh_argv()
    ssh[0] = shutil.which("ssh") or "/usr/bin/ssh"  # vzdump gives the hook no PATH
    workdir, m = shlex.quote(str(project.workdir)), shlex.quote(marker)
    stop = (f"mkdir -p $(dirname {m}) && echo {project.name} > {m}.tmp && sync {m}.tmp && mv {m}.tmp {m} "
            f"&& cd {workdir} && docker compose stop")
    start = f"cd {workdir} && docker compose start && rm -f {m}"
    path.write_text(SH_HOOK.format(vmid=VMID, ssh=shlex.join(ssh), stop=shlex.quote(stop), start=shlex.quote(start)))
    path.chmod(0o755)


class Load(threading.Thread):
    """A light write load: one INSERT (own connection) every 20 ms; failures while down are counted."""

    def __init__(self, project: ComposeProject) -> None:
        super().__init__(daemon=True, name="pg-load")
        self.project = project
        self.ok = 0
        self.failed = 0
        self._halt = threading.Event()

    def run(self) -> None:
        argv = [f"{PG_BIN}/psql", "-X", "-q", "-h", str(self.project.socket_dir()), "-U", "postgres",
                "-c", "insert into t (v) values (1)"]
        while not self._halt.is_set():
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  env={"PATH": "/usr/bin:/bin", "PGCONNECT_TIMEOUT": "2"})
            if proc.returncode == 0:
                self.ok += 1
            else:
                self.failed += 1
            self._halt.wait(0.02)

    def halt(self) -> None:
        self._halt.set()
        self.join(timeout=10)


@dataclass(frozen=True)
class Measurement:
    downtime: float  # pre-stop start -> accepting connections again
    unavailable: float  # first failed poll -> accepting connections again
    to_point_in_time: float  # pre-stop start -> the backup's point in time
    resumed_at: str  # the phase whose hook started the stack
    ok: bool
    note: str = ""
    after_pit: float = float("nan")  # the point in time (QEMU: the backup job's start) -> accepting connections again


def resumed_phase(result: JobResult) -> str:
    for r in result.records:
        if r.vmid == VMID and any(f"resident {VMID}: QEMU backup job" in line for line in r.lines):
            return "job start"  # the resident saw QEMU's backup job start
        if r.vmid == VMID and any(f"{r.phase} {VMID}: started" in line for line in r.lines):
            return str(r.phase)
    return "?"


def measure(hook: str, setup: HookSetup, guest: TestGuest, project: ComposeProject, poller: PgPoller,
            order: str, transfer: float, boot: float, qmp: QmpDouble) -> Measurement:
    vmtype, mode = order.split("-")
    marks: dict[str, float] = {}
    timers: list[threading.Timer] = []

    def on_phase(phase: str, ctx: Context) -> None:
        if phase == "pre-stop" and ctx.moment is Moment.BEFORE_PHASE:
            marks["stop"] = ctx.time
        if phase == "backup-end" and ctx.moment is Moment.BEFORE_PHASE and vmtype == "qemu" and qmp.job_started_at:
            qmp.finish_job()  # the transfer is over

    def on_pit(ctx: Context) -> None:
        marks["pit"] = ctx.time
        if vmtype == "qemu":  # vzdump's QMP `backup`: the job starts
            if not qmp.exists:
                qmp.restore()  # stop mode: vzdump started the VM paused, a new QEMU process
            qmp.start_job()

    def shutdown(ctx: Context) -> None:
        guest.stop_sshd()
        if vmtype == "qemu":
            qmp.remove()

    def start(ctx: Context) -> None:
        t = threading.Timer(boot, guest.start_sshd)
        timers.append(t)
        t.start()

    try:
        result = run_job(hook, [GuestSpec(VMID, GuestType(vmtype), Mode(mode))], extra_env=setup.env,
                         transfer_seconds=transfer, timeout=300, on_phase=on_phase, on_point_in_time=on_pit,
                         on_guest_shutdown=shutdown, on_guest_start=start)
    finally:
        for t in timers:
            t.join()
    guest.start_sshd()
    try:
        compose.wait_pg_ready(project, timeout=60)
    except TimeoutError:
        compose.start(project)  # for the next runs: each must start from a running PostgreSQL
        compose.wait_pg_ready(project, timeout=60)
        return Measurement(float("nan"), float("nan"), float("nan"), "?", False, "postgres did not come back")
    time.sleep(0.2)  # a few polls past the recovery
    t0 = marks.get("stop")
    if t0 is None:
        return Measurement(float("nan"), float("nan"), float("nan"), "?", False, "no pre-stop")
    samples = poller.window(t0, time.monotonic())
    down = [i for i, (_, ok) in enumerate(samples) if not ok]
    if not down:
        return Measurement(float("nan"), float("nan"), marks.get("pit", t0) - t0, resumed_phase(result), False,
                           "no poll saw PostgreSQL down")
    up = next((t for t, ok in samples[down[-1] + 1:] if ok), float("nan"))
    note = "" if result.ok else f"job {result.status.value}: {result.error}"
    return Measurement(up - t0, up - samples[down[0]][0], marks.get("pit", t0) - t0, resumed_phase(result),
                       result.ok, note, up - marks.get("pit", float("nan")))


def fmt(x: float) -> str:
    return "  -  " if x != x else f"{x:5.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transfer", type=float, default=20.0, help="simulated archive transfer, seconds (default 20)")
    parser.add_argument("--boot", type=float, default=2.0,
                        help="stop modes: seconds until the guest answers SSH after vzdump starts it (default 2)")
    parser.add_argument("--runs", type=int, default=1, help="runs per type/mode and variant; the median is shown")
    parser.add_argument("--orders", default=",".join(ORDERS), help=f"comma-separated subset of {','.join(ORDERS)}")
    parser.add_argument("--variants", default="hook,sh,baseline",
                        help="comma-separated subset of hook,sh,baseline (default: all)")
    parser.add_argument("--compose", choices=["v1", "v2"], default="v2")
    parser.add_argument("--no-load", action="store_true", help="no write load on PostgreSQL")
    args = parser.parse_args(argv)
    orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not set(variants) <= {"hook", "sh", "baseline"}:
        parser.error(f"unknown variant(s) in {args.variants}")
    bad = [o for o in orders if o not in ORDERS]
    if bad:
        parser.error(f"unknown order(s) {bad}; choose from {ORDERS}")
    need_root()
    print(f"reproduce: {reproduce('downtime.py', sys.argv[1:] if argv is None else argv)}")
    print(machine(), flush=True)
    hook = installed_hook()
    results: dict[tuple[str, str], list[Measurement]] = {}
    started = time.monotonic()
    with scratch_dir("vzdh-bench-") as tmp, TestGuest() as guest, QmpDouble(tmp / f"{VMID}.qmp", leftover=True) as qmp:
        project = compose.make_project("bench", {"db": "postgres"}, compose=args.compose, workdir=tmp / "p")
        load: Load | None = None
        poller = PgPoller(project.socket_dir())
        try:
            compose.up(project)
            compose.wait_pg_ready(project, timeout=60)
            compose.psql(project, "create table t (id bigserial primary key, v int, at timestamptz default now())")
            setup = HookSetup(tmp / "hook")
            setup.tmp.mkdir()
            cmd = "docker-compose" if args.compose == "v1" else "docker compose"
            table = {"stacks": [project.name], "compose_command": cmd, "stop_timeout": 30, "resume_wait": 120}
            setup.hook_table = {"qmp_dir": str(tmp)}
            setup.write({VMID: (guest, {**table, "early_resume": False})})
            baseline_config = setup.config.rename(tmp / "baseline.toml")
            setup.write({VMID: (guest, table)})
            wrapper = tmp / "baseline-hook"
            wrapper.write_text(BASELINE_WRAPPER.format(flagdir=tmp, hook=hook, config=baseline_config,
                                                       run_dir=tmp / "baseline-run"))
            wrapper.chmod(0o755)
            sh_hook = tmp / "sh-hook"
            write_sh_hook(sh_hook, guest, project, str(setup.marker_path(VMID)) + ".sh")
            poller.start()
            if not args.no_load:
                load = Load(project)
                load.start()
            time.sleep(1)
            for order in orders:
                for run in range(args.runs):
                    for variant, path in [(v, p) for v, p in (("hook", hook), ("sh", str(sh_hook)),
                                                              ("baseline", str(wrapper))) if v in variants]:
                        m = measure(path, setup, guest, project, poller, order, args.transfer, args.boot, qmp)
                        results.setdefault((order, variant), []).append(m)
                        print(f"  {order:14} {variant:8} run {run + 1}: down {fmt(m.downtime)} s "
                              f"(unavailable {fmt(m.unavailable)} s, "
                              f"point in time {m.to_point_in_time:4.1f} s after the stop, "
                              f"started at {m.resumed_at}){'' if m.ok else '  ! ' + m.note}", flush=True)
                        time.sleep(1)
        finally:
            poller.halt()
            if load is not None:
                load.halt()
            compose.down(project, remove_dir=False)
    took = time.monotonic() - started

    def med(order: str, variant: str, attr: str = "downtime") -> float:
        values = [getattr(m, attr) for m in results.get((order, variant), [])
                  if m.ok and getattr(m, attr) == getattr(m, attr)]
        return statistics.median(values) if values else float("nan")

    print()
    print("App downtime (s), pre-stop start -> PostgreSQL accepts connections again; "
          "pg_isready every 50 ms from the host;")
    print(f"simulated transfer {args.transfer:g} s; "
          f"stop modes: the guest answers SSH {args.boot:g} s after vzdump starts it;")
    print(f"compose {args.compose}; "
          f"{'no load' if args.no_load else 'write load: one INSERT per connection every 20 ms'}; "
          f"median of {args.runs} run(s) per cell; total {took:.0f} s.")
    print("baseline = the same hook behind a wrapper that drops pre-restart/post-restart calls before backup-end")
    print("           (= stop at pre-stop, start at backup-end, or when the guest runs again after it), "
          "early_resume = false")
    print("QEMU: QMP played by the QMP double; the point in time starts the backup job in it; the hook's resident")
    print("      starts the stacks once query-backup reports that job (\"job start\" below)")
    print()
    print("sh       = a sh + OpenSSH hook: synced marker file and `docker compose stop` at pre-stop, "
          "`docker compose start`")
    print("           at the earliest safe point "
          "(lxc snapshot pre-restart, lxc suspend/stop post-restart, qemu backup-end)")
    print()
    print("hook/sh  = ratio of the time PostgreSQL was unavailable (first failed poll -> accepting again), in ()")
    print()
    header = (f"{'type/mode':14}  {'hook resumes at':15}  {'PIT after stop':>14}  "
              f"{'hook':>13}  {'sh':>13}  {'baseline':>8}  "
              f"{'hook/sh':>7}  {'baseline/hook':>13}  {'hook: up after PIT':>18}")
    print(header)
    print("-" * len(header))
    ratios: dict[str, float] = {}
    sh_ratios: dict[str, float] = {}

    def ratio(a: float, b: float) -> float:
        return a / b if a == a and b == b and b > 0 else float("nan")

    for order in orders:
        h, sh, b = med(order, "hook"), med(order, "sh"), med(order, "baseline")
        # against sh: the time PostgreSQL was really unavailable (first failed poll -> up), so that
        # what each hook does before it issues the stop (Python's start, the resident) is not counted
        ratios[order], sh_ratios[order] = ratio(b, h), ratio(med(order, "hook", "unavailable"),
                                                             med(order, "sh", "unavailable"))
        resumed = next((m.resumed_at for m in results.get((order, "hook"), []) if m.ok), "?")
        pit = med(order, "hook", "to_point_in_time")
        after = med(order, "hook", "after_pit")
        hu, su = med(order, "hook", "unavailable"), med(order, "sh", "unavailable")
        print(f"{order.replace('-', ' '):14}  {resumed:15}  {pit:12.1f} s  "
              f"{fmt(h):>5} ({fmt(hu)})  {fmt(sh):>5} ({fmt(su)})  {fmt(b):>8}  "
              f"{('-' if sh_ratios[order] != sh_ratios[order] else f'{sh_ratios[order]:.2f}'):>7}  "
              f"{('-' if ratios[order] != ratios[order] else f'{ratios[order]:.1f}x'):>13}  {fmt(after):>16} s")
    print()
    for order in orders:
        if order in ("lxc-snapshot", "lxc-suspend") and sh_ratios[order] == sh_ratios[order]:
            verdict = "PASS" if sh_ratios[order] <= 1.0 else "FAIL"
            print(f"target {order}: app unavailable, hook/sh <= 1.0 (medians): {sh_ratios[order]:.2f} {verdict}")
        if order == "qemu-snapshot" and "hook" in variants:
            after = med(order, "hook", "after_pit")
            if after == after:
                print("target qemu-snapshot: PostgreSQL answers <= 0.5 s after QEMU's backup job starts (median): "
                      f"{after:.2f} s "
                      f"{'PASS' if after <= 0.5 else 'FAIL'}")
    gains = [o for o in orders if ratios[o] == ratios[o] and ratios[o] >= 1.3]
    if gains:
        print("headline (app downtime, vzdump-hook vs. resume at backup-end): " + "; ".join(
            f"{o.replace('-', ' ')} {med(o, 'hook'):.1f} s instead of {med(o, 'baseline'):.1f} s "
            f"({ratios[o]:.1f}x shorter)"
            for o in gains) + ".")
    same = [o.replace("-", " ") for o in orders if ratios[o] == ratios[o] and ratios[o] < 1.3]
    if same:
        print(f"no gain (the hook resumes at backup-end or later there too): {', '.join(same)}; "
              "LXC stop mode starts the container again only after the archive.")
    failed = [f"{o} {v}" for (o, v), ms in results.items() for m in ms if not m.ok]
    if failed:
        print(f"runs with problems: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
