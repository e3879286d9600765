#!/usr/bin/env python3
"""Cost of the sh launcher (examples/node/vzdump-hook) per phase: the installed program started
through the launcher next to the same program started directly (its console script), same run,
alternating. No guest is contacted: job-init and the backup-start of a guest not in the config are
the phases whose whole cost is starting the program.

    python3 bench/launcher.py [--runs 40]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from _common import machine, median, reproduce, scratch_dir  # first: puts the repository on sys.path

from tests.infra.vzdump import GuestSpec, GuestType, Mode, run_phase
from tests.integration.hookenv import HookSetup, installed_hook

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="runs of each phase and variant (default 40)")
    args = parser.parse_args(argv)
    print(f"reproduce: {reproduce('launcher.py', sys.argv[1:] if argv is None else argv)}")
    print(machine(), flush=True)
    times: dict[tuple[str, str], list[float]] = {}
    with scratch_dir("vzdh-bench-") as tmp:
        setup = HookSetup(tmp)
        setup.config.write_text("[defaults]\n")
        launcher = tmp / "vzdump-hook"
        text = (REPO / "examples" / "node" / "vzdump-hook").read_text()
        launcher.write_text(text.replace("\nPYTHON=/opt/vzdump-hook/bin/python\n", f"\nPYTHON={sys.executable}\n"))
        launcher.chmod(0o755)
        variants = (("direct", installed_hook()), ("launcher", str(launcher)))
        unconfigured = GuestSpec(999, GuestType.LXC, Mode.SNAPSHOT)
        for i in range(args.runs + 2):  # the first two: warm-up
            for name, path in variants if i % 2 == 0 else variants[::-1]:
                for phase, rec in (("job-init", run_phase(path, "job-init", extra_env=setup.env)),
                                   ("backup-start, guest not in config",
                                    run_phase(path, "backup-start", unconfigured, extra_env=setup.env))):
                    if rec.returncode != 0:
                        print(f"{name} {phase}: exit {rec.returncode}")
                        return 1
                    if i >= 2:
                        times.setdefault((name, phase), []).append(rec.duration)
        # the launcher's own cost, without Python's start-up noise: it runs /bin/true instead, timed
        # here around a bare fork/exec (the stand-in's log reading adds more jitter than the launcher costs)
        true_launcher = tmp / "true-launcher"
        true_launcher.write_text(text.replace("\nPYTHON=/opt/vzdump-hook/bin/python\n", "\nPYTHON=/bin/true\n"))
        true_launcher.chmod(0o755)
        for _ in range(args.runs * 10):
            for name, path in (("true", "/bin/true"), ("launcher+true", str(true_launcher))):
                t0 = time.perf_counter()
                subprocess.run([path, "job-init"], env={}, check=True)
                times.setdefault((name, "job-init"), []).append(time.perf_counter() - t0)
    print()
    own = median(times[("launcher+true", "job-init")]) - median(times[("true", "job-init")])
    print(f"The launcher itself (dash, running /bin/true instead of Python; median of {args.runs * 10}): "
          f"{own * 1000:+.1f} ms per phase")
    print()
    print(f"Wall time per phase, process start to exit (ms), median of {args.runs} runs each.")
    print(f"{'phase':36}  {'direct':>7}  {'launcher':>8}  {'launcher cost':>13}")
    for phase in ("job-init", "backup-start, guest not in config"):
        d, lt = median(times[("direct", phase)]), median(times[("launcher", phase)])
        print(f"{phase:36}  {d * 1000:7.1f}  {lt * 1000:8.1f}  {(lt - d) * 1000:+13.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
