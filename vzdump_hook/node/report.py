"""What the hook tells outside the task log, at job-end: a node_exporter textfile (`[hook]
metrics_file`) and a webhook (`[hook.notify]`). Both run after the last resume attempts, so a
notifier living in a quiesced guest is up again; both are bounded in time, never raise and never
change an exit status. Undelivered notifications are queued under state_dir and retried at the
next job's start and end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..config import HookSettings, NotifyConfig
from ..text import escape
from . import safefile
from .state import GuestRecord, Status, write_atomic

log = logging.getLogger(__name__)

METRICS_STATE = "metrics.json"  # per guest: what the textfile says, kept across jobs (one job backs up some guests)
QUEUE_DIR = "notify-queue"
MAX_QUEUED = 100
RESULTS = ("ok", "crash-consistent", "not-quiesced", "still-down")


def result_of(rec: GuestRecord) -> str:
    """One word for a guest's outcome in a job, as the metrics and notifications name it."""
    if rec.status.pending:
        return "still-down"
    if rec.status in (Status.PREFLIGHT_FAILED, Status.CONFIG_ERROR):
        return "not-quiesced"
    if rec.crash_consistent:
        return "crash-consistent"
    return "ok"


# -- metrics -------------------------------------------------------------------------------------


def update_metrics(settings: HookSettings, records: Iterable[GuestRecord], now: float | None = None) -> None:
    """Fold this job's records into the kept per-guest state and write the textfile atomically."""
    if not settings.metrics_file:
        return
    now = time.time() if now is None else now
    path = os.path.join(settings.state_dir, METRICS_STATE)
    try:
        with open(path) as f:
            guests: dict[str, dict[str, Any]] = json.load(f)
        if not isinstance(guests, dict):
            guests = {}
    except (OSError, ValueError):
        guests = {}
    for rec in records:
        if rec.status is Status.SKIPPED:
            continue
        old = guests.get(str(rec.vmid), {})
        result = result_of(rec)
        guests[str(rec.vmid)] = {
            "stacks": [s.name for s in rec.stacks],
            "down": [s.name for s in rec.stacks] if rec.status.pending else [],
            "downtime": rec.downtime,
            "result": result,
            "last_success": now if result == "ok" else old.get("last_success"),
        }
    try:
        safefile.private_dir(settings.state_dir)
        write_atomic(path, json.dumps(guests, sort_keys=True))
        _write(settings.metrics_file, render(guests, now), 0o644)  # node_exporter's user reads it
    except OSError as e:
        log.warning("metrics: %s not written: %s", settings.metrics_file, e.strerror or e)
    except safefile.UnsafePath as e:
        log.warning("metrics: %s", e)


def render(guests: dict[str, dict[str, Any]], now: float) -> str:
    """The Prometheus text format of the kept per-guest state."""
    out: list[str] = []

    def metric(name: str, help_: str, samples: list[tuple[dict[str, str], float]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} gauge")
        for labels, value in samples:
            text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{text}}} {float(value)!r}" if text else f"{name} {float(value)!r}")

    vmids = sorted(guests, key=int)
    metric("vzdump_hook_last_downtime_seconds",
           "App downtime of each stack in the guest's last backup (stop until started again).",
           [({"vmid": v, "stack": s}, guests[v]["downtime"]) for v in vmids for s in guests[v]["stacks"]
            if guests[v]["downtime"] is not None])
    metric("vzdump_hook_last_result",
           "Outcome of the guest's last backup as the hook saw it: 1 for the result that applies.",
           [({"vmid": v, "result": r}, float(guests[v]["result"] == r)) for v in vmids for r in RESULTS])
    metric("vzdump_hook_last_success_timestamp_seconds",
           "When the guest's last application-consistent backup ended (Unix time).",
           [({"vmid": v}, guests[v]["last_success"]) for v in vmids if guests[v].get("last_success") is not None])
    metric("vzdump_hook_stack_down", "1 while a stack the hook stopped has not been started again.",
           [({"vmid": v, "stack": s}, float(s in guests[v]["down"])) for v in vmids for s in guests[v]["stacks"]])
    metric("vzdump_hook_stacks_down", "Stacks of the guest still down after its last job.",
           [({"vmid": v}, float(len(guests[v]["down"]))) for v in vmids])
    metric("vzdump_hook_metrics_timestamp_seconds", "When this file was written (Unix time).", [({}, now)])
    return "\n".join(out) + "\n"


def _label(v: str) -> str:
    """A label value: escaped as any guest text first (no control or bidi character reaches a
    dashboard or an alert), then as the exposition format wants it (backslash, quote, newline)."""
    return escape(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _write(path: str, text: str, mode: int = 0o600) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    safefile.write_atomic(path, text, mode)


# -- notifications -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    title: str
    text: str
    problem: bool  # stacks down, or backups not quiesced: urgent
    data: dict[str, Any]  # the same, for the generic JSON format


def job_message(node: str, job: str, records: list[GuestRecord], config_problem: str | None) -> Message:
    """The job-end message: one line per guest, what is wrong first. Names that may come from a guest
    (its stacks) and the config problem are escaped, in the text and in the JSON alike: a line break
    cannot forge a line of the message, a control character cannot reach the reader's screen."""
    config_problem = escape(config_problem) if config_problem else config_problem
    lines = []
    down = [r for r in records if r.status.pending]
    if down:
        lines.append(f"STACKS STILL DOWN in guest(s) {', '.join(str(r.vmid) for r in down)}: "
                     f"run `vzdump-hook recover` on {node}")
    if config_problem:
        lines.append(f"config unusable, guests backed up WITHOUT quiescing: {config_problem}")
    for r in records:
        down_s = f", down {r.downtime:.1f} s" if r.downtime is not None else ""
        lines.append(f"{r.vmid}: {result_of(r)}{down_s}"
                     + (f" ({', '.join(escape(s.name) for s in r.stacks)})" if r.stacks else ""))
    problem = bool(down or config_problem
                   or any(result_of(r) != "ok" for r in records if r.status is not Status.SKIPPED))
    title = f"vzdump-hook on {node}: " + ("stacks still DOWN" if down else "problems" if problem else "ok")
    data = {"node": node, "job": job, "at": round(time.time(), 3),
            "result": "down" if down else "problem" if problem else "ok", "config_problem": config_problem,
            "guests": [{"vmid": r.vmid, "result": result_of(r), "downtime": r.downtime,
                        "stacks": [escape(s.name) for s in r.stacks]} for r in records]}
    return Message(title, "\n".join(lines) or "no guests", problem, data)


def _request(cfg: NotifyConfig, m: Message) -> dict[str, Any]:
    """The HTTP request for `m` in the receiver's format, without any secret: the url (for healthchecks
    and ntfy the url is the secret) is kept as its hash (`to`) and the path added to it (`suffix`); the
    token is added when it is sent. This is what a queued message keeps under state_dir."""
    req: dict[str, Any] = {"to": cfg.key(), "suffix": "", "headers": {"Content-Type": "application/json"}}
    if cfg.format == "ntfy":
        headers = {"Title": m.title, "Priority": "urgent" if m.problem else "default",
                   "Tags": "warning" if m.problem else "white_check_mark"}
        return {**req, "headers": headers, "body": m.text}
    if cfg.format == "gotify":
        return {**req, "body": json.dumps({"title": m.title, "message": m.text, "priority": 8 if m.problem else 4})}
    if cfg.format == "healthchecks":  # a ping URL: /fail marks the check down
        return {**req, "suffix": "/fail" if m.problem else "", "headers": {}, "body": f"{m.title}\n{m.text}"}
    return {**req, "body": json.dumps({"title": m.title, "text": m.text, **m.data})}


def _url(cfg: NotifyConfig, req: dict[str, Any]) -> str:
    base = cfg.url.rstrip("/") if req.get("suffix") else cfg.url
    return base + str(req.get("suffix", ""))


def shown_url(url: str) -> str:
    """The receiver as the task log may show it: scheme and host, never the path or query (the secret)."""
    import urllib.parse

    u = urllib.parse.urlsplit(url)
    return f"{u.scheme}://{u.hostname or '?'}{f':{u.port}' if u.port else ''}/..."


def _send(cfg: NotifyConfig, req: dict[str, Any], timeout: float) -> None:
    import requests

    headers = dict(req["headers"])
    if cfg.token_file:
        with open(cfg.token_file) as f:
            token = f.read().strip()
        headers["X-Gotify-Key" if cfg.format == "gotify" else "Authorization"] = (
            token if cfg.format == "gotify" else f"Bearer {token}")
    from .. import httpio

    with requests.Session() as s:
        s.trust_env = False
        httpio.mount(s)
        r = httpio.request(s, "POST", _url(cfg, req), timeout=timeout, cap=64 * 1024,
                           source=f"notify {shown_url(cfg.url)}", connect_timeout=min(timeout, 5),
                           data=req["body"].encode(), headers=headers)
    if r.status >= 400:
        raise OSError(f"HTTP {r.status} {r.reason}")


def notify(settings: HookSettings, m: Message | None) -> None:
    """Send `m` (if any), then what earlier jobs could not deliver, oldest first; what fails is queued.
    Takes at most about two `timeout`s; never raises."""
    cfg = settings.notify
    if cfg is None:
        return
    queue = os.path.join(settings.state_dir, QUEUE_DIR)
    deadline = time.monotonic() + 2 * cfg.timeout
    if m is not None:
        req = _request(cfg, m)
        if not cfg.url:  # settings remembered from the last valid config: they keep no url
            log.info("notify: the config is unusable: the message is queued for the next job with a valid config")
            _enqueue(queue, req)
            return
        if not _try(cfg, req, deadline):
            _enqueue(queue, req)
            return  # the receiver is down: leave the queue for later
    if not cfg.url:
        return
    for name in _queued(queue):
        path = os.path.join(queue, name)
        try:
            with open(path) as f:
                req = json.load(f)
            if "url" in req:  # queued by an older version, with the url itself: kept without it from now on
                old, fail = str(req["url"]), cfg.url.rstrip("/") + "/fail"
                to = cfg.key() if old in (cfg.url, fail) else NotifyConfig(old).key()
                req = {**{k: v for k, v in req.items() if k != "url"}, "to": to,
                       "suffix": "/fail" if old == fail != cfg.url else ""}
                _write(path, json.dumps(req))
        except (OSError, ValueError, TypeError, AttributeError, safefile.UnsafePath):
            with contextlib.suppress(OSError):
                os.unlink(path)
            continue
        if req.get("to") != cfg.key():
            log.info("notify: dropped %s: queued for a notify url the config no longer names", name)
            with contextlib.suppress(OSError):
                os.unlink(path)
            continue
        if not _try(cfg, req, deadline):
            return
        with contextlib.suppress(OSError):
            os.unlink(path)


def _try(cfg: NotifyConfig, req: dict[str, Any], deadline: float) -> bool:
    left = deadline - time.monotonic()
    if left < 0.5:
        return False
    try:
        _send(cfg, req, min(cfg.timeout, left))
        return True
    except Exception as e:  # a notifier must never break a backup: requests' errors, a bad token file
        log.warning("notify: %s not delivered (%s): queued, retried at the next job", shown_url(cfg.url),
                    _hide(_short(e), cfg))
        return False


def _hide(text: str, cfg: NotifyConfig) -> str:
    """`text` (an exception's, which may quote the url) without the url's path and query."""
    import urllib.parse

    u = urllib.parse.urlsplit(cfg.url)
    for secret in (cfg.url.rstrip("/"), u.path.rstrip("/"), u.query):
        if len(secret) > 1:
            text = text.replace(secret, "/...")
    return text


def _short(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]


def _queued(queue: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(queue) if n.endswith(".json"))
    except OSError:
        return []


def _enqueue(queue: str, req: dict[str, Any]) -> None:
    try:
        safefile.private_dir(os.path.dirname(queue))
        os.makedirs(queue, mode=0o700, exist_ok=True)
        _write(os.path.join(queue, f"{time.time():017.6f}-{uuid.uuid4().hex[:8]}.json"), json.dumps(req))
        names = _queued(queue)
        for old in names[: max(0, len(names) - MAX_QUEUED)]:
            os.unlink(os.path.join(queue, old))
            log.warning("notify: queue full, dropped %s", old)
    except (OSError, safefile.UnsafePath) as e:
        log.warning("notify: could not queue the message: %s", getattr(e, "strerror", None) or e)
