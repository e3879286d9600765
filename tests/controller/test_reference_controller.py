"""The reference guest controller (examples/controller/vzdump-controller) as a real separate process,
against real compose projects: over HTTPS on loopback (a self-signed certificate made here with
openssl; the client side is done with requests, as the hook will) and over its command carrier.

The stacks: ``db`` (a sleeper and a ``stubborn`` service that ignores SIGTERM, so that its stop takes
the controller's stop_timeout and ends in SIGKILL), ``web`` (a sleeper) and ``off`` (configured but
stopped before the job: nothing may start it). Contract: docs/controller-api.md.
"""

from __future__ import annotations

import json
import selectors
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from requests.adapters import HTTPAdapter

from tests.infra import compose
from tests.infra.compose import ComposeProject

pytestmark = pytest.mark.integration

CONTROLLER = Path(__file__).resolve().parents[2] / "examples" / "controller" / "vzdump-controller"
TOKEN = "t0ken-" + "a1b2c3d4e5f6a7b8c9d0"
STOP_TIMEOUT = 2  # the stubborn service is SIGKILLed after this
VMID = 101
REQUEST_TIMEOUT = (5, 90)  # connect, read: every request has a bound


# ------------------------------------------------------------------------------------------ helpers


def openssl_cert(directory: Path, name: str) -> tuple[Path, Path, str]:
    """A self-signed EC certificate for 127.0.0.1 (it is its own CA): (cert, key, SHA-256 fingerprint)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
    out = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-fingerprint", "-sha256"],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    return cert, key, out.strip().split("=", 1)[1]  # "sha256 Fingerprint=AB:CD:..."


class PinnedAdapter(HTTPAdapter):
    """requests adapter that accepts exactly one server certificate, by its SHA-256 fingerprint
    (urllib3's assert_fingerprint; chain and name are not checked: the pin replaces them)."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint.replace(":", "").lower()
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["assert_fingerprint"] = self.fingerprint
        super().init_poolmanager(*args, **kwargs)


def session(verify: str | bool = False, pin: str | None = None, token: str | None = TOKEN) -> requests.Session:
    """A client as the hook builds it: no proxy or CA from the environment, the token as Bearer."""
    s = requests.Session()
    s.trust_env = False
    s.verify = verify
    if pin is not None:
        s.mount("https://", PinnedAdapter(pin))
    if token is not None:
        s.headers["Authorization"] = f"Bearer {token}"
    return s


def started_at(project: ComposeProject) -> dict[str, str]:
    """Service -> the container's State.StartedAt (changes at every start)."""
    ids = subprocess.run(["docker", "ps", "-aq", "--no-trunc", "--filter", f"label=com.docker.compose.project={project.name}"],
                         check=True, capture_output=True, text=True, timeout=60).stdout.split()
    data = json.loads(subprocess.run(["docker", "inspect", *ids], check=True, capture_output=True, text=True, timeout=60).stdout)
    return {c["Config"]["Labels"]["com.docker.compose.service"]: c["State"]["StartedAt"] for c in data}


@dataclass
class Env:
    """The projects, the controller's files and its HTTPS peer."""

    tmp: Path
    db: ComposeProject
    web: ComposeProject
    off: ComposeProject
    config: Path
    state_dir: Path
    token_file: Path
    cert: Path
    key: Path
    fingerprint: str
    procs: list[subprocess.Popen[str]]
    url: str = ""

    @property
    def marker(self) -> Path:
        """The controller's marker."""
        return self.state_dir / "marker.json"

    def all_running(self) -> bool:
        """db and web run completely; off is still stopped."""
        return (compose.running_services(self.db) == {"app", "slow"} and compose.running_services(self.web) == {"app"}
                and compose.running_services(self.off) == set())

    def all_stopped(self) -> bool:
        """db and web are stopped (the stubborn one killed after stop_timeout); off too."""
        return (compose.running_services(self.db) == set() and compose.running_services(self.web) == set()
                and compose.running_services(self.off) == set())

    def serve(self, token_file: Path | None = None) -> subprocess.Popen[str]:
        """Start `serve` on a free loopback port; return once it listens (its first stdout line)."""
        stderr = open(self.tmp / "controller.log", "a")  # noqa: SIM115 - the process owns it
        proc = subprocess.Popen([sys.executable, str(CONTROLLER), "--config", str(self.config), "serve", "--listen", "127.0.0.1:0",
                                 "--token-file", str(token_file or self.token_file), "--tls-cert", str(self.cert), "--tls-key", str(self.key)],
                                stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, text=True)
        stderr.close()
        self.procs.append(proc)
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            ready = sel.select(timeout=60)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("listening on https://127.0.0.1:"):
            proc.kill()
            proc.wait(10)
            return proc
        self.url = line.split()[-1]
        return proc

    def cli(self, *args: str) -> tuple[int, dict[str, Any]]:
        """Run the command carrier; return its exit code and the one JSON object it prints."""
        proc = subprocess.run([sys.executable, str(CONTROLLER), "--config", str(self.config), *args],
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        lines = proc.stdout.splitlines()
        assert len(lines) == 1, (proc.stdout, proc.stderr)
        return proc.returncode, json.loads(lines[0])

    def post(self, phase: str, job: str, client: requests.Session | None = None, **fields: Any) -> requests.Response:
        """POST /v1/PHASE with the message fields of the contract."""
        body = {"job": job, "vmid": VMID, **fields}
        if phase == "quiesce":
            body = {"mode": "snapshot", "deadline": time.time() + 600, "answer_within": 60, **body}
        return (client or session(verify=str(self.cert))).post(f"{self.url}/v1/{phase}", json=body, timeout=REQUEST_TIMEOUT)

    def status(self) -> dict[str, Any]:
        """GET /v1/status."""
        resp = session(verify=str(self.cert)).get(f"{self.url}/v1/status", timeout=REQUEST_TIMEOUT)
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body


@pytest.fixture
def env(tmp_path: Path, compose_project: Callable[..., ComposeProject]) -> Iterator[Env]:
    """Three running-or-stopped projects, a config naming them (off first), a token, a certificate."""
    db = compose_project("db", {"app": "sleeper", "slow": "stubborn"})
    web = compose_project("web", {"app": "sleeper"})
    off = compose_project("off", {"app": "sleeper"})
    for p in (db, web, off):
        compose.up(p)
    compose.stop(off)
    state_dir = tmp_path / "state"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "state_dir": str(state_dir), "stop_timeout": STOP_TIMEOUT, "deadline_grace": 0,
        "stacks": [{"name": p.name.rsplit("-", 1)[1], "project": p.name, "workdir": str(p.workdir)} for p in (off, db, web)],
    }))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    cert, key, fingerprint = openssl_cert(tmp_path, "controller")
    e = Env(tmp_path, db, web, off, config, state_dir, token_file, cert, key, fingerprint, [])
    assert e.all_running()
    yield e
    for proc in e.procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def served(env: Env) -> Env:
    """env with `serve` running over HTTPS."""
    proc = env.serve()
    assert proc.poll() is None, (env.tmp / "controller.log").read_text()
    return env


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
    assert (marker["job"], marker["vmid"], [s["name"] for s in marker["stacks"]]) == ("pve1/4242-1000", VMID, ["db", "web"])
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
    assert (first["duplicate"], second["duplicate"], second["held"], second["job_state"]) == (False, True, ["db", "web"], "quiesced")
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
    assert (busy.status_code, busy.json()["error"]["code"], busy.json()["open_job"]) == (409, "busy", {"job": "A", "vmid": VMID})
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
    rc, body = e.cli("signal", "quiesce", "--job", "cli-1", "--vmid", str(VMID), "--mode", "suspend", "--deadline", deadline, "--answer-within", "60")
    assert (rc, body["ok"], body["job_state"], body["held"]) == (0, True, "quiesced", ["db", "web"])
    assert e.all_stopped()
    rc, body = e.cli("signal", "quiesce", "--job", "cli-2", "--vmid", str(VMID), "--mode", "suspend", "--deadline", deadline, "--answer-within", "60")
    assert (rc, body["ok"], body["error"]["code"]) == (3, False, "busy")
    rc, body = e.cli("signal", "snapshotted", "--vmid", str(VMID))
    assert (rc, body["ok"], body["error"]["code"]) == (2, False, "bad_request")
    rc, body = e.cli("status")
    assert (rc, body["open_job"]["job"], body["open_job"]["mode"], body["held"]) == (0, "cli-1", "suspend", ["db", "web"])
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
                                                     "deadline": time.time() + 600, "answer_within": 60}, timeout=REQUEST_TIMEOUT)
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
