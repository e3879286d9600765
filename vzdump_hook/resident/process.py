"""The resident: one detached process per guest and vzdump job, from right before the stop until the
stacks run again. It holds a session to the guest open and owns the resume.

Armed by `pre-stop` before anything stops (phase/runner.py), it starts the stacks, exactly once (under the
per-guest lock every resume path takes, resume.py), at the first of:
- a phase hook tells it a phase over its unix socket, and that phase is a resume point
  (rules.plan); cli.py tells it before anything else is imported, so the start is sent a few
  milliseconds after vzdump runs the hook;
- QEMU's backup job has started (early_resume; qemu/watcher.py), once the last hook before the job
  has passed (snapshot: told `post-restart`; suspend, stop: the stop is done);
- the vzdump worker of its job is gone: the job is over, provably, and no phase will come;
- a job phase (`job-end`, `job-abort`) tells it: the job's last attempt.
A start that fails (guest unreachable, sshd restarting) is retried with a growing pause. It ends once
the stacks run again (whoever started them), or at the marker's deadline, when the guest-side
recovery takes over; its own watchdog ends it shortly after that whatever hangs.

It is never the only path: a phase that finds no resident, or gets no answer within ANSWER_WAIT,
resumes the stacks itself as it would without one. A resident SIGKILLed, or whose run directory was
wiped (it keeps its record in memory and listens again), costs speed, never a start.

Its files, in the job's run directory: `resident-VMID.json` (what it needs, its pid),
`resident-VMID.sock`, and `resident-VMID.log` (its task log lines that no phase has shown yet, as
JSON [level, text] lines; anything else there is its stderr).

This module is its command line (`python3 -I -m vzdump_hook.resident.process INFO_FILE`) and what the
phases and `status` use of it, which is in control.py (the info file, arm, spawn, stop, the lines it
left); the process is daemon.py (Resident), its socket server.py, its watch of QEMU's backup job watch.py.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from .control import load

HARD_GRACE = 15.0  # seconds past its deadline before its watchdog ends it


def main(argv: list[str] | None = None) -> int:
    """`python -m vzdump_hook.resident.process INFO_FILE`: run a resident (armed by vzdump-hook)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m vzdump_hook.resident.process INFO_FILE (armed by vzdump-hook)", file=sys.stderr)
        return 2
    info = load(args[0])
    if info is None:
        return 0
    if os.environ.get("VZDUMP_HOOK_DEBUG"):
        logging.getLogger("vzdump_hook").setLevel(logging.DEBUG)
    else:
        logging.getLogger("vzdump_hook").setLevel(logging.INFO)
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    logging.getLogger("vzdump_hook").propagate = False
    from .daemon import Resident

    resident = Resident(info, args[0])
    hard = threading.Timer(resident.left() + HARD_GRACE, os._exit, args=(0,))  # whatever hangs, it ends
    hard.daemon = True
    hard.start()
    return resident.run()


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # never wait for a thread stuck on a dead guest
