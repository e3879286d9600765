"""Metrics textfile and webhook at job-end (report.py), with the installed hook run by the vzdump
stand-in against the test guest, and a real HTTP server on loopback as the webhook's receiver:
working, failing (500) and hanging (reads the request, never answers)."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.infra import compose
from tests.infra.vzdump import Context, GuestSpec, GuestType, JobResult, Mode, Moment, run_job
from tests.integration.hookenv import HookSetup, installed_hook, running

pytestmark = pytest.mark.integration
VMID = 101


class Receiver:
    """A webhook receiver on 127.0.0.1; `mode` is "ok", "fail" or "hang"; `on_request` runs while a
    request is being answered."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.requests: list[dict[str, Any]] = []
        self.on_request: Any = None
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                       "mode": outer.mode, "extra": outer.on_request() if outer.on_request else None})
                if outer.mode == "hang":
                    outer.release.wait(60)
                    return
                self.send_response(500 if outer.mode == "fail" else 200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def stack(tmp_path: Path, test_guest: Any, compose_project: Any) -> tuple[HookSetup, compose.ComposeProject]:
    db = compose_project("db", {"app": "sleeper"})
    compose.up(db)
    return HookSetup(tmp_path), db


def configure(setup: HookSetup, test_guest: Any, db: compose.ComposeProject, **hook: Any) -> None:
    setup.hook_table = hook
    setup.write({VMID: (test_guest, {"stacks": [db.name], "stop_timeout": 5, "resume_wait": 3})})


def job(setup: HookSetup, **kwargs: Any) -> JobResult:
    return run_job(installed_hook(), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], extra_env=setup.env, timeout=180,
                   **kwargs)


def metrics(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(path.read_text()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_textfile_after_a_good_and_a_bad_job(stack: Any, test_guest: Any) -> None:
    setup, db = stack
    prom = setup.tmp / "textfile" / "vzdump_hook.prom"
    configure(setup, test_guest, db, metrics_file=str(prom))
    before = time.time()
    result = job(setup)
    assert result.ok, result.task_log()
    m = metrics(prom)
    assert m[("vzdump_hook_last_result", (("result", "ok"), ("vmid", "101")))] == 1
    assert m[("vzdump_hook_last_result", (("result", "still-down"), ("vmid", "101")))] == 0
    assert 0 < m[("vzdump_hook_last_downtime_seconds", (("stack", db.name), ("vmid", "101")))] < 30
    assert m[("vzdump_hook_stack_down", (("stack", db.name), ("vmid", "101")))] == 0
    success = m[("vzdump_hook_last_success_timestamp_seconds", (("vmid", "101"),))]
    assert before <= success <= time.time()

    def cut_off(phase: str, ctx: Context) -> None:  # the guest drops out right after the stop
        if ctx.moment is Moment.AFTER_PHASE and phase == "pre-stop":
            test_guest.stop_sshd()

    result = job(setup, on_phase=cut_off)
    assert not result.ok  # job-end: stacks still down
    m = metrics(prom)
    assert m[("vzdump_hook_last_result", (("result", "still-down"), ("vmid", "101")))] == 1
    assert m[("vzdump_hook_stack_down", (("stack", db.name), ("vmid", "101")))] == 1
    assert m[("vzdump_hook_stacks_down", (("vmid", "101"),))] == 1
    assert m[("vzdump_hook_last_success_timestamp_seconds", (("vmid", "101"),))] == success  # the good job's, kept
    test_guest.start_sshd()


def test_webhook_after_the_stacks_run_again(stack: Any, test_guest: Any, receiver: Receiver) -> None:
    setup, db = stack
    configure(setup, test_guest, db, notify={"url": receiver.url, "timeout": 5})
    receiver.on_request = lambda: running([db])[db.name]
    result = job(setup)
    assert result.ok, result.task_log()
    (req,) = receiver.requests
    assert req["extra"] is True  # the stack ran when the message was sent
    body = json.loads(req["body"])
    assert body["result"] == "ok" and body["guests"][0]["vmid"] == VMID and body["guests"][0]["result"] == "ok"
    assert body["guests"][0]["stacks"] == [db.name] and body["guests"][0]["downtime"] > 0


@pytest.mark.parametrize("fmt", ["ntfy", "gotify", "healthchecks"])
def test_webhook_formats(fmt: str, stack: Any, test_guest: Any, receiver: Receiver) -> None:
    setup, db = stack
    token = setup.tmp / "token"
    token.write_text("s3cret\n")
    token.chmod(0o600)
    configure(setup, test_guest, db, notify={"url": receiver.url, "format": fmt, "token_file": str(token)})
    assert job(setup).ok
    (req,) = receiver.requests
    if fmt == "ntfy":
        assert req["headers"]["Title"].endswith(": ok") and req["headers"]["Authorization"] == "Bearer s3cret"
        assert f"{VMID}: ok" in req["body"]
    elif fmt == "gotify":
        assert req["headers"]["X-Gotify-Key"] == "s3cret" and json.loads(req["body"])["priority"] == 4
    else:
        assert req["path"] == "/hook"  # success ping (a problem would go to /hook/fail)


def test_undelivered_messages_are_queued_and_retried_at_the_next_job(stack: Any, test_guest: Any,
                                                                     receiver: Receiver) -> None:
    setup, db = stack
    configure(setup, test_guest, db, notify={"url": receiver.url, "timeout": 1})
    receiver.mode = "fail"
    first = job(setup)
    assert first.ok, first.task_log()  # never changes an exit status
    assert "notify: " in first.task_log() and "queued, retried at the next job" in first.task_log()
    receiver.mode = "hang"
    t0 = time.monotonic()
    second = job(setup)
    took = time.monotonic() - t0
    assert second.ok, second.task_log()
    end = next(r for r in second.records if r.phase == "job-end")
    assert end.end - end.start < 15, second.task_log()  # bounded: about two timeouts, not forever
    assert took < 60
    receiver.mode = "ok"
    third = job(setup)
    assert third.ok
    failed = [r["body"] for r in receiver.requests if r["mode"] == "fail"]
    hung = [r["body"] for r in receiver.requests if r["mode"] == "hang"]
    delivered = [r["body"] for r in receiver.requests if r["mode"] == "ok"]
    assert len(failed) == 1 and hung == [failed[0], hung[-1]]  # job 2: the queued one, then its own
    # job 3: job-start delivers the two queued (oldest first), job-end its own
    assert delivered[:2] == [failed[0], hung[-1]] and len(delivered) == 3
    assert json.loads(delivered[2])["at"] > json.loads(delivered[1])["at"] > json.loads(delivered[0])["at"]
    assert not list((setup.tmp / "state" / "notify-queue").glob("*.json"))
