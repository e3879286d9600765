"""The conversation with a guest's controller (docs/controller-api.md, sections 1 and 10), as one table:
which message a controller is told at each moment of a job, by whether it confirmed the job's
`quiesce`. Nothing else picks a message (stacks/controller.py sends them, guest/resume.py and the
phases say when; tests/unit/test_controller_kind.py reads this table).

The rule it holds: a controller that did not confirm the quiesce (an error, an answer that is not one
of the contract, no answer in time, not reachable) is told `abort`, re-sent until confirmed, and
nothing else for that job: never `snapshotted`, `done` or `failed`.
"""

from __future__ import annotations

from enum import Enum


class Moment(str, Enum):
    """When the hook talks to a controller about a job."""

    QUIESCE = "pre-stop"  # right before the point in time
    RESUME = "resume"  # the guest's resume point (vzdump/rules.py), re-tried by later phases, the resident, job-end
    # the hook gives up on the job before the point in time passed for the guest: on_quiesce_error = abort
    # after a failed stop, or vzdump's worker gone before the resume (the resident, guest/resume.py)
    GIVE_UP = "give-up"
    BACKUP_END = "backup-end"  # the archive was written
    BACKUP_ABORT = "backup-abort"  # the guest's backup failed after the quiesce
    JOB_END = "job-end"  # the job ended and neither backup-end nor backup-abort told the controller
    JOB_ABORT = "job-abort"  # the same, for a job that failed
    WORKER_GONE = "worker-gone"  # the node's resident saw vzdump's worker die after the resume
    SWEEP = "sweep"  # a later job-start, `recover`, backup-start: the controller holds a job that is over


NOTHING = ""

# moment -> (the message when the controller confirmed the quiesce, the message when it did not)
CONVERSATION: dict[Moment, tuple[str, str]] = {
    Moment.QUIESCE: ("quiesce", "quiesce"),
    Moment.RESUME: ("snapshotted", "abort"),
    Moment.GIVE_UP: ("abort", "abort"),
    # below, a controller that was told abort at the resume (its end) is told nothing more: these are
    # for the ones told snapshotted
    Moment.BACKUP_END: ("done", NOTHING),
    Moment.BACKUP_ABORT: ("failed", NOTHING),
    Moment.JOB_END: ("abort", NOTHING),
    Moment.JOB_ABORT: ("failed", NOTHING),
    Moment.WORKER_GONE: ("abort", NOTHING),
    Moment.SWEEP: ("abort", "abort"),  # from the controller's own status: whatever it holds open
}

CONFIG_ERROR = "CONFIG ERROR: "  # how a refused token (401/403) or an unusable token file is reported

ENDS = frozenset({"done", "failed", "abort"})  # a job is over for a controller that confirmed one of these
ENDING_PHASES = frozenset({Moment.BACKUP_END.value, Moment.BACKUP_ABORT.value})  # vzdump phases that end a guest's job


def message(moment: Moment, quiesced: bool) -> str:
    """What a controller is told at `moment`: "" for nothing."""
    confirmed, unconfirmed = CONVERSATION[moment]
    return confirmed if quiesced else unconfirmed
