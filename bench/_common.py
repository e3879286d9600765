"""Shared by the benchmark scripts: import path, the machine description, a PostgreSQL readiness
poller, temp dirs and clean-up. The scripts reuse tests/infra (TestGuest, compose projects, the
vzdump stand-in) and tests/integration/hookenv (config writer, installed hook)."""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.infra.compose import PG_BIN  # noqa: E402

__all__ = ["ROOT", "Load", "PgPoller", "machine", "median", "need_root", "pg_ready", "reproduce", "scratch_dir"]


def need_root() -> None:
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark needs network namespaces, sshd and docker (scripts/setup-test-host.sh)")


def _first_line(argv: Sequence[str]) -> str:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (proc.stdout.strip() or proc.stderr.strip() or "?").splitlines()[0]


def machine() -> str:
    """One paragraph: CPUs, memory, kernel, docker, compose, python, hook version."""
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    try:
        from importlib.metadata import version

        hook_version = version("vzdump-hook")
    except Exception:  # noqa: BLE001 - only for the report
        hook_version = "?"
    rev = _first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    return (f"machine: {os.cpu_count()} CPUs ({model}), {mem} RAM, Linux {platform.release()}; "
            f"docker {_first_line(['docker', 'version', '--format', '{{.Server.Version}}'])}, "
            f"compose v2 {_first_line(['docker', 'compose', 'version', '--short'])}, "
            f"compose v1 {_first_line(['docker-compose', 'version', '--short'])}; "
            f"python {platform.python_version()}; vzdump-hook {hook_version} (git {rev})")


def reproduce(script: str, argv: Sequence[str]) -> str:
    return f"cd {shlex.quote(str(ROOT))} && sudo python3 bench/{script} " + shlex.join(list(argv))


def baseline_hook(rev: str, tmp: Path) -> str:
    """The package of `rev` under tmp, and an executable that runs it with this venv's Python."""
    src = tmp / f"baseline-{rev[:10]}"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "vzdump_hook"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    exe = tmp / "baseline-hook"
    exe.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(src)!r})\n"
                   "from vzdump_hook.cli import main\nmain()\n")
    exe.chmod(0o755)
    return str(exe)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


class scratch_dir:  # noqa: N801 - used like tempfile.TemporaryDirectory
    """A temp dir under /tmp (short paths for unix sockets), removed on exit."""

    def __init__(self, prefix: str) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class PgPoller(threading.Thread):
    """Polls PostgreSQL on a unix socket every `interval` seconds with pg_isready; keeps
    (monotonic time of the answer, accepting connections) samples."""

    def __init__(self, socket_dir: Path, interval: float = 0.05) -> None:
        super().__init__(daemon=True, name="pg-poller")
        self.socket_dir = socket_dir
        self.interval = interval
        self.samples: list[tuple[float, bool]] = []
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        argv = [f"{PG_BIN}/pg_isready", "-q", "-h", str(self.socket_dir), "-U", "postgres", "-t", "1"]
        while not self._halt.is_set():
            started = time.monotonic()
            ok = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True).returncode == 0
            with self._lock:
                self.samples.append((time.monotonic(), ok))
            self._halt.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def window(self, start: float, end: float) -> list[tuple[float, bool]]:
        with self._lock:
            return [s for s in self.samples if start <= s[0] <= end]

    def halt(self) -> None:
        self._halt.set()
        self.join(timeout=5)


class Load(threading.Thread):
    """One INSERT into `table` (own connection) every 20 ms: the consistency tests' write load."""

    def __init__(self, socket_dir: Path, table: str = "t") -> None:
        super().__init__(daemon=True)
        self.argv = [f"{PG_BIN}/psql", "-X", "-q", "-h", str(socket_dir), "-U", "postgres",
                     "-c", f"insert into {table} (v) values (1)"]
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            subprocess.run(self.argv, stdin=subprocess.DEVNULL, capture_output=True,
                           env={"PATH": "/usr/bin:/bin", "PGCONNECT_TIMEOUT": "2"})
            self._halt.wait(0.02)

    def halt(self) -> None:
        self._halt.set()
        self.join(timeout=10)


def pg_ready(socket_dir: Path, timeout: float = 60) -> None:
    """Returns once PostgreSQL accepts connections on `socket_dir`; TimeoutError after `timeout` s."""
    until = time.monotonic() + timeout
    while subprocess.run([f"{PG_BIN}/pg_isready", "-q", "-h", str(socket_dir), "-U", "postgres", "-t", "1"],
                         capture_output=True).returncode:
        if time.monotonic() > until:
            raise TimeoutError(f"PostgreSQL at {socket_dir} does not answer")
        time.sleep(0.1)
