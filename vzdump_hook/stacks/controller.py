"""The guest's own controller as a stack (kind "controller"): the hook does not stop the apps it owns;
it tells the controller the backup's phases and the controller stops and starts them itself.

The contract is docs/controller-api.md. Its phases map onto a driver's verbs:

    stop   -> quiesce      (answered only once the controller's apps are stopped, within answer_within)
    start  -> snapshotted  (the point in time has passed: resume), or abort when the quiesce was not
                           confirmed: then nothing else follows for the job
    close  -> done | failed | abort   (the job is over; backup-end, backup-abort, job-end, the resident)
    is_up  -> status       (does the controller still hold this job's apps stopped)

Which message goes when is one table, stacks/conversation.py.

Two carriers reach it: a command in the guest over the guest's transport (`command`), or its HTTPS
API (`url`) with a bearer token read from a root-only file, TLS verified against a CA file or a
pinned SHA-256 certificate fingerprint, and a timeout on every request. Every message may be sent
twice: the contract makes them idempotent, and the hook re-sends `snapshotted` until it is confirmed.

The guest's marker never lists a controller (the controller keeps its own marker in the guest); the
node's records and ledger keep the ask, and job-start's sweep and `vzdump-hook recover` ask the
controller's `status` and end a job of it that is over (`abort`).
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import TYPE_CHECKING, Any

from .. import httpio
from ..errors import ConfigError, ControllerError, HookError
from ..guest.marker import StackRecord
from ..node.job import JobId
from . import Kind, of_kind
from .base import KindDriver, StopOutcome
from .checks import token_file_problem
from .controller_table import ControllerSpec
from .conversation import CONFIG_ERROR, ENDS, Moment, message

if TYPE_CHECKING:
    from ..config import GuestConfig
    from ..transports.base import Transport
    from .table import StackSpec

log = logging.getLogger(__name__)

API = 1
CONNECT_TIMEOUT = 5.0
ANSWER_MARGIN = 10.0  # seconds the hook waits beyond answer_within (transport, process start)
DEFAULT_ANSWER_EXTRA = 30.0  # answer_within by default: the stack's stop timeout plus this
MAX_ANSWER = 64 * 1024
# exit codes of the command carrier, by error code (docs/controller-api.md, section 6)
_EXIT = {"bad_request": 2, "not_found": 2, "busy": 3, "job_closed": 3, "out_of_order": 3,
         "stop_failed": 4, "start_failed": 4, "timeout": 4, "internal": 5}
_JOB = re.compile(r"(?P<node>[A-Za-z0-9][A-Za-z0-9.-]*):(?P<boot>[0-9a-f-]{1,64}):"
                  r"(?P<pid>[0-9]{1,10})-(?P<start>[0-9]{1,20})")


def job_string(job: JobId) -> str:
    """The job's identity in the contract's alphabet: NODE:BOOT:PID-START (unique per job, never reused)."""
    return f"{job.node}:{job.boot}:{job.pid}-{job.start}"


def parse_job(text: str) -> JobId | None:
    """The JobId of a job_string(), or None for a job this hook did not name."""
    m = _JOB.fullmatch(text)
    return None if m is None else JobId(m["node"], m["boot"], int(m["pid"]), int(m["start"]))


def config_error(e: ConfigError) -> str:
    """A refused token or an unusable token file, as the task log and `check` say it: a config error."""
    return CONFIG_ERROR + "; ".join(e.problems)


class Refused(ControllerError):
    """The controller answered, and refused (`code` is the contract's error code, "" if it answered badly)."""

    def __init__(self, message: str, code: str = "", answer: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.answer = answer or {}


def check_answer(data: bytes | str, phase: str, where: str) -> dict[str, Any]:
    """The answer object of the contract (section 3), or Refused naming what is wrong with it."""
    try:
        body = json.loads(data)
    except ValueError:
        raise Refused(f"{where}: {phase}: the answer is not JSON: {str(data)[:120]!r}") from None
    if not isinstance(body, dict) or body.get("api") != API or not isinstance(body.get("ok"), bool):
        raise Refused(f"{where}: {phase}: not an answer of controller API {API}: {str(data)[:120]!r}")
    if not body["ok"]:
        err: dict[str, Any] = body["error"] if isinstance(body.get("error"), dict) else {}
        code, message = str(err.get("code", "")), str(err.get("message", ""))[:300]
        raise Refused(f"{where}: {phase} refused: {code or 'error'}: {message}", code, body)
    return body


class CommandCarrier:
    """Carrier A: `COMMAND signal PHASE --job J --vmid N ...` in the guest over its transport."""

    def __init__(self, transport: Transport, spec: ControllerSpec, name: str) -> None:
        self.t = transport
        self.spec = spec
        self.where = f"controller {name} ({' '.join(spec.command)} in {transport.target})"

    def send(self, phase: str, fields: dict[str, Any], timeout: float) -> dict[str, Any]:
        argv = [*self.spec.command, "signal", phase]
        for key, value in fields.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        res = self.t.run(argv, timeout=timeout)  # TransportError / ConnectError: unreachable
        lines = res.stdout.strip().splitlines()
        if len(lines) != 1:
            tail = res.stderr.strip().splitlines()[-3:]
            raise Refused(f"{self.where}: {phase}: exit {res.exit_status}, {len(lines)} lines on stdout "
                          f"(one JSON line expected){': ' + ' | '.join(tail) if tail else ''}")
        try:
            body = check_answer(lines[0], phase, self.where)
        except Refused as e:
            if e.code and _EXIT.get(e.code, 5) != res.exit_status:
                raise Refused(f"{e} (and exit {res.exit_status} disagrees with it)", "internal", e.answer) from None
            raise
        if res.exit_status != 0:
            raise Refused(f"{self.where}: {phase}: answered ok but exited {res.exit_status}", "internal", body)
        return body


class HttpCarrier:
    """Carrier B: the controller's HTTPS API, with `requests` (imported only by the phases that use it)."""

    def __init__(self, spec: ControllerSpec, name: str) -> None:
        self.spec = spec
        self.where = f"controller {name} ({spec.url})"
        self._session: Any = None

    def _open(self) -> Any:
        if self._session is not None:
            return self._session
        import requests
        from requests.adapters import HTTPAdapter

        problem = token_file_problem(self.spec.token_file)
        if problem:
            raise ConfigError([f"{self.where}: token_file: {problem}"])
        with open(self.spec.token_file, encoding="ascii", errors="replace") as f:
            token = f.read().strip()
        if len(token) < 16 or any(c.isspace() for c in token):
            raise ConfigError([f"{self.where}: token_file: {self.spec.token_file} "
                               "must hold one token of at least 16 characters without spaces"])
        s = requests.Session()
        s.trust_env = False  # no proxy or CA bundle from the environment
        s.headers["Authorization"] = f"Bearer {token}"
        if self.spec.fingerprint:
            pin = self.spec.fingerprint

            class Pinned(HTTPAdapter):
                """Accepts exactly the certificate with this SHA-256 (the pin replaces chain and name checks)."""

                def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
                    kwargs["assert_fingerprint"] = pin
                    super().init_poolmanager(*args, **kwargs)

            s.verify = False
            httpio.mount(s, Pinned(max_retries=0))
        else:
            s.verify = self.spec.ca_file
            httpio.mount(s, HTTPAdapter(max_retries=0))
        self._session = s
        return s

    def send(self, phase: str, fields: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One message; the whole request (connect, TLS, answer) within `timeout`, its answer at most MAX_ANSWER."""
        import requests

        from ..errors import ConnectError

        s = self._open()
        method, args = ("GET", dict[str, Any]()) if phase == "status" else ("POST", {"json": fields})
        try:
            r = httpio.request(s, method, f"{self.spec.url}/v1/{phase}", timeout=timeout, cap=MAX_ANSWER,
                               source=f"{self.where}: {phase}", connect_timeout=CONNECT_TIMEOUT, **args)
        except httpio.TooLarge as e:
            raise Refused(str(e)) from None  # as an answer that is not one of the contract
        except httpio.DeadlineExceeded as e:
            raise ConnectError(str(e)) from None
        except requests.RequestException as e:
            raise ConnectError(f"{self.where}: {phase}: {type(e).__name__}: {str(e)[:300]}") from None
        if r.status in (401, 403):
            raise ConfigError([f"{self.where}: {phase}: HTTP {r.status}: the token in {self.spec.token_file} "
                               "is refused (is it the controller's?)"])
        return check_answer(r.body, phase, f"{self.where}, HTTP {r.status}")

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None


class ControllerDriver(KindDriver):
    """The controllers of one guest (its stacks of kind controller), for one job."""

    kind = Kind.CONTROLLER

    def __init__(self, transport: Transport, guest: GuestConfig, job: JobId) -> None:
        self.t = transport
        self.guest = guest
        self.job = job
        self.mode = ""  # set by the quiesce: vzdump's mode, and the deadline (Unix time) sent with it
        self.deadline = 0.0
        self.moment = Moment.RESUME  # what a start is (GIVE_UP: the hook gives up on the job)
        self.ended: set[str] = set()  # controllers whose start was the job's end for them (abort)
        self._carriers: dict[str, CommandCarrier | HttpCarrier] = {}

    def specs(self) -> list[tuple[StackSpec, ControllerSpec]]:
        """The guest's controllers, each with its table."""
        return of_kind(self.guest.stacks or (), ControllerSpec)

    def carrier(self, name: str) -> CommandCarrier | HttpCarrier:
        if name not in self._carriers:
            spec = next((c for s, c in self.specs() if s.name == name), None)
            if spec is None:
                raise ControllerError(f"guest {self.guest.vmid}: controller {name!r} is not in its settings any more")
            self._carriers[name] = HttpCarrier(spec, name) if spec.url else CommandCarrier(self.t, spec, name)
        return self._carriers[name]

    def close_carriers(self) -> None:
        for c in self._carriers.values():
            if isinstance(c, HttpCarrier):
                c.close()

    def _send(self, rec: StackRecord, phase: str, timeout: float, vmid: int | None = None,
              **extra: Any) -> dict[str, Any]:
        fields = {"job": rec.job, "vmid": self.guest.vmid if vmid is None else vmid, **extra}
        return self.carrier(rec.name).send(phase, fields, timeout)

    # -- the driver's verbs ----------------------------------------------------------------------

    def running(self, specs: tuple[StackSpec, ...], timeout: float) -> dict[str, StackRecord]:
        """Every configured controller: it alone knows what it runs, and is asked at the quiesce."""
        return {s.name: StackRecord.controller(s.name, job_string(self.job)) for s in specs
                if s.kind is Kind.CONTROLLER}

    def answer_within(self, rec: StackRecord, stop_timeout: float) -> float:
        spec = next((c for s, c in self.specs() if s.name == rec.name), None)
        within = (spec.answer_within if spec is not None and spec.answer_within is not None
                  else stop_timeout + DEFAULT_ANSWER_EXTRA)
        return max(1.0, min(3600.0, within))

    def stop(self, rec: StackRecord, stop_timeout: float, timeout: float) -> StopOutcome:
        """`quiesce`: confirmed when the controller answers ok with job_state quiesced."""
        t0 = time.monotonic()
        within = max(1.0, min(self.answer_within(rec, stop_timeout), timeout - ANSWER_MARGIN))
        try:
            body = self._send(rec, "quiesce", within + ANSWER_MARGIN, mode=self.mode or "snapshot",
                              deadline=round(self.deadline or time.time() + self.guest.max_downtime, 3),
                              answer_within=round(within, 3))
        except ConfigError as e:
            return StopOutcome(rec.name, time.monotonic() - t0, (), config_error(e))
        except HookError as e:
            return StopOutcome(rec.name, time.monotonic() - t0, (), str(e))
        if body.get("job_state") != "quiesced":
            return StopOutcome(rec.name, time.monotonic() - t0, (),
                               f"controller {rec.name}: quiesce answered job_state "
                               f"{str(body.get('job_state'))[:40]!r}, not quiesced")
        killed = body.get("killed")
        killed = tuple(str(k)[:128] for k in killed) if isinstance(killed, list) else ()
        return StopOutcome(rec.name, time.monotonic() - t0, killed)

    def start(self, rec: StackRecord, timeout: float) -> float:
        """`snapshotted`, or `abort` when the quiesce was not confirmed or the hook gives up on the job
        (stacks/conversation.py): confirmed by any ok answer (unknown/expired: it holds nothing of
        the job)."""
        t0 = time.monotonic()
        word = message(self.moment, rec.quiesced)
        try:
            self._send(rec, word, timeout)
        except ConfigError as e:
            raise ControllerError(config_error(e)) from None
        if word in ENDS:
            self.ended.add(rec.name)
            why = "its quiesce was not confirmed" if not rec.quiesced else "the hook gave up on the job"
            log.info("controller %s told %s (%s): nothing more for job %s", rec.name, word, why, rec.job)
        return time.monotonic() - t0

    def is_up(self, rec: StackRecord, timeout: float) -> bool:
        """The controller holds nothing of this job stopped (its job is resumed, closed or unknown)."""
        body = self.status(rec.name, timeout)
        open_job = body.get("open_job")
        return not (isinstance(open_job, dict) and open_job.get("job") == rec.job
                    and open_job.get("state") in ("quiescing", "quiesced", "quiesce_failed"))

    def close(self, rec: StackRecord, phase: str, timeout: float) -> None:
        """`done`, `failed` or `abort`: the job is over for the hook. Raises HookError unless confirmed."""
        assert phase in ENDS
        try:
            self._send(rec, phase, timeout)
        except ConfigError as e:
            raise ControllerError(config_error(e)) from None

    def status(self, name: str, timeout: float) -> dict[str, Any]:
        """The controller's status. Raises ConfigError for a refused token (401/403) or an unusable
        token file, HookError when it cannot be asked."""
        return self.carrier(name).send("status", {}, timeout)

    def end_stale(self, force: bool, timeout: float, act: bool = True) -> list[tuple[str, str, bool]]:
        """Ask every controller what it holds, and `abort` a job of it that is over (its vzdump
        worker is gone, its deadline passed, or `force`); with `act` false, only say so.
        [(controller, what was done, still down)]."""
        out: list[tuple[str, str, bool]] = []
        for spec, _ in self.specs():
            try:
                body = self.status(spec.name, timeout)
            except ConfigError as e:
                out.append((spec.name, config_error(e), True))
                continue
            except HookError as e:
                out.append((spec.name, f"not reachable ({e})", True))
                continue
            open_job = body.get("open_job")
            if not isinstance(open_job, dict) or not isinstance(open_job.get("job"), str):
                held = body.get("held") or []
                out.append((spec.name,
                            f"holds {', '.join(map(str, held))} without a job (its own recovery starts them)"
                            if held else "", False))
                continue
            job_text, deadline = open_job["job"], open_job.get("deadline")
            jid = parse_job(job_text)
            over = jid.is_over() if jid is not None else None
            expired = isinstance(deadline, (int, float)) and deadline < time.time()
            if jid == self.job or not (force or over or expired):
                out.append((spec.name, f"job {job_text} open ({open_job.get('state')}), "
                                       "left alone (it may still run, deadline not passed)", False))
                continue
            why = "its job is over" if over else "its deadline passed" if expired else "forced"
            if not act:
                holds = open_job.get("state") in ("quiescing", "quiesced", "quiesce_failed")
                out.append((spec.name, f"job {job_text} open ({open_job.get('state')}): "
                                       f"the next backup tells it abort ({why}), "
                                       f"or `vzdump-hook recover {self.guest.vmid}`", holds))
                continue
            try:
                vmid = open_job.get("vmid")
                self._send(StackRecord.controller(spec.name, job_text), message(Moment.SWEEP, False), timeout,
                           vmid=vmid if isinstance(vmid, int) else None)
            except ConfigError as e:
                out.append((spec.name, f"job {job_text} ({why}): abort not sent: {config_error(e)}", True))
                continue
            except HookError as e:
                out.append((spec.name, f"job {job_text} ({why}): abort failed: {e}", True))
                continue
            out.append((spec.name, f"job {job_text} ({why}): told abort, it starts what it held", False))
        return out


Driver = ControllerDriver  # the name every stacks/KIND.py defines (stacks/__init__.py)
