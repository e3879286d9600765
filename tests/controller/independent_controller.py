#!/usr/bin/env python3
"""A guest controller written from docs/controller-api.md alone, not from the reference controller
(examples/controller/vzdump-controller) and sharing no code with it or with the hook: a second,
independent reading of the contract for the hook's tests to talk to.

Its app is one real process (`sleep`), whose pid it keeps in STATE/app.pid: `quiesce` stops it,
`snapshotted`, `done`, `failed` and `abort` start it again if this controller holds it stopped.
Every message is appended to STATE/messages.jsonl when it arrives (time, carrier, phase, job), before
anything else is done, so a test sees exactly what the hook sent, in order, with timestamps.

A test makes it misbehave at `quiesce` by writing one word to STATE/misbehave: `not-json` (stops the
app, prints something that is not JSON), `exit-mismatch` (stops the app, answers ok but exits 4),
`hang` (stops the app, then answers nothing for an hour), `stop-failed` (stops the app, answers the
error stop_failed with exit 4).

    independent_controller.py --state DIR signal PHASE [--job J --vmid N --mode M --deadline T --answer-within S]
    independent_controller.py --state DIR serve --token-file F --tls-cert C --tls-key K
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hmac
import http.server
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

OPEN_STATES = ("quiesced", "quiesce_failed", "resumed")
CLOSING = {"done": "done", "failed": "failed", "abort": "aborted"}
HTTP_OF = {"bad_request": 400, "not_found": 404, "busy": 409, "job_closed": 409, "out_of_order": 409,
           "stop_failed": 500, "start_failed": 500, "timeout": 504, "internal": 500}
EXIT_OF = {"bad_request": 2, "not_found": 2, "busy": 3, "job_closed": 3, "out_of_order": 3,
           "stop_failed": 4, "start_failed": 4, "timeout": 4, "internal": 5}


class Controller:
    def __init__(self, state: Path) -> None:
        self.dir = state
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock_path = self.dir / "lock"

    # -- files --------------------------------------------------------------------------------------

    def log(self, carrier: str, phase: str, fields: dict[str, Any]) -> None:
        line = json.dumps({"t": time.time(), "carrier": carrier, "phase": phase, "job": fields.get("job"),
                           "vmid": fields.get("vmid")})
        with open(self.dir / "messages.jsonl", "a") as f:
            f.write(line + "\n")

    def load(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.dir / "state.json").read_text()))
        except FileNotFoundError:
            return {"open": None, "closed": []}

    def save(self, st: dict[str, Any]) -> None:
        tmp = self.dir / "state.json.tmp"
        with open(tmp, "w") as f:
            json.dump(st, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / "state.json")

    def misbehaviour(self) -> str:
        try:
            return (self.dir / "misbehave").read_text().strip()
        except FileNotFoundError:
            return ""

    # -- the app --------------------------------------------------------------------------------------

    def app_pid(self) -> int | None:
        try:
            pid = int((self.dir / "app.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        stat = Path(f"/proc/{pid}/stat").read_text()
        return None if stat.rsplit(")", 1)[1].split()[0] == "Z" else pid

    def start_app(self) -> None:
        if self.app_pid() is None:
            proc = subprocess.Popen(["sleep", "1000000"], start_new_session=True, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            (self.dir / "app.pid").write_text(str(proc.pid))

    def stop_app(self) -> None:
        pid = self.app_pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            for _ in range(200):
                if self.app_pid() is None:
                    break
                time.sleep(0.01)

    # -- the contract's table (section 9) -------------------------------------------------------------

    def handle(self, phase: str, fields: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """(the answer, misbehaviour to act out after the lock is released)."""
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            st = self.load()
            if phase == "status":
                return {"api": 1, "ok": True, "phase": "status", "open_job": st["open"],
                        "held": ["app"] if st["open"] and st["open"]["state"] != "resumed" else [],
                        "marker": st["open"] is not None, "closed": st["closed"][-16:]}, ""
            job, vmid = str(fields.get("job", "")), int(fields.get("vmid", 0))
            base = {"api": 1, "phase": phase, "job": job, "vmid": vmid}
            opened = st["open"]
            mine = opened is not None and opened["job"] == job and opened["vmid"] == vmid
            closed = next((c for c in st["closed"] if c["job"] == job and c["vmid"] == vmid), None)
            if phase == "quiesce":
                if closed is not None:
                    return self.error(base, "job_closed", "that job is closed"), ""
                if opened is not None and not mine:
                    return self.error(base, "busy", f"job {opened['job']} is open"), ""
                if mine:
                    if opened["state"] == "quiesced":
                        return {**base, "ok": True, "job_state": "quiesced", "duplicate": True}, ""
                    return self.error(base, "out_of_order", f"job is {opened['state']}"), ""
                st["open"] = {"job": job, "vmid": vmid, "state": "quiescing", "deadline": fields.get("deadline")}
                self.save(st)
                self.stop_app()
                bad = self.misbehaviour()
                st["open"]["state"] = "quiesce_failed" if bad == "stop-failed" else "quiesced"
                self.save(st)
                if bad == "stop-failed":
                    return self.error(base, "stop_failed", "the app would not stop"), ""
                return {**base, "ok": True, "job_state": "quiesced", "duplicate": False, "held": ["app"],
                        "open_job": {"job": job, "vmid": vmid}}, bad
            if phase not in ("snapshotted", *CLOSING):
                return self.error(base, "not_found", f"no phase {phase}"), ""
            if closed is not None:
                return {**base, "ok": True, "job_state": closed["state"], "duplicate": True,
                        "known": closed["known"]}, ""
            if not mine:  # never quiesced here: nothing to start, recorded as closed
                state = "unknown" if phase == "snapshotted" else CLOSING[phase]
                st["closed"].append({"job": job, "vmid": vmid, "state": state, "known": False})
                self.save(st)
                return {**base, "ok": True, "job_state": state, "duplicate": False, "known": False}, ""
            if opened["state"] != "resumed":
                self.start_app()
            if phase == "snapshotted":
                dup = opened["state"] == "resumed"
                opened["state"] = "resumed"
                self.save(st)
                return {**base, "ok": True, "job_state": "resumed", "duplicate": dup, "known": True}, ""
            st["open"] = None
            st["closed"].append({"job": job, "vmid": vmid, "state": CLOSING[phase], "known": True})
            self.save(st)
            return {**base, "ok": True, "job_state": CLOSING[phase], "duplicate": False, "known": True}, ""

    @staticmethod
    def error(base: dict[str, Any], code: str, message: str) -> dict[str, Any]:
        return {**base, "ok": False, "error": {"code": code, "message": message}}


def signal_main(c: Controller, args: argparse.Namespace) -> int:
    fields = {"job": args.job, "vmid": args.vmid, "mode": args.mode, "deadline": args.deadline,
              "answer_within": args.answer_within}
    c.log("command", args.phase, fields)
    answer, bad = c.handle(args.phase, fields)
    if bad == "not-json":
        print("quiesced, I think")
        return 0
    if bad == "hang":
        time.sleep(3600)
    print(json.dumps(answer))
    if bad == "exit-mismatch":
        return 4
    return 0 if answer["ok"] else EXIT_OF[answer["error"]["code"]]


def serve_main(c: Controller, args: argparse.Namespace) -> int:
    token = Path(args.token_file).read_text().strip()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *a: Any) -> None:
            pass

        def reply(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if code == 401:
                self.send_header("WWW-Authenticate", "Bearer")
            self.end_headers()
            self.wfile.write(body)

        def route(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            auth = self.headers.get("Authorization", "")
            phase = self.path.removeprefix("/v1/")
            fields = json.loads(raw) if raw else {}
            c.log("https", phase, fields if isinstance(fields, dict) else {})
            if not auth.startswith("Bearer "):
                return self.reply(401, b'{"api":1,"ok":false,"error":{"code":"unauthorized","message":"no token"}}')
            if not hmac.compare_digest(auth.removeprefix("Bearer ").encode(), token.encode()):
                return self.reply(403, b'{"api":1,"ok":false,"error":{"code":"forbidden","message":"wrong token"}}')
            answer, bad = c.handle(phase, fields)
            if bad == "not-json":
                return self.reply(200, b"quiesced, I think")
            if bad == "hang":
                time.sleep(3600)
            code = 200 if answer["ok"] else HTTP_OF[answer["error"]["code"]]
            self.reply(code, json.dumps(answer).encode())

        do_GET = do_POST = route  # noqa: N815 - http.server's names

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.tls_cert, args.tls_key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(f"listening on https://127.0.0.1:{server.server_address[1]}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state", required=True)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sig = sub.add_parser("signal")
    sig.add_argument("phase")
    for name in ("--job", "--mode", "--deadline", "--answer-within"):
        sig.add_argument(name, default="")
    sig.add_argument("--vmid", type=int, default=0)
    srv = sub.add_parser("serve")
    for name in ("--token-file", "--tls-cert", "--tls-key"):
        srv.add_argument(name, required=True)
    args = ap.parse_args(argv)
    c = Controller(Path(args.state))
    return signal_main(c, args) if args.cmd == "signal" else serve_main(c, args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
