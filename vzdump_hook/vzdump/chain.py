"""Other hook scripts (`[hook] chain`): vzdump takes one `script:`, so an admin's existing hook runs
from here, with vzdump's exact arguments and environment, its output going to the task log as before.

When, per phase (phase/runner.py): before the hook's own work in `pre-stop` (the stop stays right before the
backup's point in time, and a script that fails there fails the backup before anything is stopped),
after it in every other phase (stacks start again first; `job-end` sums up first). A script's exit
status counts as it would on its own (vzdump's rules); one that runs longer than `chain_timeout` is
killed with its process group and counts as failed: vzdump itself would wait forever.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL for a script past its timeout
# set by the launcher for this program, not part of vzdump's environment
OWN_ENV = ("VZDUMP_HOOK_LAUNCHER", "VZDUMP_HOOK_NO_LC_CTYPE")
# vzdump gave no LC_CTYPE: the one Python's locale coercion set is not passed on
NO_LC_CTYPE = "VZDUMP_HOOK_NO_LC_CTYPE"


def run(scripts: Sequence[str], argv: Sequence[str], env: Mapping[str, str], timeout: float) -> int:
    """Run each script in order with `argv` and `env`; the first non-zero exit status (or 0).
    A script that fails does not keep the next from running: each may have its own job to do."""
    first = 0
    child_env = {k: v for k, v in env.items() if k not in OWN_ENV and not (k == "LC_CTYPE" and env.get(NO_LC_CTYPE))}
    for script in scripts:
        code = _run_one(script, argv, child_env, timeout)
        first = first or code
    return first


def _run_one(script: str, argv: Sequence[str], env: dict[str, str], timeout: float) -> int:
    what = " ".join([os.path.basename(script), *argv])
    sys.stdout.flush()  # our lines before the script's, as the task log shows them
    start = time.monotonic()
    try:
        proc = subprocess.Popen([script, *argv], env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as e:
        log.error("chain: %s could not be started: %s", script, e.strerror or e)
        return 1
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        log.error("chain: %s still running after chain_timeout (%g s): killed, counts as failed", what, timeout)
        return 1
    took = time.monotonic() - start
    if code < 0:
        log.error("chain: %s ended by signal %d after %.1f s: counts as failed", what, -code, took)
        return 1
    if code:
        log.warning("chain: %s exited %d after %.1f s", what, code, took)
    else:
        log.debug("chain: %s ok in %.1f s", what, took)
    return code


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the script's process group, SIGKILL to what is left of it after KILL_GRACE: a
    leftover child holding the task log's pipe would keep vzdump waiting."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(KILL_GRACE)
        except subprocess.TimeoutExpired:
            pass
