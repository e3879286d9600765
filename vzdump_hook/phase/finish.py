"""job-end and job-abort: last resume attempts for this job's guests, readiness awaited, controllers
told, the summary table, history, and what goes outside the task log (metrics, webhook)."""

from __future__ import annotations

import logging
import time

from ..guest import fanout
from ..node.job import JobId
from ..node.state import GuestRecord, Status
from ..resident import control
from ..vzdump.phases import Phase
from ..vzdump.rules import Outcome
from . import handover, resume_point
from .context import PhaseContext, first_line

log = logging.getLogger("vzdump_hook")


def run(ctx: PhaseContext, phase: Phase) -> Outcome:
    down = finish(ctx, phase)
    why = first_line(ctx.problem) if ctx.problem is not None else ctx.state.config_error()
    if why is not None:
        log.error("%s: the config was unusable, guests were backed up WITHOUT quiescing: %s", phase.value, why)
    s = ctx.settings
    if (s.metrics_file or s.notify) and (phase is Phase.JOB_END or not ctx.state.flag("reported")):
        tell_outside(ctx, ending=True, config_problem=why)  # job-abort: only when job-end did not
    return Outcome(still_down=down, config_error=why is not None)


def finish(ctx: PhaseContext, phase: Phase) -> bool:
    """Last resume attempts for this job's guests, then the summary table. True if anything is down."""
    for r in ctx.state.records():
        if r.status.pending:
            handover.hear_resident(ctx, r.vmid, phase)  # its last attempt, with this phase's wait
    records = _last_attempts(ctx, phase)
    if records:
        for line in summary(records):
            log.info("%s", line)
    down = [r.vmid for r in records if r.status.pending]
    for r in records:
        for level, text in control.leftover_lines(ctx.state.job_dir, r.vmid):
            log.log(level, "%s", text)  # its lines: escaped like any argument
    for _, info in control.residents(ctx.settings.run_dir):
        if JobId.from_dict(info.job) == ctx.job and info.vmid in down:
            until = time.strftime("%H:%M:%S", time.localtime(info.deadline))
            log.warning("%s %d: its resident keeps trying to start the stacks until %s (the marker's deadline)",
                        phase.value, info.vmid, until)
    if down:
        log.warning("%s: stacks still DOWN in guest(s) %s: run `vzdump-hook recover` on %s", phase.value,
                    ", ".join(map(str, down)), ctx.job.node)
    for r in records:
        if r.status is not Status.RESUMED and r.stop_started is not None:
            try:
                ctx.state.record_history(r)
            except Exception as e:
                log.warning("history not written: %s", e)
    return bool(down)


def _last_attempts(ctx: PhaseContext, phase: Phase) -> list[GuestRecord]:
    """Resume what is still down, await readiness, tell the controllers; the records after that."""
    records = ctx.state.records()
    pending = [r for r in records if r.status.pending]
    if pending:
        fanout.run_all(lambda r: _finish_one(ctx, r, phase), pending, ctx.deadline)
        records = ctx.state.records()
    awaited = [r for r in records if r.status is Status.RESUMED and r.ready_pending]
    if awaited:  # the table and the history end the downtime when the apps answered
        fanout.run_all(lambda r: _await_ready(ctx, r, phase), awaited, ctx.deadline)
        records = ctx.state.records()
    unclosed = [r for r in records if r.unclosed_controllers]
    if unclosed:
        fanout.run_all(lambda r: resume_point.close_controllers(ctx, r.vmid, phase), unclosed, ctx.deadline)
        records = ctx.state.records()
    return records


def tell_outside(ctx: PhaseContext, ending: bool, config_problem: str | None = None) -> None:
    """The metrics textfile and the webhook (node/report.py). `ending` (job-end, after every resume
    attempt): this job's records and message; else only the undelivered notifications of
    earlier jobs are retried. Never raises: reporting does not change a backup's outcome."""
    from ..node import report

    try:
        if not ending:
            report.notify(ctx.settings, None)
            return
        records = ctx.state.records()
        if records:
            report.update_metrics(ctx.settings, records)
        report.notify(ctx.settings, report.job_message(ctx.job.node, str(ctx.job), records, config_problem))
        ctx.state.set_flag("reported")
    except Exception as e:
        log.warning("report: %s: %s", type(e).__name__, e)


def _await_ready(ctx: PhaseContext, rec: GuestRecord, phase: Phase) -> None:
    guest = ctx.recorded_guest(rec, phase)
    if guest is None:
        return
    with ctx.session(guest) as ctl:
        ctx.resumer.await_ready(ctl, phase.value)


def _finish_one(ctx: PhaseContext, rec: GuestRecord, phase: Phase) -> None:
    guest = ctx.guest(rec.vmid, rec)
    if guest is not None:
        resume_point.resume(ctx, guest, phase, wait=True)


RESULTS = {
    Status.RESUMED: "ok",
    Status.NOTHING_STOPPED: "nothing stopped",
    Status.SKIPPED: "guest not running",
    Status.PREFLIGHT_OK: "ok (not quiesced)",
    Status.PREFLIGHT_FAILED: "not quiesced (guest not ready)",
    Status.CONFIG_ERROR: "not quiesced (config unusable)",
}


def summary(records: list[GuestRecord]) -> list[str]:
    """The job-end table: guest, stacks, seconds down, result (this goes into PVE's notification mail)."""
    rows = [("guest", "stacks", "down s", "result")]
    for r in records:
        stacks = ",".join(s.name for s in r.stacks) or "-"
        down = f"{r.downtime:.1f}" if r.downtime is not None else "-"
        result = RESULTS.get(r.status, "STILL DOWN")
        if r.crash_consistent and r.status not in (Status.PREFLIGHT_FAILED, Status.CONFIG_ERROR):
            result += ", crash-consistent"
        if r.absent:
            result += f", {len(r.absent)} configured name(s) NOT IN THE GUEST"
        if r.not_ready:
            result += f", NOT READY: {','.join(r.not_ready)}"
        rows.append((str(r.vmid), stacks, down, result))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
