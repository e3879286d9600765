"""job-start: the config's problems in the task log, this node's report for `check --cluster`, and
the sweep: resume what jobs that are over left down, asking only guests that may hold a marker."""

from __future__ import annotations

import logging
import shutil
import time
from typing import TYPE_CHECKING

from .. import config as configuration
from ..config import GuestConfig
from ..errors import HookError
from ..guest import fanout
from ..node import pve, tags
from ..node.state import forget_recovery_answers
from ..vzdump.rules import Outcome
from .context import PhaseContext, first_line
from .finish import tell_outside

if TYPE_CHECKING:
    from ..node.ledger import Entry

log = logging.getLogger("vzdump_hook")


def run(ctx: PhaseContext) -> Outcome:
    report_config(ctx)
    report_node(ctx)
    sweep(ctx)
    if ctx.settings.notify is not None:
        tell_outside(ctx, ending=False)  # what earlier jobs could not deliver
    return Outcome()


def report_config(ctx: PhaseContext) -> None:
    """Every problem of an unusable config as an ERROR line (the job goes on without quiescing,
    job-end fails), or the config's contradictions as WARNING lines."""
    ctx.state.write_job_info()
    if ctx.problem is not None:
        source = ctx.problem.source or configuration.config_path(None)
        for p in ctx.problem.problems:
            log.error("config %s: %s", source, p)
        log.error("job-start: the config is unusable: every guest is backed up WITHOUT quiescing (crash-consistent); "
                  "job-end will report the job failed. Fix it, then run `vzdump-hook check`")
        ctx.state.note_config_error(f"{source}: {first_line(ctx.problem)}")
        return
    assert ctx.cfg is not None
    for w in configuration.warnings(ctx.cfg) + tags.warnings(ctx.cfg):
        log.warning("config %s: %s", ctx.cfg.source, w)


def report_node(ctx: PhaseContext) -> None:
    """What this node runs, for `check --cluster` on any node (node/cluster.py); after an upgrade, the
    answers about guests' recovery programs are stale (the guest files changed)."""
    from ..node import cluster

    version = cluster.installed_version()
    try:
        forget_recovery_answers(ctx.settings.state_dir, unless_version=version)
        cluster.report(ctx.settings.pve_dir, ctx.job.node, version=version)
    except OSError as e:
        log.debug("job-start: node report not written: %s", e)


def sweep(ctx: PhaseContext) -> None:
    """Resume what jobs that are over left down: first from this node's records of them (with
    the settings recorded at their quiesce, so a config broken since cannot strand stacks),
    then the markers the ledger lists, and the guests it does not cover yet (unknown). Only
    guests of this node that run are asked, all at once, within sweep_timeout."""
    from ..guest.recovery import Recovery, recover_guest
    from ..node.ledger import LedgerError

    start = time.monotonic()
    budget = min(ctx.left(), ctx.settings.sweep_timeout)
    sweep_deadline = time.monotonic() + budget
    recorded, kept = _over_jobs(ctx)
    members = ({m.vmid: m.guest for m in tags.members(ctx.cfg, ctx.job.node) if m.guest is not None}
               if ctx.cfg is not None else {})
    try:
        entries, known = ctx.ledger.entries(), ctx.ledger.known()
    except LedgerError as e:
        log.warning("job-start: %s: every configured guest is asked", e)
        entries, known = {}, set()
    guests, waiting = _to_ask(ctx, _candidates(ctx, members, entries, known, recorded), recorded, entries)
    if not guests:
        log.info("job-start: no guest of this node may hold a marker (%d configured, ledger %s): none asked",
                 len(members), ctx.ledger.dir)
        return

    def ask(g: GuestConfig) -> Recovery:
        return recover_guest(g, ctx.job, ctx.state, sweep_deadline, ledger=ctx.ledger, seen=entries.get(g.vmid, []))

    outcomes = fanout.run_all(ask, guests, sweep_deadline + 1.0)
    results = [o if o is not None else Recovery(f"{g.vmid}: no answer within the sweep's {budget:.0f} s", True, False)
               for g, o in zip(guests, outcomes, strict=True)]
    try:
        ctx.ledger.mark_known(g.vmid for g, r in zip(guests, results, strict=True) if r.covered)
    except LedgerError as e:
        log.warning("job-start: %s: the next job-start asks those guests again", e)
    down = {g.vmid for g, r in zip(guests, results, strict=True) if r.down} | waiting
    for directory, vmids in kept.items():
        if not vmids & down:  # kept while a recorded guest is down
            shutil.rmtree(directory, ignore_errors=True)
    found = [r.text for r in results if r.text]
    for line in found:
        log.info("job-start %s", line)
    unknown = sum(1 for g in guests if g.vmid not in known and g.vmid not in entries)
    why = f" ({len(guests) - unknown} in the ledger, {unknown} not covered by it yet)" if unknown else ""
    log.info("job-start: %d guest(s) checked for leftover markers in %.1f s%s%s", len(guests),
             time.monotonic() - start, why, "" if found else ", none found")


def _over_jobs(ctx: PhaseContext) -> tuple[dict[int, GuestConfig], dict[str, set[int]]]:
    """The guests whose stacks a job that is over may have left down (with their recorded settings),
    and those jobs' directories, kept until their guests are up; the other over jobs' are removed."""
    recorded: dict[int, GuestConfig] = {}
    kept: dict[str, set[int]] = {}
    for job, directory in ctx.state.other_jobs():
        if job is None or job.is_over() is not True:
            continue
        try:
            pending = [r for r in ctx.state.records(directory) if r.status.pending]
        except HookError as e:
            log.warning("job-start: %s", e)
            pending = []
        for r in pending:
            if (g := ctx.recorded_guest(r)) is not None:
                recorded[g.vmid] = g
                kept.setdefault(directory, set()).add(g.vmid)
        if directory not in kept:
            shutil.rmtree(directory, ignore_errors=True)
    return recorded, kept


def _candidates(ctx: PhaseContext, members: dict[int, GuestConfig], entries: dict[int, list[Entry]], known: set[int],
                recorded: dict[int, GuestConfig]) -> dict[int, GuestConfig]:
    """The guests that may hold a marker: not covered by the ledger yet, in it, or recorded by an over job."""
    from ..guest.recovery import guest_of_entries
    from ..stacks.controller_table import with_current_ways

    candidates = {vmid: g for vmid, g in members.items() if vmid not in known}
    for vmid, es in entries.items():
        if (g := guest_of_entries(es)) is not None:
            g = with_current_ways(g, members.get(vmid))  # a token or pin fixed since is the one used
        if (g := g or members.get(vmid)) is not None:
            candidates[vmid] = g
        else:
            log.warning("job-start %d: in the ledger %s, but neither the config nor its entry says how to reach it: "
                        "`vzdump-hook status`", vmid, ctx.ledger.dir)
    candidates.update(recorded)
    return candidates


def _to_ask(ctx: PhaseContext, candidates: dict[int, GuestConfig], recorded: dict[int, GuestConfig],
            entries: dict[int, list[Entry]]) -> tuple[list[GuestConfig], set[int]]:
    """Of the candidates, those this node asks now (its own, running), and those it cannot ask (not running)."""
    s = ctx.settings
    guests: list[GuestConfig] = []
    waiting: set[int] = set()
    for vmid, g in sorted(candidates.items()):
        if vmid not in recorded and pve.guest_is_local(s.pve_dir, ctx.job.node, vmid) is False:
            continue  # another node's guest: that node asks it
        vmtype = (pve.local_type(s.pve_dir, ctx.job.node, vmid)
                  or next((e.vmtype for e in entries.get(vmid, ()) if e.vmtype), ""))
        if vmtype and pve.guest_running(vmtype, vmid, s.pve_dir, s.qmp_dir) is False:
            log.info("job-start %d: not running (PVE), not asked: "
                     "a marker in it waits for the guest-side recovery at boot, "
                     "or for its next backup's backup-start", vmid)
            waiting.add(vmid)
            continue
        guests.append(g)
    return guests, waiting
