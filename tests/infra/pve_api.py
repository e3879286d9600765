"""A double of the Proxmox VE API's guest-agent calls, served over HTTPS on 127.0.0.1, and a `pvesh`
stand-in that reaches it.

Written from qemu-server's ``PVE/API2/Qemu/Agent.pm`` and ``PVE/QemuServer/Agent.pm`` and QEMU's
``guest-exec``/``guest-exec-status`` (qga/commands.c); it does not import ``vzdump_hook``.

- ``POST /api2/json/nodes/NODE/qemu/VMID/agent/exec``: ``command`` (array: the form key repeated),
  ``input-data`` (string, maxLength 65536, sent to the command's stdin). The command is started
  asynchronously in the VM and the answer is ``{"pid": N}`` at once.
- ``GET .../agent/exec-status?pid=N``: ``{"exited": 0}`` while the command runs or its output pipes are
  open; then once ``exited: 1``, ``exitcode`` (or ``signal``), ``out-data``/``err-data`` (only when not
  empty: the bytes as PVE returns them, base64-decoded and put into the JSON string one character per
  byte) and ``out-truncated``/``err-truncated`` (only when set) — after which the pid is unknown
  (``Agent error: Invalid parameter 'pid'``), as in QEMU. Output beyond ``max_output`` bytes
  (QEMU: 16 MiB) is dropped and flagged, and the pipe is closed.
- ``POST .../agent/file-write``: ``file``, ``content`` (maxLength 61440), ``encode`` (default 1;
  0: content is base64 already). Opens the file with mode ``wb`` in the VM (no temp file, no fsync).
- ``POST .../agent/ping``.
- Every agent call first checks as ``assert_agent_available`` does: ``No QEMU guest agent configured``,
  ``VM N not running``, ``QEMU guest agent is not running`` (HTTP 500, the message as the reason).
- Parameters are checked like PVE's JSON schema (400 ``Parameter verification failed.`` with
  ``errors``); request bodies over 64 KiB are refused (413); a wrong node is a 500 like proxyto's.
- Auth: ``Authorization: PVEAPIToken=USER@REALM!NAME=SECRET`` only (401 otherwise).
- TLS with a certificate for 127.0.0.1/localhost signed by a CA made per server (``ca_file``), so a
  client verifies it for real.

A VM is a :class:`tests.infra.pct_standin.NsContainer` (commands run in its namespaces), ``None``
for the host itself (unit tests), or a real VM's guest agent (``qga``: a :class:`tests.infra.vm.Qga`).
With ``qga`` the double plays only what PVE adds (auth, paths, parameter checks, the agent checks) and
forwards as qemu-server's ``PVE/QemuServer/Agent.pm`` does: ``exec`` -> ``guest-exec`` (``path``,
``arg``, ``capture-output: true``, ``input-data`` base64), ``exec-status`` -> ``guest-exec-status``
(out-data/err-data base64-decoded, everything else as the agent answers it), ``file-write`` ->
``guest-file-open`` (mode ``wb``) / ``guest-file-write`` (``buf-b64``) / ``guest-file-close``,
``fsfreeze-freeze``/``-thaw``/``-status`` and ``ping`` -> ``guest-*``. An agent error becomes
``Agent error: <desc>`` (HTTP 500).
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import re
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["PveApiDouble", "Vm", "make_ca", "make_pvesh"]

NSENTER = "/usr/bin/nsenter"
GUEST_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}  # qemu-ga under systemd
POST_LIMIT = 64 * 1024
_PATH = re.compile(r"^/api2/json/nodes/([^/]+)/qemu/(\d+)/agent/([a-z-]+)$")


def make_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 and localhost signed by it: (ca.pem, cert.pem, key.pem)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vzdh test PVE root CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "testnode")]))
            .issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # key identifiers: Python 3.13's default TLS context (VERIFY_X509_STRICT) refuses a chain without them
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@dataclass
class Vm:
    """A VM of the double. ``container``: where commands run (None: on the host)."""

    vmid: int
    container: Any = None
    agent_configured: bool = True  # `agent: 1` in the VM config
    agent_running: bool = True  # qemu-ga answers in the guest
    qga: Any = None  # a real agent (tests.infra.vm.Qga): requests are forwarded to it

    @property
    def running(self) -> bool:
        return self.container is None or bool(self.container.running)

    def agent(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Forward one command to the real agent. Raises _ApiError 500 ``Agent error: <desc>``."""
        from tests.infra.vm import VmError

        try:
            return self.qga.call(command, arguments)
        except VmError as exc:
            desc = str(exc).split(": ", 2)[-1]
            raise _ApiError(500, f"Agent error: {desc}") from None


@dataclass
class _Proc:
    popen: subprocess.Popen[bytes]
    out: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)
    out_truncated: bool = False
    err_truncated: bool = False
    readers: list[threading.Thread] = field(default_factory=list)
    polls: int = 0  # exec-status calls answered so far


class _ApiError(Exception):
    def __init__(self, status: int, message: str, errors: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.errors = status, message, errors


class PveApiDouble:
    """Start with ``PveApiDouble(workdir)``; ``url``, ``ca_file``, ``token_id``, ``secret``; ``close()``."""

    def __init__(self, workdir: Path, node: str = "testnode", max_output: int = 16 * 1024 * 1024) -> None:
        self.workdir = Path(workdir)
        self.node = node
        self.max_output = max_output
        self.token_id = "root@pam!vzdh"
        self.secret = str(uuid.uuid4())
        self.vms: dict[int, Vm] = {}
        self.requests: list[tuple[str, str, dict[str, Any]]] = []  # (method, agent call, params)
        self.delay = 0.0  # seconds every request waits before it is answered (a slow or hung API)
        self.exec_busy_polls = 0  # exec-status answers `exited: 0` this many times per command first (a slow agent)
        self._procs: dict[tuple[int, int], _Proc] = {}
        self._lock = threading.Lock()
        self.ca_file, cert, key = make_ca(self.workdir / "tls")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def add_vm(self, vmid: int, container: Any = None, **knobs: bool) -> Vm:
        vm = Vm(vmid, container, **knobs)
        self.vms[vmid] = vm
        return vm

    def calls(self, what: str) -> list[dict[str, Any]]:
        return [params for _, w, params in self.requests if w == what]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            procs = list(self._procs.values())
            self._procs.clear()
        for p in procs:
            if p.popen.poll() is None:
                p.popen.kill()
            p.popen.wait()

    # -- the agent -------------------------------------------------------------------------------

    def _argv(self, vm: Vm, argv: list[str]) -> list[str]:
        if vm.container is None:
            return argv
        return [NSENTER, "-t", str(vm.container.pid), "-m", "-n", "--", *argv]

    def _pump(self, proc: _Proc, stream: Any, which: str) -> None:
        buf = proc.out if which == "out" else proc.err
        while chunk := stream.read(65536):
            room = self.max_output - len(buf)
            buf += chunk[:room]
            if len(chunk) > room:  # qemu-ga stops capturing and closes the pipe
                setattr(proc, f"{which}_truncated", True)
                break
        stream.close()

    def exec(self, vm: Vm, command: list[str], input_data: bytes | None) -> int:
        if vm.qga is not None:
            args: dict[str, Any] = {"capture-output": True, "path": command[0], "arg": command[1:]}
            if input_data is not None:
                args["input-data"] = base64.b64encode(input_data).decode()
            return int(vm.agent("guest-exec", args)["pid"])
        try:
            popen = subprocess.Popen(self._argv(vm, command),
                                     stdin=subprocess.PIPE if input_data is not None else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=GUEST_ENV, cwd="/")
        except OSError as e:  # qemu-ga: g_spawn fails
            raise _ApiError(500, "Agent error: Guest agent command failed, error was "
                                 f"'Failed to execute child process \u201c{command[0]}\u201d ({e.strerror})'") from None
        proc = _Proc(popen)
        for stream, which in ((popen.stdout, "out"), (popen.stderr, "err")):
            t = threading.Thread(target=self._pump, args=(proc, stream, which), daemon=True)
            t.start()
            proc.readers.append(t)
        if input_data is not None:
            assert popen.stdin is not None

            def feed() -> None:
                try:
                    popen.stdin.write(input_data)  # type: ignore[union-attr]
                    popen.stdin.close()  # type: ignore[union-attr]
                except OSError:
                    pass

            threading.Thread(target=feed, daemon=True).start()
        with self._lock:
            self._procs[(vm.vmid, popen.pid)] = proc
        return popen.pid

    def exec_status(self, vm: Vm, pid: int) -> dict[str, Any]:
        if vm.qga is not None:
            res: dict[str, Any] = vm.agent("guest-exec-status", {"pid": pid})
            for key in ("out-data", "err-data"):
                if res.get(key):
                    res[key] = base64.b64decode(res[key]).decode("latin-1")
            return res
        with self._lock:
            proc = self._procs.get((vm.vmid, pid))
        if proc is None:
            raise _ApiError(500, "Agent error: Invalid parameter 'pid'")
        finished = proc.popen.poll() is not None and not any(t.is_alive() for t in proc.readers)
        proc.polls += 1
        if not finished or proc.polls <= self.exec_busy_polls:
            return {"exited": 0}
        with self._lock:
            self._procs.pop((vm.vmid, pid), None)
        res: dict[str, Any] = {"exited": 1}
        code = proc.popen.returncode
        if code < 0:
            res["signal"] = -code
        else:
            res["exitcode"] = code
        for which in ("out", "err"):
            data = bytes(getattr(proc, which))
            if data:  # PVE: decode_base64 gives bytes; JSON-encoded they are one character each
                res[f"{which}-data"] = data.decode("latin-1")
                if getattr(proc, f"{which}_truncated"):
                    res[f"{which}-truncated"] = 1
        return res

    def file_write(self, vm: Vm, path: str, data: bytes) -> None:
        if vm.qga is not None:
            handle = vm.agent("guest-file-open", {"path": path, "mode": "wb"})
            vm.agent("guest-file-write", {"handle": handle, "buf-b64": base64.b64encode(data).decode()})
            vm.agent("guest-file-close", {"handle": handle})
            return
        r = subprocess.run(self._argv(vm, ["/bin/sh", "-c", 'exec cat > "$1"', "sh", path]), input=data,
                           capture_output=True, env=GUEST_ENV, timeout=30)
        if r.returncode != 0:
            raise _ApiError(500, f"Agent error: failed to open file '{path}' (mode: 'wb'): No such file or directory")

    # -- requests --------------------------------------------------------------------------------

    def handle(self, method: str, path: str, params: dict[str, list[str]], auth: str) -> Any:
        if self.delay:
            time.sleep(self.delay)
        if auth != f"PVEAPIToken={self.token_id}={self.secret}":
            raise _ApiError(401, "authentication failure")
        m = _PATH.match(path)
        if m is None:
            raise _ApiError(501, f"Method '{method} {path}' not implemented")
        node, vmid, what = m.group(1), int(m.group(2)), m.group(3)
        self.requests.append((method, what,
                              {k: v if len(v) > 1 or k == "command" else v[0] for k, v in params.items()}))
        schema = {
            ("POST", "exec"): {"command": "array", "input-data": "string"},
            ("GET", "exec-status"): {"pid": "integer"},
            ("POST", "file-write"): {"file": "string", "content": "string", "encode": "boolean"},
            ("POST", "ping"): {},
            ("POST", "fsfreeze-freeze"): {},
            ("POST", "fsfreeze-thaw"): {},
            ("POST", "fsfreeze-status"): {},
        }.get((method, what))
        if schema is None:
            raise _ApiError(501, f"Method '{method} {path}' not implemented")
        errors = {}
        for k, v in params.items():
            if k not in schema:
                errors[k] = "property is not defined in schema and the schema does not allow additional properties"
            elif schema[k] != "array" and len(v) > 1:
                errors[k] = "property may not be repeated"
            elif schema[k] == "integer" and not re.fullmatch(r"-?\d+", v[0]):
                errors[k] = f"type check ('integer') failed - got '{v[0]}'"
            elif schema[k] == "boolean" and v[0] not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
                errors[k] = f"type check ('boolean') failed - got '{v[0]}'"
        required = {"exec": ["command"], "exec-status": ["pid"], "file-write": ["file", "content"]}.get(what, [])
        for k in required:
            if k not in params:
                errors[k] = "property is missing and it is not optional"
        if "input-data" in params and len(params["input-data"][0]) > 64 * 1024:
            errors["input-data"] = "value may only be 65536 characters long"
        if "content" in params and len(params["content"][0]) > 60 * 1024:
            errors["content"] = "value may only be 61440 characters long"
        if errors:
            raise _ApiError(400, "Parameter verification failed.", errors)
        if node != self.node:
            raise _ApiError(595, f"no such cluster node '{node}'")
        vm = self.vms.get(vmid)
        if vm is None:
            raise _ApiError(500, f"Configuration file 'nodes/{self.node}/qemu-server/{vmid}.conf' does not exist")
        if not vm.agent_configured:
            raise _ApiError(500, "No QEMU guest agent configured")
        if not vm.running:
            raise _ApiError(500, f"VM {vmid} not running")
        if not vm.agent_running:
            raise _ApiError(500, "QEMU guest agent is not running")
        if what.startswith("fsfreeze-"):
            if vm.qga is None:
                raise _ApiError(501, f"{what}: the double plays it only with a real agent (Vm.qga)")
            return {"result": vm.agent(f"guest-{what}")}
        if what == "ping":
            if vm.qga is not None:
                vm.agent("guest-ping")
            return {"result": {}}
        if what == "exec":
            inp = params.get("input-data", [None])[0]
            return {"pid": self.exec(vm, params["command"], None if inp is None else inp.encode("utf-8"))}
        if what == "exec-status":
            return self.exec_status(vm, int(params["pid"][0]))
        content = params["content"][0]
        if params.get("encode", ["1"])[0] in ("0", "false", "no", "off"):
            try:
                data = base64.b64decode(content, validate=True)
            except ValueError:
                raise _ApiError(500, "Agent error: Guest agent command failed, error was "
                                     "'Base64 data is invalid'") from None
        else:
            data = content.encode("utf-8")
        self.file_write(vm, params["file"][0], data)
        return None


def _handler(api: PveApiDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _answer(self, status: int, reason: str, body: dict[str, Any]) -> None:
            raw = json.dumps(body, ensure_ascii=False).encode("utf-8")
            # the reason phrase goes out as the UTF-8 bytes PVE's Perl server writes (http.server wants latin-1 text)
            self.send_response(status, reason.replace("\r", " ").replace("\n", " ").encode("utf-8").decode("latin-1"))
            self.send_header("Content-Type", "application/json;charset=UTF-8")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _do(self, method: str) -> None:
            url = urllib.parse.urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            if length > POST_LIMIT:
                self._answer(413, "Request Entity Too Large", {"data": None})
                self.close_connection = True
                return
            body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
            params = urllib.parse.parse_qs(url.query if method == "GET" else body, keep_blank_values=True)
            try:
                data = api.handle(method, url.path, params, self.headers.get("Authorization", ""))
            except _ApiError as e:
                out: dict[str, Any] = {"data": None}
                if e.errors:
                    out["errors"] = e.errors
                self._answer(e.status, e.message, out)
                return
            self._answer(200, "OK", {"data": data})

        def do_GET(self) -> None:
            self._do("GET")

        def do_POST(self) -> None:
            self._do("POST")

    return Handler


# ------------------------------------------------------------------------------------------- pvesh


def make_pvesh(api: PveApiDouble, directory: Path) -> str:
    """An executable `pvesh` that sends its call to `api` (as root's pvesh would handle it locally)."""
    directory.mkdir(parents=True, exist_ok=True)
    exe = directory / "pvesh"
    cfg = directory / "pvesh.json"
    cfg.write_text(json.dumps({"url": api.url, "auth": f"PVEAPIToken={api.token_id}={api.secret}",
                               "ca": str(api.ca_file), "log": str(directory / "pvesh-calls.jsonl")}))
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} -I {Path(__file__).resolve()} pvesh {cfg} \"$@\"\n")
    exe.chmod(0o755)
    return str(exe)


def _pvesh(cfg_path: str, argv: list[str]) -> int:
    """`pvesh get|create PATH [-key value]... [--output-format json]` as pvesh does it: JSON on stdout,
    errors on stderr, exit 255 on an error."""
    import urllib.request

    cfg = json.loads(Path(cfg_path).read_text())
    with open(cfg["log"], "a") as log:
        log.write(json.dumps({"argv": argv, "env": dict(os.environ)}) + "\n")
    if len(argv) < 2 or argv[0] not in ("get", "create", "set", "delete"):
        print("ERROR: unknown command 'pvesh " + " ".join(argv[:1]) + "'", file=sys.stderr)
        return 255
    verb, path, rest = argv[0], argv[1], argv[2:]
    fields: list[tuple[str, str]] = []
    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok == "--output-format":
            i += 2
            continue
        if not tok.startswith("-") or i + 1 >= len(rest):
            print(f"400 unable to parse option\n{tok}: unexpected argument", file=sys.stderr)
            return 255
        fields.append((tok.lstrip("-"), rest[i + 1]))  # Getopt::Long: a mandatory value may start with '-'
        i += 2
    query = urllib.parse.urlencode(fields)
    method = {"get": "GET", "create": "POST", "set": "PUT", "delete": "DELETE"}[verb]
    url = cfg["url"] + "/api2/json" + path + (f"?{query}" if method == "GET" and query else "")
    req = urllib.request.Request(url, data=query.encode() if method != "GET" else None, method=method,
                                 headers={"Authorization": cfg["auth"]})
    ctx = ssl.create_default_context(cafile=cfg["ca"])
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=60) as resp:
            data = json.loads(resp.read().decode("utf-8"))["data"]
    except urllib.error.HTTPError as e:
        body = json.loads(e.read().decode("utf-8") or "{}")
        if e.code < 500:
            lines = [f"{e.code} {e.reason}"] + [f"{k}: {v}" for k, v in (body.get("errors") or {}).items()]
            print("\n".join(lines), file=sys.stderr)
        else:
            print(e.reason, file=sys.stderr)
        return 255
    if data is not None:
        sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "pvesh":
        sys.exit(_pvesh(sys.argv[2], sys.argv[3:]))
    print("usage: pve_api.py pvesh CONFIG ARGS...", file=sys.stderr)
    sys.exit(2)
