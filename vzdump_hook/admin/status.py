"""`vzdump-hook status`: the markers in the guests next to the ledger of outstanding markers, and this
node's records of running and recent jobs."""

from __future__ import annotations

import os
import sys
import time

import click

from ..config import Config, GuestConfig, HookSettings
from ..errors import HookError
from ..guest.marker import Marker
from ..guest.recovery import guest_of_entries
from ..guest.session import GuestSession, describe
from ..node import pve
from ..node.job import JobId
from ..node.ledger import Entry, Ledger
from ..node.state import GuestRecord, HostState
from ..phase.runner import settings_with_env
from ..resident import client, control
from ..text import escape
from .common import config_option, contact, ledger_entries, load_config, open_ledger, targets


@click.command("status")
@config_option
@click.option("--no-connect", is_flag=True,
              help="Only the node's records and the ledger; do not ask the guests for markers.")
@click.option("--timeout", default=15.0, show_default=True, help="Seconds for the guests to answer.")
def status(config_path: str | None, no_connect: bool, timeout: float) -> None:
    """Markers in the guests next to the ledger of outstanding markers, and this node's records of
    running and recent jobs. Exit 1 when stacks are down that no running backup explains (a marker
    or record of a job that is over, or not of this node), or a guest's state is unknown
    (unreachable); 0 when everything runs. A guest PVE says is not running is not asked (its stacks
    start with it). Where the ledger and a guest disagree, the line says so."""
    cfg = load_config(config_path)
    settings = settings_with_env(cfg.hook, os.environ)
    bad = _show_jobs(settings)  # something is down that no running job explains, or unknown
    _show_residents(settings)
    ledger = open_ledger(settings)
    entries = ledger_entries(ledger)
    known = ledger.known()
    _show_ledger(ledger, entries)
    if no_connect:
        for vmid, es in sorted(entries.items()):
            click.echo(f"{vmid}: ledger: {'; '.join(e.describe() for e in es)}")
        sys.exit(1 if bad else 0)
    asked = _guests_to_ask(cfg, settings, entries, known)
    down = _ask_guests(asked, timeout, entries, known)
    sys.exit(1 if bad or down else 0)


def _show_jobs(settings: HookSettings) -> bool:
    """A line for each job this node has records of, oldest first; whether a job that is over left
    something down."""
    jobs_dir = os.path.join(settings.run_dir, "jobs")
    try:
        keys = sorted(os.listdir(jobs_dir), key=lambda k: os.path.getmtime(os.path.join(jobs_dir, k)))
    except FileNotFoundError:
        keys = []
    bad = False
    for key in keys:
        pid, _, start = key.partition("-")
        job = JobId(JobId.current().node, "", int(pid), int(start or 0))
        recs = HostState(settings, job).records()
        running = os.path.exists(f"/proc/{pid}")
        click.echo(f"job {key} ({'running' if running else 'over'}): "
                   + ("; ".join(_rec_line(r) for r in recs) if recs else "no guests"))
        bad = bad or (not running and any(r.status.pending for r in recs))
    return bad


def _show_residents(settings: HookSettings) -> None:
    for job_dir, info in control.residents(settings.run_dir):
        answer = client.tell(job_dir, info.vmid, "", wait=2.0)
        what = str(answer.get("state", "?")) if answer else "not answering"
        stacks = ", ".join(map(str, answer.get("stacks", ()))) if answer else ""
        click.echo(f"  resident {info.vmid} (pid {info.pid}, job {os.path.basename(job_dir)}): {escape(what)}, stacks "
                   f"{escape(stacks) or '-'}; gives up at {time.strftime('%H:%M:%S', time.localtime(info.deadline))}")


def _show_ledger(ledger: Ledger, entries: dict[int, list[Entry]]) -> None:
    count = sum(map(len, entries.values()))
    listed = f"{count} {'entry' if count == 1 else 'entries'} for guest(s) {', '.join(map(str, sorted(entries)))}"
    click.echo(f"ledger {ledger.dir}: " + (listed if entries else "no outstanding marker"))


def _guests_to_ask(cfg: Config, settings: HookSettings, entries: dict[int, list[Entry]],
                   known: set[int]) -> list[GuestConfig]:
    """The guests handled and those the ledger has entries for, but for those PVE says are not
    running (a line for each of them here)."""
    guests = {g.vmid: g for g in targets(cfg, None)}
    for vmid, es in entries.items():
        if vmid not in guests and (g := guest_of_entries(es)) is not None:
            guests[vmid] = g
    node = JobId.current().node
    asked: list[GuestConfig] = []
    for vmid, g in sorted(guests.items()):
        vmtype = pve.local_type(settings.pve_dir, node, vmid)
        if vmtype and pve.guest_running(vmtype, vmid, settings.pve_dir, settings.qmp_dir) is False:
            click.echo(f"{vmid}: not running (PVE), not asked; {_ledger_says(entries.get(vmid), vmid in known)}")
        else:
            asked.append(g)
    return asked


def _ask_guests(asked: list[GuestConfig], timeout: float, entries: dict[int, list[Entry]], known: set[int]) -> bool:
    """A line for each guest, all asked at once; whether any counts as down."""
    answers = contact(lambda g: _ask_guest(g, timeout, entries.get(g.vmid), g.vmid in known), asked, timeout + 5)
    bad = False
    for g, a in zip(asked, answers, strict=True):
        line, down = a if a is not None else (f"{g.vmid}: marker unknown: no answer within {timeout + 5:g} s", True)
        click.echo(escape(line))
        bad = bad or down
    return bad


def _ask_guest(g: GuestConfig, timeout: float, es: list[Entry] | None, known: bool) -> tuple[str, bool]:
    ctl = GuestSession(g, JobId.current())
    try:
        m = ctl.read_marker(time.monotonic() + timeout)
        line, down = _marker_line(g.vmid, m, es, known)
        # a controller keeps its own marker: what it holds (stacks/controller.py)
        for name, text, held in ctl.driver.controllers.end_stale(False, timeout, act=False):
            line += f"; controller {name}: {text or 'holds nothing'}"
            down = down or held
        return line, down
    except HookError as e:
        return f"{g.vmid}: marker unknown: {describe(e)}; {_ledger_says(es, known)}", True
    finally:
        ctl.close()


def _ledger_says(es: list[Entry] | None, known: bool) -> str:
    if es:
        return "ledger: " + "; ".join(e.describe() for e in es)
    return "ledger: no entry" if known else "ledger: does not cover it yet (the next job-start asks it)"


def _marker_line(vmid: int, m: Marker | None, es: list[Entry] | None, known: bool) -> tuple[str, bool]:
    """The status line of a guest that answered, and whether it counts as down."""
    ledger = _ledger_says(es, known)
    if m is None:
        extra = (": DISAGREES, no marker (a crash between the two writes, or the guest recovered itself): "
                 "the next job-start removes the entry") if es else ""
        return f"{vmid}: no marker; {ledger}{extra}", False
    over = m.job.is_over()
    state = "job over" if over else "job running" if over is False else "job of another node"
    line = (f"{vmid}: MARKER of job {m.job} ({state}, {'expired' if m.expired else 'deadline ahead'}): "
            f"{', '.join(s.name for s in m.stacks)}; {ledger}")
    if not es and known:
        line += f": DISAGREES, job-start would not ask this guest (`vzdump-hook recover {vmid}`)"
    return line, over is not False or m.expired


def _rec_line(r: GuestRecord) -> str:
    down = f" down {r.downtime:.1f} s" if r.downtime is not None else ""
    # a controller job stays open until the controller confirmed its end (stacks/conversation.py)
    unclosed = [s.name for s in r.unclosed_controllers]
    open_jobs = f", controller job open: {', '.join(unclosed)} (not told its end yet)" if unclosed else ""
    return f"{r.vmid} {r.vmtype.value}/{r.mode.value} {r.status.value}{down}{open_jobs}"
