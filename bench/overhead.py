#!/usr/bin/env python3
"""Hook overhead per phase: the installed vzdump-hook vs. a minimal POSIX sh hook, same run.

Each phase is one process, started and reaped by the vzdump stand-in (tests/infra/vzdump.py) exactly
as vzdump does (emptied environment); the time is from process start to exit, median of --runs.

- no-op phases: ``job-init``, and ``backup-start`` of a guest that is not in the config;
- SSH phases, one whole job (lxc snapshot: the stack is started again at pre-restart) on a test
  guest (sshd in a network namespace, tests/infra) with one tiny busybox compose stack.

The sh hook does the minimum by hand with OpenSSH's ``ssh``: backup-start lists the stack's
containers, pre-stop writes a marker file (synced) and runs ``docker compose stop``, pre-restart (the
earliest safe point) runs ``docker compose start`` and removes the marker; every other phase exits 0.
vzdump-hook's pre-restart tells the guest's resident (armed at pre-stop), which starts the stack over
its open session; the phase ends once the resident answers. vzdump-hook additionally
finds the stacks, verifies the host key with paramiko, keeps host state and history, checks that
every container runs again, and sweeps for leftover markers at job-start.

Targets (reported, not asserted): resume path (pre-restart) <= 150 ms over the sh hook; a no-op
phase <= 80 ms wall.

Run as root from the repository: ``python3 bench/overhead.py [--runs 10]``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time

# first: puts the repository on sys.path
from _common import baseline_hook, machine, median, need_root, reproduce, scratch_dir

from tests.infra import compose
from tests.infra.guest import TestGuest
from tests.infra.vzdump import GuestSpec, GuestType, Mode, run_job, run_phase
from tests.integration.hookenv import HookSetup, installed_hook

VMID = 101
UNCONFIGURED = 555
RESUME_TARGET = 0.150  # s over the sh hook
NOOP_TARGET = 0.080  # s wall
JOB_PHASES = ["job-init", "job-start", "backup-start", "pre-stop", "pre-restart", "post-restart", "backup-end",
              "log-end", "job-end"]

SHELL_HOOK = """#!/bin/sh
# Minimal hand-written vzdump hook for one guest and one compose stack (bench/overhead.py baseline).
[ "$3" = {vmid} ] || exit 0
case "$1" in
  backup-start)
    exec {ssh} {list} >/dev/null ;;
  pre-stop)
    exec {ssh} {stop} ;;
  pre-restart)
    exec {ssh} {start} ;;
esac
exit 0
"""


def write_shell_hook(path: str, guest: TestGuest, project: compose.ComposeProject, marker: str) -> None:
    ssh = guest.ssh_argv()
    ssh[0] = shutil.which("ssh") or "/usr/bin/ssh"  # vzdump gives the hook no PATH
    workdir = shlex.quote(str(project.workdir))
    m = shlex.quote(marker)
    list_cmd = f"docker ps -q --filter label=com.docker.compose.project={project.name}"
    stop_cmd = (f"mkdir -p $(dirname {m}) && echo {project.name} > {m}.tmp && sync {m}.tmp && mv {m}.tmp {m} "
                f"&& cd {workdir} && docker compose stop")
    start_cmd = f"cd {workdir} && docker compose start && rm -f {m}"
    text = SHELL_HOOK.format(vmid=VMID, ssh=shlex.join(ssh), list=shlex.quote(list_cmd), stop=shlex.quote(stop_cmd),
                             start=shlex.quote(start_cmd))
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)


def ms(x: float) -> str:
    return "-" if x != x else f"{x * 1000:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs of each measurement (default 10); medians are shown")
    parser.add_argument("--noop-runs", type=int, default=20, help="runs of each no-op phase (default 20)")
    parser.add_argument("--baseline", default="", metavar="REV",
                        help="also measure the hook of git revision REV, in the same run (a column 'baseline')")
    args = parser.parse_args(argv)
    need_root()
    print(f"reproduce: {reproduce('overhead.py', sys.argv[1:] if argv is None else argv)}")
    print(machine(), flush=True)
    hook = installed_hook()
    times: dict[tuple[str, str], list[float]] = {}
    failures: list[str] = []

    def add(variant: str, phase: str, seconds: float) -> None:
        times.setdefault((variant, phase), []).append(seconds)

    started = time.monotonic()
    with scratch_dir("vzdh-bench-") as tmp, TestGuest() as guest:
        project = compose.make_project("tiny", {"app": "sleeper"}, workdir=tmp / "p")
        try:
            compose.up(project)
            setup = HookSetup(tmp / "hook")
            setup.tmp.mkdir()
            setup.write({VMID: (guest, {"stacks": [project.name], "compose_command": "docker compose",
                                        "stop_timeout": 10})})
            shell = str(tmp / "shell-hook")
            write_shell_hook(shell, guest, project, str(tmp / "shell-marker" / "marker"))
            variants: tuple[tuple[str, str], ...] = (("vzdump-hook", hook), ("sh+ssh", shell))
            if args.baseline:
                variants += (("baseline", baseline_hook(args.baseline, tmp)),)
            # warm-up: page cache, docker, sshd
            for _, path in variants:
                run_job(path, [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=setup.env, timeout=120)
            unconfigured = GuestSpec(UNCONFIGURED, GuestType.LXC, Mode.SNAPSHOT)
            for _ in range(args.noop_runs):
                for variant, path in variants:
                    rec = run_phase(path, "job-init", extra_env=setup.env)
                    add(variant, "no-op: job-init", rec.duration)
                    rec = run_phase(path, "backup-start", unconfigured, extra_env=setup.env)
                    add(variant, "no-op: backup-start, guest not in config", rec.duration)
            for i in range(args.runs):
                for variant, path in variants if i % 2 == 0 else variants[::-1]:
                    t0 = time.monotonic()
                    result = run_job(path, [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=setup.env,
                                     timeout=120)
                    add(variant, "whole job", time.monotonic() - t0)
                    if not result.ok or any(r.returncode != 0 for r in result.records):
                        failures.append(f"{variant} run {i + 1}: {result.status.value}\n{result.task_log()}")
                    by_phase = {str(r.phase): r.duration for r in result.records}
                    for phase in JOB_PHASES:
                        if phase in by_phase:
                            add(variant, phase, by_phase[phase])
                    add(variant, "pre-stop + pre-restart", by_phase.get("pre-stop", 0) + by_phase.get("pre-restart", 0))
                    if compose.running_services(project) != {"app"}:
                        failures.append(f"{variant} run {i + 1}: stack not running after the job\n{result.task_log()}")
                        compose.start(project)
        finally:
            compose.down(project, remove_dir=False)
    took = time.monotonic() - started

    rows = ["no-op: job-init", "no-op: backup-start, guest not in config", *JOB_PHASES, "pre-stop + pre-restart",
            "whole job"]
    print()
    print(f"Per-phase wall time, process start to exit (ms), median of {args.noop_runs} (no-op) / {args.runs} (job) "
          f"runs; total {took:.0f} s.")
    print("job: lxc snapshot, one busybox compose stack (compose v2), stack started again at pre-restart.")
    print()
    base = f"  {'baseline':>8}" if args.baseline else ""
    if args.baseline:
        print(f"baseline: the hook of git {args.baseline}, same machine, same run, runs interleaved")
    header = f"{'phase':42}  {'vzdump-hook':>11}  {'(min-max)':>11}  {'sh+ssh':>6}  {'diff':>5}{base}  target"
    print(header)
    print("-" * (len(header) + 30))
    verdicts: list[bool] = []
    for row in rows:
        h = times.get(("vzdump-hook", row), [])
        s = times.get(("sh+ssh", row), [])
        mh, msh = median(h), median(s)
        target = ""
        if row.startswith("no-op"):
            ok = mh <= NOOP_TARGET
            verdicts.append(ok)
            target = f"<= {NOOP_TARGET * 1000:.0f} ms wall: {'PASS' if ok else 'FAIL'}"
        elif row == "pre-restart":
            ok = mh - msh <= RESUME_TARGET
            verdicts.append(ok)
            target = f"resume path <= sh + {RESUME_TARGET * 1000:.0f} ms: {'PASS' if ok else 'FAIL'}"
        spread = f"({ms(min(h))}-{ms(max(h))})" if h else ""
        b = f"  {ms(median(times.get(('baseline', row), []))):>8}" if args.baseline else ""
        print(f"{row:42}  {ms(mh):>11}  {spread:>11}  {ms(msh):>6}  {ms(mh - msh):>5}{b}  {target}")
    print()
    print(f"targets: {sum(verdicts)}/{len(verdicts)} PASS")
    if failures:
        print("problems:\n" + "\n".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
