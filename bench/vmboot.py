#!/usr/bin/env python3
"""How long the VM tier's test VM takes to boot (tests/infra/vm.py, the image of tests/infra/vm_image.py):
from QEMU's start until sshd answers, and until the guest agent and the Docker engine with the test
images answer too (what the tier waits for), under TCG on this machine. Next to it, in the same run,
the same VM without the kernel options that skip work under emulation (``mitigations=off tsc=reliable
no_timer_check``) and without its virtio RNG (the kernel's random pool then fills more slowly).

Run as root from the repository, after scripts/setup-test-host.sh: ``python3 bench/vmboot.py [--runs 5]``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import machine, need_root, reproduce  # first: puts the repository on sys.path

from tests.infra import vm_image
from tests.infra.vm import TestVm

OPTIONS = ("mitigations=off", "tsc=reliable", "no_timer_check")
VARIANTS: dict[str, bool] = {"as the tier boots it": False, "without those options and RNG": True}


def with_variant(base: Callable[[TestVm], list[str]], strip: bool) -> Callable[[TestVm], list[str]]:
    def argv(self: TestVm) -> list[str]:
        a = base(self)
        if not strip:
            return a
        i = a.index("-append")
        a[i + 1] = " ".join(w for w in a[i + 1].split() if w not in OPTIONS)
        j = a.index("virtio-rng-pci")
        return a[:j - 1] + a[j + 1:]  # "-device", "virtio-rng-pci"
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5,
                        help="boots per variant, alternating; the median is shown (default 5)")
    args = parser.parse_args(argv)
    need_root()
    print(f"reproduce: {reproduce('vmboot.py', sys.argv[1:] if argv is None else argv)}")
    print(machine(), flush=True)
    img = vm_image.image()
    base = TestVm.argv
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    try:
        for run in range(args.runs):
            for name, strip in VARIANTS.items():
                TestVm.argv = with_variant(base, strip)  # type: ignore[method-assign]
                qmp_dir = Path(tempfile.mkdtemp(prefix="vzdh-qs-", dir="/tmp"))
                vm = TestVm(img, 100, qmp_dir)
                try:
                    t0 = time.monotonic()
                    vm.start()
                    times[name].append((vm.boot_seconds, time.monotonic() - t0))
                finally:
                    vm.close()
                    shutil.rmtree(qmp_dir, ignore_errors=True)
                print(f"  {name:30} run {run + 1}: ssh {times[name][-1][0]:5.1f} s, ready {times[name][-1][1]:5.1f} s",
                      flush=True)
    finally:
        TestVm.argv = base  # type: ignore[method-assign]
    print()
    print(f"Test VM boot under {vm.accel.upper()}, 2 vCPUs, median of {args.runs} (range): QEMU start -> sshd answers; "
          "-> agent and docker images ready")
    for name, ts in times.items():
        ssh, ready = [t[0] for t in ts], [t[1] for t in ts]
        print(f"{name:30}  ssh {statistics.median(ssh):5.1f} s ({min(ssh):.1f}-{max(ssh):.1f})  "
              f"ready {statistics.median(ready):5.1f} s ({min(ready):.1f}-{max(ready):.1f})")
    print("target: ssh within 30 s on 2 cores under TCG")
    return 0


if __name__ == "__main__":
    sys.exit(main())
