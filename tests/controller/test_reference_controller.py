"""The reference guest controller (examples/controller/vzdump-controller) as a real separate process,
against real compose projects: over HTTPS on loopback (a self-signed certificate made here with
openssl; the client side is done with requests, as the hook will) and over its command carrier.

The stacks: ``db`` (a sleeper and a ``stubborn`` service that ignores SIGTERM, so that its stop takes
the controller's stop_timeout and ends in SIGKILL), ``web`` (a sleeper) and ``off`` (configured but
stopped before the job: nothing may start it). Contract: docs/controller-api.md.
"""

from __future__ import annotations

import json
import signal
import stat
import time

import pytest
import requests

from tests.controller.conftest import (  # noqa: F401
    CONTROLLER,
    REQUEST_TIMEOUT,
    STOP_TIMEOUT,
    TOKEN,
    VMID,
    Env,
    PinnedAdapter,
    openssl_cert,
    session,
    started_at,
)
from tests.infra import compose

pytestmark = pytest.mark.integration

# ------------------------------------------------------------------------------------------ tests


def test_quiesce_answers_after_the_stop_snapshotted_starts_done_closes(served: Env) -> None:
    """quiesce: the answer comes once every running stack is stopped (the stubborn service has been
    SIGKILLed by then); the marker lists exactly them. snapshotted starts them; off stays stopped."""
    e = served
    resp = e.post("quiesce", "pve1/4242-1000")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["ok"], body["job_state"], body["duplicate"], body["held"]) == (True, "quiesced", False, ["db", "web"])
    assert e.all_stopped()
    assert compose.container_exit_codes(e.db)["slow"] == 137  # killed after stop_timeout: the answer waited for it
    marker = json.loads(e.marker.read_text())
    assert (marker["job"], marker["vmid"], [s["name"] for s in marker["stacks"]]) == ("pve1/4242-1000", VMID,
                                                                                      ["db", "web"])
    assert stat.S_IMODE(e.marker.stat().st_mode) == 0o600
    st = e.status()
    assert st["open_job"]["job"] == "pve1/4242-1000" and st["open_job"]["state"] == "quiesced"
    assert (st["held"], st["marker"]) == (["db", "web"], True)

    resp = e.post("snapshotted", "pve1/4242-1000")
    assert resp.status_code == 200, resp.text
    assert (resp.json()["job_state"], resp.json()["held"]) == ("resumed", [])
    assert e.all_running()
    assert not e.marker.exists()
    assert e.status()["open_job"]["state"] == "resumed"  # tracked until done/failed

    resp = e.post("done", "pve1/4242-1000")
    assert (resp.status_code, resp.json()["job_state"]) == (200, "done")
    st = e.status()
    assert st["open_job"] is None
    assert st["closed"][-1] == {**st["closed"][-1], "job": "pve1/4242-1000", "state": "done", "known": True}


def test_every_message_twice_is_harmless(served: Env) -> None:
    """quiesce, snapshotted, failed each sent twice: the second is a duplicate that stops or starts
    nothing (the containers' start times do not change); a quiesce of the closed job is refused."""
    e = served
    job = "pve1/77-1"
    first = e.post("quiesce", job).json()
    second = e.post("quiesce", job).json()
    assert (first["duplicate"], second["duplicate"], second["held"], second["job_state"]) == (False, True,
                                                                                              ["db", "web"], "quiesced")
    assert e.all_stopped()
    assert e.post("snapshotted", job).json()["duplicate"] is False
    starts = {**started_at(e.db), **{f"web-{k}": v for k, v in started_at(e.web).items()}}
    again = e.post("snapshotted", job)
    assert (again.status_code, again.json()["duplicate"], again.json()["job_state"]) == (200, True, "resumed")
    assert {**started_at(e.db), **{f"web-{k}": v for k, v in started_at(e.web).items()}} == starts
    assert e.post("failed", job).json()["job_state"] == "failed"
    again = e.post("failed", job)
    assert (again.status_code, again.json()["duplicate"], again.json()["job_state"]) == (200, True, "failed")
    late = e.post("quiesce", job)
    assert (late.status_code, late.json()["error"]["code"], late.json()["job_state"]) == (409, "job_closed", "failed")
    assert e.all_running()
    assert {**started_at(e.db), **{f"web-{k}": v for k, v in started_at(e.web).items()}} == starts


def test_second_job_stray_snapshotted_and_abort(served: Env) -> None:
    """While job A holds the stacks: a quiesce of job B is refused (busy), a snapshotted of a job never
    quiesced starts nothing; abort of A starts them; then B may quiesce; abort after snapshotted only
    closes; done after abort is a duplicate that keeps `aborted`."""
    e = served
    assert e.post("quiesce", "A").status_code == 200
    busy = e.post("quiesce", "B")
    assert (busy.status_code, busy.json()["error"]["code"], busy.json()["open_job"]) == (409, "busy",
                                                                                         {"job": "A", "vmid": VMID})
    stray = e.post("snapshotted", "C")
    assert (stray.status_code, stray.json()["known"], stray.json()["job_state"]) == (200, False, "unknown")
    assert stray.json()["held"] == ["db", "web"]  # still held, for job A
    assert e.all_stopped()  # C's snapshotted did not touch A's stacks
    assert e.status()["open_job"]["job"] == "A"

    aborted = e.post("abort", "A")
    assert (aborted.status_code, aborted.json()["job_state"], aborted.json()["open_job"]) == (200, "aborted", None)
    assert e.all_running()
    assert not e.marker.exists()

    assert e.post("quiesce", "B").status_code == 200
    assert e.all_stopped()
    assert e.post("snapshotted", "B").status_code == 200
    starts = started_at(e.web)
    late = e.post("abort", "B")
    assert (late.status_code, late.json()["job_state"], late.json()["duplicate"]) == (200, "aborted", False)
    dup = e.post("done", "B")
    assert (dup.status_code, dup.json()["job_state"], dup.json()["duplicate"]) == (200, "aborted", True)
    assert e.all_running()
    assert started_at(e.web) == starts


def test_command_carrier(env: Env) -> None:
    """`signal`: one JSON object on stdout, exit codes 0 / 2 (bad request) / 3 (busy); the same state
    as the HTTP carrier uses (here with no server running at all)."""
    e = env
    deadline = str(int(time.time()) + 600)
    rc, body = e.cli("signal", "quiesce", "--job", "cli-1", "--vmid", str(VMID), "--mode", "suspend",
                     "--deadline", deadline, "--answer-within", "60")
    assert (rc, body["ok"], body["job_state"], body["held"]) == (0, True, "quiesced", ["db", "web"])
    assert e.all_stopped()
    rc, body = e.cli("signal", "quiesce", "--job", "cli-2", "--vmid", str(VMID), "--mode", "suspend",
                     "--deadline", deadline, "--answer-within", "60")
    assert (rc, body["ok"], body["error"]["code"]) == (3, False, "busy")
    rc, body = e.cli("signal", "snapshotted", "--vmid", str(VMID))
    assert (rc, body["ok"], body["error"]["code"]) == (2, False, "bad_request")
    rc, body = e.cli("status")
    assert (rc, body["open_job"]["job"], body["open_job"]["mode"], body["held"]) == (0, "cli-1", "suspend",
                                                                                     ["db", "web"])
    rc, body = e.cli("signal", "abort", "--job", "cli-1", "--vmid", str(VMID))
    assert (rc, body["job_state"]) == (0, "aborted")
    assert e.all_running()
    rc, body = e.cli("signal", "status")
    assert (rc, body["open_job"], body["held"], body["marker"]) == (0, None, [], False)


def test_token_is_required_and_checked(served: Env) -> None:
    """No token: 401 with WWW-Authenticate; a wrong one: 403; neither touches a stack. A token file
    that others may read is refused at startup."""
    e = served
    none = e.post("quiesce", "x", client=session(verify=str(e.cert), token=None))
    assert (none.status_code, none.json()["error"]["code"]) == (401, "unauthorized")
    assert none.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = e.post("quiesce", "x", client=session(verify=str(e.cert), token=TOKEN[:-1] + "X"))
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (403, "forbidden")
    basic = session(verify=str(e.cert), token=None)
    basic.auth = ("root", TOKEN)
    assert e.post("quiesce", "x", client=basic).status_code == 401
    assert e.all_running()
    assert not e.marker.exists()

    loose = e.tmp / "loose-token"
    loose.write_text(TOKEN)
    loose.chmod(0o644)
    proc = e.serve(token_file=loose)
    assert proc.wait(60) == 5
    assert "readable by others" in (e.tmp / "controller.log").read_text()


def test_tls_verified_by_ca_or_pinned_fingerprint(served: Env) -> None:
    """The certificate as CA and the pinned fingerprint both connect; the system CAs, another CA and
    another fingerprint are refused before any request is sent."""
    e = served
    other_cert, _, other_fp = openssl_cert(e.tmp, "other")
    url = f"{e.url}/v1/status"
    assert session(verify=str(e.cert)).get(url, timeout=REQUEST_TIMEOUT).json()["ok"] is True
    pinned = session(pin=e.fingerprint).get(url, timeout=REQUEST_TIMEOUT)
    assert (pinned.status_code, pinned.json()["ok"]) == (200, True)
    assert e.fingerprint.replace(":", "").lower() != other_fp.replace(":", "").lower()
    for client in (session(verify=True), session(verify=str(other_cert)), session(pin=other_fp)):
        with pytest.raises(requests.exceptions.SSLError):
            client.post(f"{e.url}/v1/quiesce", json={"job": "tls", "vmid": VMID, "mode": "snapshot",
                                                     "deadline": time.time() + 600, "answer_within": 60},
                        timeout=REQUEST_TIMEOUT)
    assert e.all_running()
    assert e.status()["closed"] == []


def test_marker_survives_sigkill_and_recover_starts(served: Env) -> None:
    """SIGKILL of the controller between quiesce and snapshotted: the marker stays and lists the
    stopped stacks; a restarted server in the same boot before the deadline keeps holding them (the
    hook will re-send); `recover` starts them and closes the job; a re-sent snapshotted is a duplicate."""
    e = served
    assert e.post("quiesce", "killed-1").status_code == 200
    proc = e.procs[-1]
    proc.kill()
    assert proc.wait(30) == -signal.SIGKILL
    marker = json.loads(e.marker.read_text())
    assert [s["name"] for s in marker["stacks"]] == ["db", "web"]
    assert e.all_stopped()

    restarted = e.serve()
    assert restarted.poll() is None
    assert e.all_stopped()  # adopted, not recovered: the backup's point in time may not have passed
    assert (e.status()["open_job"]["job"], e.status()["held"]) == ("killed-1", ["db", "web"])
    restarted.kill()
    restarted.wait(30)

    rc, body = e.cli("recover")
    assert (rc, body["ok"], body["recovered"], body["held"]) == (0, True, True, [])
    assert e.all_running()
    assert not e.marker.exists()
    rc, body = e.cli("signal", "snapshotted", "--job", "killed-1", "--vmid", str(VMID))
    assert (rc, body["job_state"], body["duplicate"]) == (0, "recovered", True)
    rc, body = e.cli("recover")
    assert (rc, body["recovered"]) == (0, False)


def test_deadline_passed_starts_the_stacks(served: Env) -> None:
    """A job whose deadline passes without snapshotted/abort: the server starts what it holds by
    itself and closes the job as `expired`."""
    e = served
    before = started_at(e.db)
    resp = e.post("quiesce", "lost-1", deadline=time.time() + STOP_TIMEOUT + 12)
    assert (resp.status_code, resp.json()["held"]) == (200, ["db", "web"]), resp.text
    bound = time.monotonic() + 60
    while not e.all_running():
        assert time.monotonic() < bound, "the stacks were not started after the deadline"
        time.sleep(0.5)  # polling a condition with a bound, not a sleep standing in for one
    closed = e.status()["closed"]
    assert (closed[-1]["job"], closed[-1]["state"]) == ("lost-1", "expired")
    assert not e.marker.exists()
    after = started_at(e.db)
    assert all(after[svc] != before[svc] for svc in ("app", "slow")), (before, after)  # stopped, then started again
