#!/usr/bin/env python3
"""Scale: what a job costs with 10, 50 and 200 configured guests, this checkout vs. a baseline, same run.

Every configured guest is the one test guest (sshd in a network namespace, tests/infra) under its
own VMID, each with its own marker path; only guest 101 has a stack (one busybox compose project).
The hook runs as vzdump runs it (the stand-in tests/infra/vzdump.py: emptied environment, one process
per phase). Rows:

- ``job-start, no marker``: job-start when no guest holds a marker (after one job-start has run, i.e.
  after the ledger's one full sweep on upgrade); median of --runs.
- ``job-start, 50 markers, unreachable``: min(50, N) guests hold a marker of a job that is over (and,
  for this checkout, a ledger entry, as the node that wrote them would have left), and the guest is
  cut off (connects time out, ssh connect_timeout 3 s); one run.
- ``one-guest job``: a whole lxc-snapshot job backing up guest 101 alone (wall time, median of
  --runs), and the largest resident set of its hook processes (max RSS over the job's phases).

Baseline: the hook of another revision (default: where this branch left main, ``git merge-base HEAD
main``), extracted with ``git archive`` and run by this venv's Python with the same config.

Targets (printed as PASS/FAIL, never asserted): job-start with no marker <= 0.2 s and flat in N;
job-start with 50 unreachable markers <= connect timeout + 1 s; one-guest job at 200 guests <= 1.2x
the one at 1 guest; memory at 200 guests <= 1.5x at 1 guest.

Run as root from the repository: ``python3 bench/scale.py [--runs 5] [--sizes 10,50,200]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

# first: puts the repository on sys.path
from _common import ROOT, baseline_hook, machine, median, need_root, reproduce, scratch_dir

from tests.infra import compose
from tests.infra.guest import TestGuest
from tests.infra.vzdump import GuestSpec, GuestType, Mode, run_job, run_phase
from tests.integration.hookenv import HookSetup, installed_hook

CONNECT_TIMEOUT = 3.0
FIRST = 101
MARKED = 50
START_TARGET = 0.2  # s
JOB_RATIO = 1.2
MEM_RATIO = 1.5


def configure(setup: HookSetup, guest: TestGuest, n: int, project: compose.ComposeProject) -> None:
    tables = {}
    for vmid in range(FIRST, FIRST + n):
        t: dict[str, object] = {"ssh": {"connect_timeout": CONNECT_TIMEOUT},
                                "marker_path": str(setup.tmp / "markers" / f"{vmid}.json")}
        t.update({"stacks": [project.name], "compose_command": "docker compose", "stop_timeout": 10} if vmid == FIRST
                 else {"stacks": ["app"]})
        tables[vmid] = (guest, t)
    setup.write(tables)


def plant_markers(setup: HookSetup, vmids: range) -> None:
    """Markers of a job that is over (its worker is gone), with the ledger entries its node wrote first."""
    from vzdump_hook.guest.marker import Marker, StackRecord
    from vzdump_hook.node.job import JobId, node_name
    from vzdump_hook.node.ledger import QUIESCE, Ledger
    from vzdump_hook.phase.runner import HARD_GRACE

    dead = JobId(node_name(), "boot-before-the-last-reboot", 4242, 1)
    ledger = Ledger(str(setup.tmp / "state" / "ledger"), node_name(), str(setup.tmp / "state"), 600 + HARD_GRACE)
    now = time.time()
    for vmid in vmids:
        ledger.add(vmid, QUIESCE, dead, {}, "lxc")
        m = Marker(dead, vmid, "lxc", "snapshot", now - 60, now + 3600, "stopped",
                   (StackRecord("app", ("docker", "compose"), "/srv/app", ("/srv/app/compose.yaml",), (), True),))
        setup.marker_path(vmid).parent.mkdir(parents=True, exist_ok=True)
        setup.marker_path(vmid).write_bytes(m.to_json())


def measure_job(hook: str, env: dict[str, str]) -> None:
    """Child mode (--measure-job): one job of guest 101; prints wall time and the hook processes'
    max RSS (its only children are the hook's phases)."""
    t0 = time.monotonic()
    result = run_job(hook, [GuestSpec(FIRST, GuestType.LXC, Mode.SNAPSHOT)], extra_env=env, timeout=120)
    wall = time.monotonic() - t0
    ok = result.ok and all(r.returncode == 0 for r in result.records)
    print(json.dumps({"wall": wall, "maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "ok": ok,
                      "log": "" if ok else result.task_log()}))


def one_job(hook: str, env: dict[str, str]) -> dict[str, object]:
    proc = subprocess.run([sys.executable, __file__, "--measure-job", hook, json.dumps(env)], capture_output=True,
                          text=True, timeout=300, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5,
                        help="runs of the job-start and one-guest job rows (median); default 5")
    parser.add_argument("--sizes", default="10,50,200", help="configured guests, comma-separated (default 10,50,200)")
    parser.add_argument("--baseline", default="",
                        help="git revision of the baseline hook (default: git merge-base HEAD main)")
    parser.add_argument("--no-baseline", action="store_true", help="measure this checkout only")
    parser.add_argument("--measure-job", nargs=2, metavar=("HOOK", "ENV"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_job:
        measure_job(args.measure_job[0], json.loads(args.measure_job[1]))
        return 0
    need_root()
    sizes = [int(s) for s in args.sizes.split(",")]
    rev = args.baseline or subprocess.run(["git", "-C", str(ROOT), "merge-base", "HEAD", "main"], capture_output=True,
                                          text=True, check=True).stdout.strip()
    print(f"reproduce: {reproduce('scale.py', sys.argv[1:] if argv is None else argv)}")
    print(machine(), flush=True)
    results: dict[tuple[str, str, int], float] = {}
    problems: list[str] = []
    started = time.monotonic()
    with scratch_dir("vzdh-scale-") as tmp, TestGuest() as guest:
        variants = [("this", installed_hook())] + ([] if args.no_baseline else [("baseline", baseline_hook(rev, tmp))])
        print(f"this: {installed_hook()} "
              f"(git {subprocess.run(['git', '-C', str(ROOT), 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()})"  # noqa: E501
              + ("" if args.no_baseline else f"; baseline: git {rev[:10]}"), flush=True)
        project = compose.make_project("scale", {"app": "sleeper"}, workdir=tmp / "p")
        try:
            compose.up(project)
            for n in sorted({1, *sizes}):
                for variant, hook in variants:
                    setup = HookSetup(tmp / f"{variant}-{n}")
                    setup.tmp.mkdir()
                    configure(setup, guest, n, project)
                    # warm-up; the ledger's one full sweep
                    first = run_phase(hook, "job-start", extra_env=setup.env, timeout=300)
                    if first.returncode != 0:
                        problems.append(f"{variant} n={n}: first job-start exited {first.returncode}")
                    if n in sizes:
                        times = [run_phase(hook, "job-start", extra_env=setup.env, timeout=300).duration
                                 for _ in range(args.runs)]
                        results[(variant, "start", n)] = median(times)
                    jobs = [one_job(hook, setup.env) for _ in range(args.runs)]
                    for j in jobs:
                        if not j["ok"]:
                            problems.append(f"{variant} n={n}: one-guest job failed\n{j['log']}")
                    results[(variant, "job", n)] = median([float(j["wall"]) for j in jobs])  # type: ignore[arg-type]
                    results[(variant, "rss", n)] = max(float(j["maxrss_kb"])  # type: ignore[arg-type]
                                                       for j in jobs) / 1024
                    if compose.running_services(project) != {"app"}:
                        problems.append(f"{variant} n={n}: stack not running after the jobs")
                        compose.start(project)
                    if n in sizes:
                        plant_markers(setup, range(FIRST + 1, FIRST + 1 + min(MARKED, n - 1)))
                        guest.cut_off()
                        try:
                            rec = run_phase(hook, "job-start", extra_env=setup.env, timeout=300)
                        finally:
                            guest.restore()
                        results[(variant, "cut", n)] = rec.duration
                    print(f"  measured {variant} n={n} ({time.monotonic() - started:.0f} s)", flush=True)
        finally:
            compose.down(project, remove_dir=False)
    took = time.monotonic() - started

    def cell(variant: str, row: str, n: int, fmt: str = "{:.2f}") -> str:
        v = results.get((variant, row, n))
        return "-" if v is None else fmt.format(v)

    print()
    print(f"Scale: wall time (s) of job-start and of a one-guest job, max RSS (MiB) of the hook's processes; "
          f"ssh connect_timeout {CONNECT_TIMEOUT:g} s; medians of {args.runs} runs (unreachable: 1 run); "
          f"total {took:.0f} s.")
    print()
    names = [v for v, _ in variants]
    cols = (("start", "job-start, no marker (s)", "{:.2f}"), ("cut", f"job-start, {MARKED} unreachable (s)", "{:.2f}"),
            ("job", "one-guest job (s)", "{:.2f}"), ("rss", "max RSS (MiB)", "{:.1f}"))
    print(f"cells: {' / '.join(names)}")
    print("| configured guests | " + " | ".join(title for _, title, _ in cols) + " |")
    print("|---:|" + "---:|" * len(cols))
    for n in sorted({1, *sizes}):
        cells = [" / ".join(cell(v, row, n, fmt) for v in names) for row, _, fmt in cols]
        print(f"| {n} | " + " | ".join(cells) + " |")
    print()
    verdicts = []

    def verdict(text: str, ok: bool) -> None:
        verdicts.append(ok)
        print(f"{'PASS' if ok else 'FAIL'}  {text}")

    starts = [results[("this", "start", n)] for n in sizes]
    verdict(f"job-start, no marker: <= {START_TARGET:g} s at every size (max {max(starts):.2f} s)",
            max(starts) <= START_TARGET)
    for n in sizes:
        if n > MARKED:
            verdict(f"job-start, {MARKED} markers unreachable, {n} guests: <= {CONNECT_TIMEOUT + 1:g} s "
                    f"({results[('this', 'cut', n)]:.2f} s)",
                    results[("this", "cut", n)] <= CONNECT_TIMEOUT + 1)
    big = max(sizes)
    ratio = results[("this", "job", big)] / results[("this", "job", 1)]
    verdict(f"one-guest job, {big} vs 1 configured: <= {JOB_RATIO:g}x ({ratio:.2f}x)", ratio <= JOB_RATIO)
    mem = results[("this", "rss", big)] / results[("this", "rss", 1)]
    verdict(f"max RSS, {big} vs 1 configured: <= {MEM_RATIO:g}x ({mem:.2f}x)", mem <= MEM_RATIO)
    print(f"targets: {sum(verdicts)}/{len(verdicts)} PASS")
    if problems:
        print("problems:\n" + "\n".join(problems))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
