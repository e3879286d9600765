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
import subprocess
import sys
import tempfile
import threading
import time
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
    with TestGuest() as guest:
        db = compose.make_project("db", {"postgres": "postgres"})
        web = compose.make_project("web", {"app": "sleeper"})
        try:
            for p in (db, web):
                compose.up(p)
            compose.wait_pg_ready(db, 60)
            compose.psql(db, "CREATE TABLE IF NOT EXISTS t (id serial primary key, at timestamptz default now())")
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
            print(f"== {config}:\n{config.read_text()}")
            # the guest side (recovery program, units); this demo guest shares the machine's root, so below a directory
            env["VZDUMP_HOOK_GUEST_ROOT"] = str(tmp / "guest-root")
            print("== vzdump-hook guest install 101 --no-restrict")
            subprocess.run([hook, "guest", "install", "101", "--no-restrict"], env=env, check=True)
            print("\n== vzdump-hook check")
            subprocess.run([hook, "check"], env=env, check=True)
            stop = threading.Event()
            down: list[float] = []
            threading.Thread(target=_poll, args=(db, stop, down), daemon=True).start()
            print(f"\n== vzdump-hook simulate 101 --type {args.type} --mode {args.mode} --transfer {args.transfer:g}")
            r = subprocess.run([hook, "simulate", "101", "--type", args.type, "--mode", args.mode,
                                "--transfer", str(args.transfer), "--yes"], env=env)
            time.sleep(1)
            stop.set()
            rows = compose.psql(db, "SELECT count(*) FROM t").strip()
            print(f"\n== PostgreSQL refused connections for {sum(down):.1f} s in total; "
                  f"{rows} rows written by the client; all stacks running: "
                  f"{compose.running_services(db) == {'postgres'} and compose.running_services(web) == {'app'}}")
            print("== vzdump-hook history")
            subprocess.run([hook, "history"], env=env)
            return r.returncode
        finally:
            for p in (db, web):
                compose.down(p, remove_dir=True)


def _poll(db: compose.ComposeProject, stop: threading.Event, down: list[float]) -> None:
    """Insert a row every 50 ms; add up the time PostgreSQL did not accept them."""
    since: float | None = None
    while not stop.is_set():
        t = time.monotonic()
        ok = subprocess.run(["psql", "-h", str(db.socket_dir()), "-U", "postgres", "-Atqc",
                             "INSERT INTO t DEFAULT VALUES"],
                            capture_output=True, timeout=5).returncode == 0
        if not ok and since is None:
            since = t
        elif ok and since is not None:
            down.append(t - since)
            since = None
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
