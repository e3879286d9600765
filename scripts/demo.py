"""Demo: a simulated backup against a demo guest, for a machine without Proxmox.

The demo guest is an OpenSSH sshd in its own network namespace that uses this machine's Docker
engine, running a compose PostgreSQL (and a web-like sleeper) with a client writing rows.
The installed `vzdump-hook` is then used as an admin would: `check`, then `simulate` (vzdump's
phase order for the type/mode, each phase a new process with vzdump's emptied environment).
Run by scripts/demo.sh; everything it creates is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.infra import compose  # noqa: E402
from tests.infra.guest import TestGuest  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--type", default="lxc", choices=["lxc", "qemu"])
    ap.add_argument("--mode", default="snapshot", choices=["stop", "suspend", "snapshot"])
    ap.add_argument("--transfer", type=float, default=2.0, help="seconds of simulated data transfer")
    args = ap.parse_args()
    hook = str(Path(sys.executable).with_name("vzdump-hook"))
    tmp = Path(tempfile.mkdtemp(prefix="vzdump-hook-demo."))
    db = compose.make_project("db", {"postgres": "postgres"})
    web = compose.make_project("web", {"app": "sleeper"})
    # The projects come up (PostgreSQL's initdb and start: the longest set-up step) while the
    # guest's namespace and sshd are made; each step still has to succeed before the demo goes on.
    with ThreadPoolExecutor(max_workers=2) as pool:
        ups = [pool.submit(compose.up, p) for p in (db, web)]
        try:
            with TestGuest() as guest:
                for f in ups:
                    f.result()
                compose.wait_pg_ready(db, 60)
                compose.psql(db, "CREATE TABLE IF NOT EXISTS t (id serial primary key, at timestamptz default now())")
                return _play(args, hook, tmp, guest, db, web)
        finally:
            wait(ups)  # an `up` still running would bring containers back after their `down`
            list(pool.map(lambda p: compose.down(p, remove_dir=True), (db, web)))
            shutil.rmtree(tmp, ignore_errors=True)


def _play(args: argparse.Namespace, hook: str, tmp: Path, guest: TestGuest, db: compose.ComposeProject,
          web: compose.ComposeProject) -> int:
    config = tmp / "config.toml"
    config.write_text(
        f"""# demo config: guest 101 is the demo guest
[guests.101]
ssh = {{ host = "{guest.host}", identity_file = "{guest.identity_file}", known_hosts = "{guest.known_hosts_file}" }}
stacks = ["{db.name}", "{web.name}"]
marker_path = "{guest.workdir}/marker.json"
stop_timeout = 10
"""
    )
    env = {**os.environ, "VZDUMP_HOOK_CONFIG": str(config), "VZDUMP_HOOK_RUN_DIR": str(tmp / "run"),
           "VZDUMP_HOOK_STATE_DIR": str(tmp / "state")}
    print(f"== demo guest 101: sshd at {guest.host} (netns {guest.netns}), "
          f"stacks {db.name} (PostgreSQL), {web.name}\n")
    print(f"== {config}:\n{config.read_text()}", flush=True)
    # the guest side (recovery program, units); this demo guest shares the machine's root, so below a directory
    env["VZDUMP_HOOK_GUEST_ROOT"] = str(tmp / "guest-root")
    print("== vzdump-hook guest install 101 --no-restrict", flush=True)
    subprocess.run([hook, "guest", "install", "101", "--no-restrict"], env=env, check=True)
    print("\n== vzdump-hook check", flush=True)
    subprocess.run([hook, "check"], env=env, check=True)
    client = _Client(db)
    print(f"\n== vzdump-hook simulate 101 --type {args.type} --mode {args.mode} --transfer {args.transfer:g}",
          flush=True)
    r = subprocess.run([hook, "simulate", "101", "--type", args.type, "--mode", args.mode,
                        "--transfer", str(args.transfer), "--yes"], env=env)
    # the client's first INSERT begun after the backup: PostgreSQL accepts it (it ends an outage
    # still open, so that it is counted), or 30 s pass and the line below says it did not
    back = client.accepted_after(time.monotonic(), 30)
    down = client.finish()
    rows = compose.psql(db, "SELECT count(*) FROM t").strip()
    print(f"\n== PostgreSQL refused connections for {down:.1f} s in total"
          f"{'' if back else ' (and still refuses them)'}; {rows} rows written by the client; all stacks running: "
          f"{compose.running_services(db) == {'postgres'} and compose.running_services(web) == {'app'}}",
          flush=True)
    print("== vzdump-hook history", flush=True)
    subprocess.run([hook, "history"], env=env)
    return r.returncode


class _Client:
    """Inserts a row every 50 ms (a thread, from construction on); adds up the time PostgreSQL did
    not accept them."""

    def __init__(self, db: compose.ComposeProject) -> None:
        self._db = db
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._down: list[float] = []
        self._since: float | None = None  # start of the outage under way
        self._last_ok: float | None = None  # when the last accepted INSERT was begun
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                ok = subprocess.run(["psql", "-h", str(self._db.socket_dir()), "-U", "postgres", "-Atqc",
                                     "INSERT INTO t DEFAULT VALUES"],
                                    capture_output=True, timeout=5).returncode == 0
            except subprocess.TimeoutExpired:
                ok = False
            with self._cond:
                if not ok and self._since is None:
                    self._since = t
                elif ok:
                    if self._since is not None:
                        self._down.append(t - self._since)
                        self._since = None
                    self._last_ok = t
                    self._cond.notify_all()
            self._stop.wait(0.05)

    def accepted_after(self, t: float, timeout: float) -> bool:
        """Wait until an INSERT begun at t or later was accepted; False after timeout seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: self._last_ok is not None and self._last_ok >= t, timeout)

    def finish(self) -> float:
        """Stop the client; the seconds PostgreSQL refused its INSERTs (an outage still open counts
        up to now)."""
        self._stop.set()
        self._thread.join(10)
        with self._cond:
            return sum(self._down) + (time.monotonic() - self._since if self._since is not None else 0.0)


if __name__ == "__main__":
    sys.exit(main())
