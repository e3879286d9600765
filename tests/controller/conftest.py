"""The reference guest controller (examples/controller/vzdump-controller) and its peers, shared by the
controller's own tests and the hook's tests against it: three compose projects, its config, a token,
a self-signed certificate made with openssl, and `serve` as a real process over HTTPS on loopback."""

from __future__ import annotations

import json
import selectors
import signal
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
    ids = subprocess.run(["docker", "ps", "-aq", "--no-trunc", "--filter",
                          f"label=com.docker.compose.project={project.name}"],
                         check=True, capture_output=True, text=True, timeout=60).stdout.split()
    data = json.loads(subprocess.run(["docker", "inspect", *ids], check=True, capture_output=True, text=True,
                                     timeout=60).stdout)
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

    def serve(self, token_file: Path | None = None, listen: str = "127.0.0.1:0") -> subprocess.Popen[str]:
        """Start `serve` (on a free loopback port by default); return once it listens (its first stdout line)."""
        stderr = open(self.tmp / "controller.log", "a")  # noqa: SIM115 - the process owns it
        proc = subprocess.Popen([sys.executable, str(CONTROLLER), "--config", str(self.config), "serve",
                                 "--listen", listen, "--token-file", str(token_file or self.token_file),
                                 "--tls-cert", str(self.cert), "--tls-key", str(self.key)],
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
        return (client or session(verify=str(self.cert))).post(f"{self.url}/v1/{phase}", json=body,
                                                               timeout=REQUEST_TIMEOUT)

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
        "stacks": [{"name": p.name.rsplit("-", 1)[1], "project": p.name, "workdir": str(p.workdir)}
                   for p in (off, db, web)],
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


