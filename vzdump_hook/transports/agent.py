"""agent transport (QEMU): commands through the QEMU guest agent, over the Proxmox VE API.

`agent/exec` starts the command and answers a pid at once; `agent/exec-status` says `exited: 0` until
it has ended, then once gives exit code and output (PVE decodes the agent's base64: the bytes come as
one JSON character each). The agent keeps at most 16 MiB per stream and flags the rest as truncated.
stdin goes as `input-data` (text, at most 64 KiB, and the HTTPS request at most 64 KiB in all);
files that do not fit go through `agent/file-write` in parts, then one command assembles them.

The API is reached without a client library (the two calls need none, and Debian 12's python3-proxmoxer
is 1.2.0): `api = "local"` runs the node's own `pvesh` by absolute path, as root, with no credentials;
`api = "https"` sends requests (imported only then) with an API token whose secret is in a file only
root can read; TLS is always verified.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import threading
import time
import urllib.parse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import CommandTimeout, ConnectError, TransportError
from .base import _WRITE_SCRIPT, Transport, display, sh
from .local import run_local

if TYPE_CHECKING:
    from ..config import AgentConfig, GuestConfig

INPUT_LIMIT = 64 * 1024  # PVE: input-data maxLength
BODY_LIMIT = 60 * 1024  # pveproxy refuses request bodies over 64 KiB; keep a margin for the form encoding
PART = 30 * 1024  # raw bytes per file-write (base64: 40 KiB, under file-write's 60 KiB content limit)
REQUEST_CAP = 30.0  # one API request never waits longer than this
MAX_API_ANSWER = 48 * 1024 * 1024  # bytes of one API answer read: qemu-ga keeps up to 16 MiB of each stream, base64 (4/3), two streams, with room
_HTTP_STATUS = re.compile(r"^(\d{3}) [A-Za-z]", re.M)  # pvesh prints an API error's status first
_AGENT_OFF = re.compile(r"guest agent is not running|no qemu guest agent configured|not running|got timeout", re.I)

# Joins the parts written by file-write into $1 atomically, then removes them (see base._WRITE_SCRIPT).
_ASSEMBLE_SCRIPT = r"""
set -eu
umask 077
dst=$1; shift
dir=$(dirname -- "$dst")
tmp="$dst.tmp.$$"
trap 'rm -f -- "$tmp" "$@"' EXIT
cat -- "$@" > "$tmp"
sync -- "$tmp" 2>/dev/null || sync
mv -f -- "$tmp" "$dst"
sync -- "$dir" 2>/dev/null || sync
"""


class ApiError(Exception):
    """The API (or pvesh) answered an error: its HTTP status, message and per-parameter errors."""

    def __init__(self, status_code: int, content: str, errors: Any = None) -> None:
        super().__init__(f"{status_code} {content}")
        self.status_code = status_code
        self.content = content
        self.errors = errors


def _json_answer(text: str) -> Any:
    """pvesh's JSON output (None when empty). Lines before the JSON (notes that some pvesh versions print
    on stdout) are skipped; lines are split at "\n" only, as out-data may hold U+0085 or U+2028."""
    at = 0
    while text.strip():
        try:
            return json.loads(text[at:])
        except ValueError:
            at = text.find("\n", at) + 1
            if at == 0:
                raise ApiError(500, f"pvesh answered no JSON: {text[:200]!r}") from None
    return None


def output_bytes(value: Any) -> bytes:
    """out-data/err-data as the bytes the guest wrote. PVE puts the decoded bytes into a JSON string one
    character per byte; a server that decoded them as UTF-8 first gives characters above U+00FF."""
    if not isinstance(value, str):
        return b""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace")


class AgentTransport(Transport):
    name = "agent"

    def __init__(self, vmid: int, cfg: AgentConfig) -> None:
        via = "pvesh" if cfg.api == "local" else f"https://{cfg.host}:{cfg.port}"
        super().__init__(f"agent {vmid} via {via}")
        self.vmid = vmid
        self.cfg = cfg
        if cfg.node:
            self.node = cfg.node
        else:
            from ..node.job import node_name

            self.node = node_name()
        self._api: Any = None
        self._lock = threading.Lock()
        self._tl = threading.local()  # the timeout of the request this thread is making

    @classmethod
    def for_guest(cls, guest: GuestConfig) -> AgentTransport:
        from ..config import AgentConfig

        return cls(guest.vmid, guest.agent or AgentConfig())

    # -- the API ---------------------------------------------------------------------------------

    def _request(self, method: str, path: str, args: dict[str, Any]) -> Any:
        """One API request (GET or POST) on `path` below /api2/json; the answer's `data`. Raises ApiError."""
        if self.cfg.api == "local":
            return self._pvesh(method, path, args)
        with self._lock:
            if self._api is None:
                self._api = self._https_session()
        return self._https(method, path, args)

    def _pvesh(self, method: str, path: str, args: dict[str, Any]) -> Any:
        """The node's own pvesh, by absolute path, as root: no credentials, no client library."""
        argv = [self.cfg.pvesh, "get" if method == "GET" else "create", path]
        for key, value in args.items():
            for item in value if isinstance(value, list) else [value]:
                argv += [f"-{key}", str(item)]  # pvesh (Getopt::Long) takes a value that starts with '-'
        argv += ["--output-format", "json"]
        status, out, err = run_local(argv, None, self._tl.timeout, shown=" ".join(argv[:3]), target=self.target)
        if status != 0:
            text = err.decode("utf-8", "replace").strip()
            code = next((int(m[1]) for m in _HTTP_STATUS.finditer(text)), 500)  # pvesh: "400 Parameter verification failed."
            raise ApiError(code, text or f"pvesh exited {status}")
        return _json_answer(out.decode("utf-8", "replace"))

    def _https_session(self) -> Any:
        cfg = self.cfg
        try:
            import requests
        except ImportError:
            raise ConnectError(f"{self.target}: api = 'https' needs the Python package requests (Debian: python3-requests)") from None
        try:
            with open(cfg.token_file, encoding="utf-8") as f:
                secret = f.read().strip()
        except OSError as e:
            raise ConnectError(f"{self.target}: cannot read the API token file {cfg.token_file}: {e.strerror}") from None
        if not secret:
            raise ConnectError(f"{self.target}: the API token file {cfg.token_file} is empty")
        if isinstance(cfg.verify, str) and not os.path.isfile(cfg.verify):
            raise ConnectError(f"{self.target}: CA file {cfg.verify} (agent.verify) not found: give the CA that signed the API's certificate")
        session = requests.Session()
        session.headers["Authorization"] = f"PVEAPIToken={cfg.token_id}={secret}"
        session.verify = cfg.verify
        session.trust_env = False  # no proxy or CA bundle from the environment: the config says where the API is
        from .. import httpio

        return httpio.mount(session)

    def _https(self, method: str, path: str, args: dict[str, Any]) -> Any:
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        url = f"https://{host}:{self.cfg.port}/api2/json{path}"
        form: dict[str, Any] = {"data": args} if method == "POST" else {"params": args}
        from .. import httpio

        # lists go as repeated keys, as PVE takes them; the whole request within the timeout, the answer
        # (a guest's output, base64) at most MAX_API_ANSWER
        resp = httpio.request(self._api, method, url, timeout=self._tl.timeout, cap=MAX_API_ANSWER,
                              source=f"{self.target}: {method} {path}", **form)
        try:
            body = json.loads(resp.body)
        except ValueError:
            body = None
        if resp.status >= 400:
            errors = body.get("errors") if isinstance(body, dict) else None
            raise ApiError(resp.status, resp.reason, errors)
        return body.get("data") if isinstance(body, dict) else None

    def _call(self, verb: str, what: str, deadline: float, shown: str, **args: Any) -> Any:
        """One API request on agent/`what`, bounded by `deadline`; errors mapped to transport errors."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise CommandTimeout(f"{self.target}: no time left for agent/{what}", command=shown)
        self._tl.timeout = min(left, REQUEST_CAP)
        try:
            return self._request("POST" if verb == "post" else "GET", f"/nodes/{self.node}/qemu/{self.vmid}/agent/{what}", args)
        except ApiError as e:
            raise self._api_error(what, e, shown) from None
        except (CommandTimeout, ConnectError) as e:
            if isinstance(e, CommandTimeout) and self.cfg.api == "local":
                raise CommandTimeout(f"{self.target}: pvesh gave no answer for agent/{what} within {self._tl.timeout:.1f} s", command=shown) from None
            raise
        except Exception as e:  # requests' exceptions (only the https API raises them)
            raise self._request_error(what, e, shown) from None

    def _api_error(self, what: str, e: ApiError, shown: str) -> TransportError:
        text = " ".join(str(x).strip() for x in (e.content, e.errors or "") if x)
        if e.status_code == 401:
            return ConnectError(f"{self.target}: the API refused the token {self.cfg.token_id} ({e.status_code} {text}): check token_id and {self.cfg.token_file}", command=shown)
        if e.status_code == 403:
            return ConnectError(f"{self.target}: the token {self.cfg.token_id} may not use the guest agent of VM {self.vmid} ({text}): it needs VM.Monitor on /vms/{self.vmid} (PVE 9: VM.GuestAgent.Unrestricted)", command=shown)
        if _AGENT_OFF.search(text):
            return ConnectError(
                f"{self.target}: the QEMU guest agent does not answer ({text}): enable it (qm set {self.vmid} --agent enabled=1, then restart the VM) and run qemu-guest-agent in the guest",
                command=shown,
            )
        return TransportError(f"{self.target}: agent/{what} failed: {e.status_code} {text}", command=shown)

    def _request_error(self, what: str, e: Exception, shown: str) -> TransportError:
        import requests

        from .. import httpio

        if isinstance(e, httpio.DeadlineExceeded):
            return CommandTimeout(f"{self.target}: the API gave no whole answer for agent/{what} within {self._tl.timeout:.1f} s", command=shown)
        if isinstance(e, httpio.TooLarge):
            return TransportError(f"{e} (agent/{what})", command=shown)

        if isinstance(e, requests.exceptions.SSLError):
            return ConnectError(f"{self.target}: TLS certificate not trusted (verify = {self.cfg.verify}): {e}", command=shown)
        if isinstance(e, requests.exceptions.Timeout):
            return CommandTimeout(f"{self.target}: the API gave no answer for agent/{what} within {self._tl.timeout:.1f} s", command=shown)
        if isinstance(e, requests.exceptions.RequestException):
            return ConnectError(f"{self.target}: {type(e).__name__}: {e}", command=shown)
        return TransportError(f"{self.target}: agent/{what}: {type(e).__name__}: {e}", command=shown)

    # -- commands --------------------------------------------------------------------------------

    def connect(self, timeout: float) -> None:
        """The VM runs and its agent answers a ping; ConnectError says which of them is not so."""
        deadline = time.monotonic() + timeout
        try:
            self._call("post", "ping", deadline, "agent/ping")
        except CommandTimeout as e:
            raise ConnectError(f"{e} (is qemu-guest-agent running in the guest?)", command="agent/ping") from None

    def _input_problem(self, argv: Sequence[str], stdin: bytes) -> str | None:
        """Why `stdin` cannot go as input-data with argv (not text, too large), or None."""
        try:
            text = stdin.decode("utf-8")
        except UnicodeDecodeError:
            text = "\0"
        if "\0" in text:
            return "the guest agent takes stdin as text only (input-data): binary input refused"
        body = len(urllib.parse.urlencode({"command": list(argv), "input-data": text}, doseq=True))
        if len(text) > INPUT_LIMIT or body > BODY_LIMIT:
            return f"input of {len(stdin)} bytes is too large for the guest agent's input-data (at most {INPUT_LIMIT} characters, request at most {BODY_LIMIT} bytes)"
        return None

    def _exec(self, argv: Sequence[str], stdin: bytes | None, timeout: float) -> tuple[int, bytes, bytes]:
        deadline = time.monotonic() + timeout
        shown = display(argv)
        args: dict[str, Any] = {"command": list(argv)}
        if stdin is not None:
            problem = self._input_problem(argv, stdin)
            if problem:
                raise TransportError(f"{self.target}: {problem}", command=shown)
            args["input-data"] = stdin.decode("utf-8")
        started = self._call("post", "exec", deadline, shown, **args)
        pid = started.get("pid") if isinstance(started, dict) else None
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise TransportError(f"{self.target}: agent/exec answered no pid: {str(started)[:200]}", command=shown)
        delay = 0.05
        while True:
            try:
                st = self._call("get", "exec-status", deadline, shown, pid=pid)
            except CommandTimeout:  # the time ran out during a poll: the command's timeout, not the API's
                raise CommandTimeout(f"{self.target}: no answer within {timeout:.1f} s (pid {pid} may still run in the guest: the agent cannot stop it)", command=shown) from None
            if not isinstance(st, dict) or "exited" not in st:
                raise TransportError(f"{self.target}: agent/exec-status answered no state: {str(st)[:200]}", command=shown)
            if st["exited"] not in (0, False):
                break
            if time.monotonic() + delay >= deadline:
                raise CommandTimeout(f"{self.target}: no answer within {timeout:.1f} s (pid {pid} may still run in the guest: the agent cannot stop it)", command=shown)
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        out, err = output_bytes(st.get("out-data")), output_bytes(st.get("err-data"))
        if isinstance(st.get("exitcode"), int):
            status = int(st["exitcode"])
        elif isinstance(st.get("signal"), int):
            status = 128 + int(st["signal"])
        else:
            raise TransportError(f"{self.target}: agent/exec-status gave neither exitcode nor signal: {str(st)[:200]}", command=shown)
        if st.get("err-truncated"):
            err += b"\n[stderr truncated by the guest agent]\n"
        if st.get("out-truncated"):
            raise TransportError(f"{self.target}: output truncated by the guest agent (over its capture limit): not used", command=shown, exit_status=status, stderr=err.decode("utf-8", "replace"))
        return status, out, err

    def write_file(self, path: str, data: bytes, *, timeout: float) -> None:
        """Atomically, as over SSH: stdin (input-data) when it fits, else file-write parts joined in the guest."""
        if data.isascii() and self._input_problem(sh(_WRITE_SCRIPT, path), data) is None:
            super().write_file(path, data, timeout=timeout)
        else:
            self._write_parts(path, data, time.monotonic() + timeout)

    def _write_parts(self, path: str, data: bytes, deadline: float) -> None:
        directory = path.rsplit("/", 1)[0] or "/"
        self.run(["mkdir", "-p", "--", directory], timeout=deadline - time.monotonic()).check(f"cannot write {path}")
        token = secrets.token_hex(8)
        parts = [f"{path}.part.{token}.{i}" for i in range(max(1, -(-len(data) // PART)))]
        try:
            for i, part in enumerate(parts):
                chunk = base64.b64encode(data[i * PART : (i + 1) * PART]).decode()
                self._call("post", "file-write", deadline, f"agent/file-write {part}", file=part, content=chunk, encode=0)
        except TransportError:
            try:
                self.run(["rm", "-f", "--", *parts], timeout=min(5.0, max(0.1, deadline - time.monotonic())))
            except TransportError:
                pass
            raise
        self.run(sh(_ASSEMBLE_SCRIPT, path, *parts), timeout=deadline - time.monotonic()).check(f"cannot write {path}")


