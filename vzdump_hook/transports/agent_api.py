"""The Proxmox VE API as the agent transport (agent.py) uses it: one request on a VM's `agent/*` path, through
the node's own `pvesh` (api = "local": by absolute path, as root, no credentials) or over HTTPS with an API
token (api = "https": requests, imported only then; TLS always verified). Each request is bounded by its own
timeout; the API's errors become transport errors that say what to fix.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from typing import TYPE_CHECKING, Any

from ..errors import CommandTimeout, ConnectError, TransportError
from .local import run_local

if TYPE_CHECKING:
    from .tables import AgentConfig

REQUEST_CAP = 30.0  # one API request never waits longer than this
# bytes of one API answer read: qemu-ga keeps up to 16 MiB of each stream, base64 (4/3), two streams, with room
MAX_API_ANSWER = 48 * 1024 * 1024
_HTTP_STATUS = re.compile(r"^(\d{3}) [A-Za-z]", re.M)  # pvesh prints an API error's status first
_AGENT_OFF = re.compile(r"guest agent is not running|no qemu guest agent configured|not running|got timeout", re.I)


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


class AgentApi:
    """The guest agent of VM `vmid` on `node` through the API that `cfg` names; `target` opens its messages."""

    def __init__(self, target: str, vmid: int, node: str, cfg: AgentConfig) -> None:
        self.target = target
        self.vmid = vmid
        self.node = node
        self.cfg = cfg
        self._session: Any = None  # requests' Session (api = "https"), made at the first request
        self._lock = threading.Lock()
        self._tl = threading.local()  # the timeout of the request this thread is making

    def call(self, verb: str, what: str, deadline: float, shown: str, **args: Any) -> Any:
        """One API request on agent/`what`, bounded by `deadline`; errors mapped to transport errors."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise CommandTimeout(f"{self.target}: no time left for agent/{what}", command=shown)
        self._tl.timeout = min(left, REQUEST_CAP)
        try:
            path = f"/nodes/{self.node}/qemu/{self.vmid}/agent/{what}"
            return self._request("POST" if verb == "post" else "GET", path, args)
        except ApiError as e:
            raise self._api_error(what, e, shown) from None
        except (CommandTimeout, ConnectError) as e:
            if isinstance(e, CommandTimeout) and self.cfg.api == "local":
                raise CommandTimeout(f"{self.target}: pvesh gave no answer for agent/{what} within "
                                     f"{self._tl.timeout:.1f} s", command=shown) from None
            raise
        except Exception as e:  # requests' exceptions (only the https API raises them)
            raise self._request_error(what, e, shown) from None

    def _request(self, method: str, path: str, args: dict[str, Any]) -> Any:
        """One API request (GET or POST) on `path` below /api2/json; the answer's `data`. Raises ApiError."""
        if self.cfg.api == "local":
            return self._pvesh(method, path, args)
        with self._lock:
            if self._session is None:
                self._session = self._https_session()
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
            # pvesh: "400 Parameter verification failed."
            code = next((int(m[1]) for m in _HTTP_STATUS.finditer(text)), 500)
            raise ApiError(code, text or f"pvesh exited {status}")
        return _json_answer(out.decode("utf-8", "replace"))

    def _https_session(self) -> Any:
        cfg = self.cfg
        try:
            import requests
        except ImportError:
            raise ConnectError(f"{self.target}: api = 'https' needs the Python package requests "
                               "(Debian: python3-requests)") from None
        try:
            with open(cfg.token_file, encoding="utf-8") as f:
                secret = f.read().strip()
        except OSError as e:
            raise ConnectError(f"{self.target}: cannot read the API token file {cfg.token_file}: "
                               f"{e.strerror}") from None
        if not secret:
            raise ConnectError(f"{self.target}: the API token file {cfg.token_file} is empty")
        if isinstance(cfg.verify, str) and not os.path.isfile(cfg.verify):
            raise ConnectError(f"{self.target}: CA file {cfg.verify} (agent.verify) not found: "
                               "give the CA that signed the API's certificate")
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
        resp = httpio.request(self._session, method, url, timeout=self._tl.timeout, cap=MAX_API_ANSWER,
                              source=f"{self.target}: {method} {path}", **form)
        try:
            body = json.loads(resp.body)
        except ValueError:
            body = None
        if resp.status >= 400:
            errors = body.get("errors") if isinstance(body, dict) else None
            raise ApiError(resp.status, resp.reason, errors)
        return body.get("data") if isinstance(body, dict) else None

    def _api_error(self, what: str, e: ApiError, shown: str) -> TransportError:
        text = " ".join(str(x).strip() for x in (e.content, e.errors or "") if x)
        cfg, vmid = self.cfg, self.vmid
        if e.status_code == 401:
            return ConnectError(f"{self.target}: the API refused the token {cfg.token_id} ({e.status_code} {text}): "
                                f"check token_id and {cfg.token_file}", command=shown)
        if e.status_code == 403:
            return ConnectError(f"{self.target}: the token {cfg.token_id} may not use the guest agent of VM {vmid} "
                                f"({text}): it needs VM.Monitor on /vms/{vmid} (PVE 9: VM.GuestAgent.Unrestricted)",
                                command=shown)
        if _AGENT_OFF.search(text):
            return ConnectError(f"{self.target}: the QEMU guest agent does not answer ({text}): enable it "
                                f"(qm set {vmid} --agent enabled=1, then restart the VM) and run qemu-guest-agent "
                                "in the guest", command=shown)
        return TransportError(f"{self.target}: agent/{what} failed: {e.status_code} {text}", command=shown)

    def _request_error(self, what: str, e: Exception, shown: str) -> TransportError:
        import requests

        from .. import httpio

        within = f"for agent/{what} within {self._tl.timeout:.1f} s"
        if isinstance(e, httpio.DeadlineExceeded):
            return CommandTimeout(f"{self.target}: the API gave no whole answer {within}", command=shown)
        if isinstance(e, httpio.TooLarge):
            return TransportError(f"{e} (agent/{what})", command=shown)

        if isinstance(e, requests.exceptions.SSLError):
            return ConnectError(f"{self.target}: TLS certificate not trusted (verify = {self.cfg.verify}): {e}",
                                command=shown)
        if isinstance(e, requests.exceptions.Timeout):
            return CommandTimeout(f"{self.target}: the API gave no answer {within}", command=shown)
        if isinstance(e, requests.exceptions.RequestException):
            return ConnectError(f"{self.target}: {type(e).__name__}: {e}", command=shown)
        return TransportError(f"{self.target}: agent/{what}: {type(e).__name__}: {e}", command=shown)
