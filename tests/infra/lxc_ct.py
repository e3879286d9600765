"""A real LXC container for the tests (Debian's ``lxc``), and a ``pct`` stand-in that enters it with
``lxc-attach``, as ``pct exec`` does on Proxmox VE.

The container's root is Debian 12 made with mmdebstrap from Debian's mirror (systemd as init, a Docker
engine with compose v2 and the host's local image ``vzdh/busybox:test``, loaded at boot by
``vzdh-images.service``), cached as a tar in /var/cache/vzdh-test/lxc/ keyed by its recipe
(``python3 -m tests.infra.lxc_ct`` builds it; scripts/setup-test-host.sh runs that). Each
:class:`LxcContainer` unpacks its own copy into a container directory (``lxcpath``) of its own, so
nothing of the host's /var/lib/lxc is touched; the container is named by its VMID, as PVE names them.

Its config is a privileged PVE container's with ``features: nesting=1`` as far as this host allows:
no network but ``lo`` (``lxc.net.0.type = empty``), cgroups and /proc, /sys mounted read-write and all
devices allowed, so that dockerd runs inside (``--iptables=false``, no bridge). The kernel here has no
AppArmor, so the profile is ``unconfined``. vzdump's suspend mode freezes a CT with the cgroup freezer,
which :meth:`LxcContainer.freeze` uses too (``lxc-freeze``).

The ``pct`` executable is made per test by :func:`make_pct` (state baked in: vzdump empties the
environment), with the interface of :mod:`tests.infra.pct_standin`: ``pct exec VMID [--] CMD...`` with
``PATH=/sbin:/bin:/usr/sbin:/usr/bin`` and nothing else in the environment, stdin, stdout, stderr and
exit status the command's own, each call appended to ``STATE/calls.jsonl`` (argv, env, ``time`` when
pct was called). Unlike the namespace stand-in it waits for lxc-attach instead of exec'ing it and
appends a second line when it ends (``end``, ``status``), so that a test can tell whether a call was
in flight while the CT was frozen; :func:`read_calls` joins the two (``end`` None: killed, or running).
Run as ``lxc_ct.py pct --state DIR --lxcpath DIR exec VMID -- CMD...``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["LxcContainer", "cleanup_stale", "make_pct", "read_calls", "root_tar", "support_problem"]

LXC_START = "/usr/bin/lxc-start"
LXC_ATTACH = "/usr/bin/lxc-attach"
PCT_PATH = "/sbin:/bin:/usr/sbin:/usr/bin"  # what pct (PVE::CLIHandler) sets before exec'ing lxc-attach
NODE = "testnode"
LXC_ROOT = Path("/var/tmp/vzdh-lxc")  # lxcpath of each test process: LXC_ROOT/<pid>
CACHE_DIR = Path("/var/cache/vzdh-test/lxc")
MIRROR = os.environ.get("VZDUMP_HOOK_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
RECIPE_VERSION = 1  # bump when the recipe changes in a way its text does not show
PACKAGES = ("systemd-sysv", "dbus", "procps", "docker.io")
DOCKER_IMAGES = ("vzdh/busybox:test",)
COMPOSE_PLUGIN = Path("/usr/local/lib/docker/cli-plugins/docker-compose")
MASKED = ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "e2scrub_reap.service",
          "fstrim.timer", "dpkg-db-backup.timer", "systemd-timesyncd.service", "logrotate.timer",
          "systemd-tmpfiles-clean.timer", "console-getty.service")
ENABLED = ("docker.service", "vzdh-images.service")
FILES: dict[str, str] = {
    "/etc/hosts": "127.0.0.1 localhost\n",
    "/etc/docker/daemon.json": '{"iptables": false, "ip6tables": false, "bridge": "none"}\n',
    "/etc/systemd/journald.conf.d/vzdh.conf": "[Journal]\nStorage=volatile\n",
    "/etc/systemd/system/vzdh-images.service": (
        "[Unit]\nDescription=load the test images into docker\n"
        "Requires=docker.service\nAfter=docker.service\nConditionPathExists=/var/lib/vzdh/images.tar\n\n"
        "[Service]\nType=oneshot\nExecStart=/usr/bin/docker load -i /var/lib/vzdh/images.tar\n"
        "ExecStartPost=/bin/rm -f /var/lib/vzdh/images.tar\n\n[Install]\nWantedBy=multi-user.target\n"
    ),
}
# A privileged PVE CT with nesting, on a host without AppArmor (see the module docstring).
CONFIG = """\
lxc.include = /usr/share/lxc/config/common.conf
lxc.uts.name = {hostname}
lxc.rootfs.path = dir:{rootfs}
lxc.net.0.type = empty
lxc.apparmor.profile = unconfined
lxc.mount.auto = proc:rw sys:rw cgroup:rw
lxc.cgroup.devices.allow = a
lxc.cap.drop =
lxc.tty.max = 0
lxc.pty.max = 16
lxc.console.path = none
"""


def support_problem() -> str | None:
    """Why a container cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (a privileged LXC container)"
    for exe in (LXC_START, LXC_ATTACH):
        if not os.access(exe, os.X_OK):
            return f"{exe} is missing (scripts/setup-test-host.sh installs lxc)"
    if not Path("/sys/fs/cgroup/freezer").is_dir() and not Path("/sys/fs/cgroup/cgroup.freeze").exists():
        return "no cgroup freezer"
    return None


def _run(argv: list[str], timeout: float = 120, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,  # type: ignore[call-overload]
                          env={"PATH": PCT_PATH}, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc  # type: ignore[no-any-return]


# -- the root file system --------------------------------------------------------------------------

def recipe() -> dict[str, object]:
    """Everything the root is made from. Raises RuntimeError when the host's docker images are missing."""
    from tests.infra.vm_image import _docker_image_hash, _file_hash

    return {
        "version": RECIPE_VERSION, "suite": SUITE, "mirror": MIRROR, "packages": PACKAGES, "masked": MASKED,
        "enabled": ENABLED, "files": FILES, "docker_images": {t: _docker_image_hash(t) for t in DOCKER_IMAGES},
        "compose_plugin": _file_hash(COMPOSE_PLUGIN),
    }


def _build(out: Path) -> None:
    """Write the root's tar to ``out``. Raises RuntimeError with the failing command's output."""
    with tempfile.TemporaryDirectory(prefix="vzdh-lxc-build.", dir="/var/tmp") as tmp:
        root = Path(tmp) / "root"
        _run(["mmdebstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root), MIRROR],
             timeout=1800)
        for path, text in FILES.items():
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        plugins = root / "usr/local/lib/docker/cli-plugins"
        plugins.mkdir(parents=True, exist_ok=True)
        shutil.copy2(COMPOSE_PLUGIN, plugins / "docker-compose")
        (root / "var/lib/vzdh").mkdir(parents=True, exist_ok=True)
        _run(["docker", "save", "-o", str(root / "var/lib/vzdh/images.tar"), *DOCKER_IMAGES], timeout=300)
        _run(["chroot", str(root), "systemctl", "mask", *MASKED])
        _run(["chroot", str(root), "systemctl", "enable", *ENABLED])
        (root / "etc/machine-id").write_text("")  # a fresh one at each boot
        _run(["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf", str(out), "."], timeout=600)


def root_tar() -> Path:
    """The cached root's tar, built first (about a minute, from Debian's mirror) when its recipe changed."""
    from tests.infra.cache import cached

    return cached(CACHE_DIR, "ct-root", ".tar", recipe(), _build)


# -- containers -------------------------------------------------------------------------------------

def _lxc(verb: str, lxcpath: Path, name: str, *args: str, timeout: float = 120,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run([f"/usr/bin/lxc-{verb}", "-P", str(lxcpath), "-n", name, *args], timeout=timeout, check=check)


def cleanup_stale() -> list[str]:
    """Stop and destroy the containers of test processes that are gone (LXC_ROOT/<pid>). Out: their paths."""
    removed = []
    for d in sorted(LXC_ROOT.glob("*")) if LXC_ROOT.is_dir() else []:
        if not d.name.isdigit() or Path(f"/proc/{d.name}").exists():
            continue
        for conf in d.glob("*/config"):
            name = conf.parent.name
            _lxc("unfreeze", d, name, check=False)
            _lxc("stop", d, name, "-k", check=False)
            _lxc("destroy", d, name, check=False)
        shutil.rmtree(d, ignore_errors=True)
        removed.append(str(d))
    return removed


class LxcContainer:
    """Container ``vmid`` (LXC name ``str(vmid)``) in ``lxcpath`` (default LXC_ROOT/<this pid>), booted from
    a fresh copy of :func:`root_tar`. ``rootfs`` is its root on the host."""

    def __init__(self, vmid: int, lxcpath: Path | None = None, tar: Path | None = None) -> None:
        self.vmid = vmid
        self.name = str(vmid)
        self.lxcpath = Path(lxcpath or LXC_ROOT / str(os.getpid()))
        self.directory = self.lxcpath / self.name
        self.rootfs = self.directory / "rootfs"
        if self.directory.exists():
            raise RuntimeError(f"container {self.directory} exists already")
        self.rootfs.mkdir(parents=True)
        _run(["tar", "--numeric-owner", "--xattrs", "-C", str(self.rootfs), "-xf", str(tar or root_tar())], timeout=600)
        (self.rootfs / "etc/hostname").write_text(f"ct{vmid}\n")  # PVE writes it at each start; systemd sets it
        conf = self.lxcpath / f"{self.name}.create.conf"
        conf.write_text(CONFIG.format(hostname=f"ct{vmid}", rootfs=self.rootfs))
        _lxc("create", self.lxcpath, self.name, "-t", "none", "-f", str(conf))
        conf.unlink()
        self.boot_seconds = 0.0

    def lxc(self, verb: str, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``lxc-VERB -P LXCPATH -n NAME ARGS...``; RuntimeError when it fails and ``check``."""
        return _lxc(verb, self.lxcpath, self.name, *args, timeout=timeout, check=check)

    @property
    def log(self) -> Path:
        return self.directory / "lxc.log"

    def start(self, timeout: float = 120) -> None:
        """Boot; returns once systemd inside says the boot is finished (``running``). RuntimeError otherwise."""
        began = time.monotonic()
        self.lxc("start", "-l", "INFO", "-o", str(self.log))
        until = began + timeout
        while True:  # `--wait` waits for the boot once systemd answers; before that it fails at once
            r = self.attach(["systemctl", "is-system-running", "--wait"], timeout=max(1.0, until - time.monotonic()))
            if r.stdout.strip() in (b"running", b"degraded") or time.monotonic() > until:
                break
            time.sleep(0.1)
        if r.stdout.strip() != b"running":
            failed = self.attach(["systemctl", "--failed", "--no-legend"]).stdout.decode(errors="replace")
            raise RuntimeError(f"CT {self.vmid} booted {r.stdout.strip()!r}: failed units: {failed}")
        self.boot_seconds = time.monotonic() - began

    def state(self) -> str:
        """``RUNNING``, ``FROZEN``, ``STOPPED`` (lxc-info)."""
        return self.lxc("info", "-s", "-H").stdout.strip()

    def freeze(self) -> None:
        """Freeze every process of the CT with the cgroup freezer, as vzdump's suspend mode does; returns once
        frozen."""
        self.lxc("freeze")

    def unfreeze(self) -> None:
        self.lxc("unfreeze")

    def stop(self, clean: bool = False) -> None:
        """Kill the CT (``lxc-stop -k``), or with ``clean`` shut it down as ``pct shutdown`` does (its init
        is asked to power off; lxc-stop waits up to 60 s); a frozen one is thawed first."""
        if self.state() == "FROZEN":
            self.unfreeze()
        if clean:
            self.lxc("stop", "-t", "60")
        else:
            self.lxc("stop", "-k", check=False)

    def boot(self) -> None:
        """``lxc-start`` alone, as ``pct start`` does: returns once the init runs, not when the boot is done."""
        self.lxc("start", "-l", "INFO", "-o", str(self.log))

    def init_pid(self) -> int:
        return int(self.lxc("info", "-p", "-H").stdout.strip())

    def freezer(self) -> Path:
        """The CT's cgroup in the freezer hierarchy (``lxc.payload.NAME``: what lxc-freeze freezes)."""
        rel = next(line.split(":", 2)[2] for line in Path(f"/proc/{self.init_pid()}/cgroup").read_text().splitlines()
                   if line.split(":")[1] == "freezer")
        base = Path("/sys/fs/cgroup/freezer") / rel.lstrip("/")
        # init may run in a child cgroup of the CT's (lxc.payload.NAME/...)
        return next(p for p in [base, *base.parents] if p.name.startswith("lxc.payload."))

    def procs(self) -> set[int]:
        """Host pids of the processes in the CT's freezer cgroup and below it (its docker containers too)."""
        return {int(pid) for f in self.freezer().rglob("cgroup.procs") for pid in f.read_text().split()}

    def attach(self, argv: list[str], input: bytes | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        """Run argv in the CT with lxc-attach (test set-up and checks; no pct involved)."""
        return subprocess.run([LXC_ATTACH, "-P", str(self.lxcpath), "-n", self.name, "--", *argv], input=input,
                              capture_output=True, timeout=timeout, env={"PATH": PCT_PATH})

    def ok(self, argv: list[str], **kw: object) -> str:
        """attach(), asserting exit status 0; out: stdout."""
        r = self.attach(argv, **kw)  # type: ignore[arg-type]
        if r.returncode != 0:
            raise RuntimeError(f"CT {self.vmid}: {argv}: exit {r.returncode}: "
                               f"{r.stderr.decode(errors='replace')[-800:]}")
        return r.stdout.decode(errors="replace")

    def file(self, path: str) -> Path:
        """Host path of ``path`` in the CT."""
        return self.rootfs / path.lstrip("/")

    def close(self) -> None:
        """Stop and destroy the CT (its root goes with it)."""
        if self.directory.exists():
            self.stop()
            self.lxc("destroy", check=False)
            shutil.rmtree(self.directory, ignore_errors=True)
        try:
            self.lxcpath.rmdir()
        except OSError:
            pass


# -- the pct stand-in -------------------------------------------------------------------------------

def make_pct(state: Path, lxcpath: Path) -> str:
    """An executable `pct` for the containers in `lxcpath`, logging to `state`; returns its absolute path."""
    state.mkdir(parents=True, exist_ok=True)
    exe = state / "pct"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} -I {Path(__file__).resolve()} pct --state {state} "
                   f"--lxcpath {lxcpath} \"$@\"\n")
    exe.chmod(0o755)
    return str(exe)


def read_calls(state: Path) -> list[dict[str, object]]:
    """Every pct call so far, in the order they began: {"argv", "env", "time", "end", "status"}; ``end`` and
    ``status`` are None for a call that has not ended (killed with its process group, or still running)."""
    path = state / "calls.jsonl"
    calls: dict[tuple[int, float], dict[str, object]] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        rec = json.loads(line)
        key = (rec.pop("pid"), rec["time"])
        calls.setdefault(key, {"end": None, "status": None}).update(rec)
    return sorted(calls.values(), key=lambda c: float(c["time"]))  # type: ignore[arg-type]


def _pct(state: Path, lxcpath: Path, args: list[str]) -> int:
    began = time.time()

    def write(record: dict[str, object]) -> None:
        with open(state / "calls.jsonl", "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "time": began, **record}) + "\n")

    write({"argv": args, "env": dict(os.environ)})

    def log(status: int) -> int:
        write({"end": time.time(), "status": status})
        return status

    if not args or args[0] != "exec":
        print(f"ERROR: unknown command 'pct {' '.join(args[:1])}'", file=sys.stderr)
        return log(255)
    if len(args) < 2 or not args[1].isdigit():
        print("400 not enough arguments\npct exec <vmid> [<extra-args>]", file=sys.stderr)
        return log(255)
    vmid, extra = args[1], args[2:]
    if extra[:1] == ["--"]:
        extra = extra[1:]
    if not (lxcpath / vmid / "config").exists():
        print(f"Configuration file 'nodes/{NODE}/lxc/{vmid}.conf' does not exist", file=sys.stderr)
        return log(255)
    if not extra:
        print("missing command at /usr/share/perl5/PVE/CLI/pct.pm line 221.", file=sys.stderr)
        return log(255)
    # pct runs `lxc-attach -n VMID -- CMD...` with PATH set and the environment kept (lxc-attach's default)
    proc = subprocess.Popen([LXC_ATTACH, "-P", str(lxcpath), "-n", vmid, "--", *extra], env={"PATH": PCT_PATH})
    signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    status = proc.wait()
    log(status)
    return status if status >= 0 else 128 - status


def main(argv: list[str]) -> int:
    if len(argv) < 5 or argv[0] != "pct" or argv[1] != "--state" or argv[3] != "--lxcpath":
        print("usage: lxc_ct.py pct --state DIR --lxcpath DIR exec VMID -- CMD...", file=sys.stderr)
        return 255
    return _pct(Path(argv[2]), Path(argv[4]), argv[5:])


if __name__ == "__main__":
    if sys.argv[1:2] == ["pct"]:
        sys.exit(main(sys.argv[1:]))
    print(root_tar())
