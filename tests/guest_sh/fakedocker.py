"""A stand-in `docker` / `docker-compose` for the guest-side sh programs: records every call and keeps
compose projects (labels, containers, running or not) in a JSON state file.

Installed by :class:`FakeDocker` as ``BIN/docker`` and ``BIN/docker-compose`` (a copy of this file with
this interpreter's absolute path as its shebang, so it runs with a PATH that has no python3). The state
and the call log are named by the environment variables ``FAKE_DOCKER_STATE`` / ``FAKE_DOCKER_LOG``,
which the tests set next to PATH.

Understood (everything else exits 125 with "fake docker: unsupported"):
    docker version | info                                   exit 1 when the engine is "down"
    docker compose version
    docker compose|docker-compose [-p NAME] [-f FILE]... stop [-t N] | start [SERVICE...]
    docker ps [-a] [-q] [--no-trunc] [--filter label=K[=V]] [--filter status=running] [--format FMT]
    docker [container] inspect --format FMT [--] REF...    a REF is resolved as docker resolves it: the
                                                            container of that full id, else the one of
                                                            that name, else the one whose id starts so
    docker stop [-t N] ID... | docker start ID...
    docker container ls|inspect|stop|start ...              as ps, inspect, stop, start
Installed as ``podman`` too (the same engine: the container kind's commands are the same words). A
container's name is PROJECT-SERVICE-1, as compose v2 names it, unless the test gives it another
(``add_project(names=...)``: a name may look like an id, as with the real engines).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LABEL_PROJECT = "com.docker.compose.project"
_TOKEN = re.compile(r"\{\{\s*(\.[A-Za-z.]+)\s*(?:\"([^\"]*)\")?\s*\}\}")


# ------------------------------------------------------------------------------------ the program


@contextmanager
def _state() -> Iterator[dict[str, Any]]:
    path = os.environ["FAKE_DOCKER_STATE"]
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(path) as f:
            state: dict[str, Any] = json.load(f)
        yield state
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, path)


def _record(argv: list[str]) -> None:
    with open(os.environ["FAKE_DOCKER_LOG"], "a") as f:
        f.write(json.dumps({"argv": argv, "cwd": os.getcwd()}) + "\n")


def _containers(state: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], str, dict[str, Any]]]:
    for name, p in state["projects"].items():
        for cid, c in p["containers"].items():
            yield name, p, cid, c


def _labels(name: str, p: dict[str, Any], c: dict[str, Any]) -> dict[str, str]:
    return {
        LABEL_PROJECT: name,
        "com.docker.compose.project.working_dir": p["workdir"],
        "com.docker.compose.project.config_files": ",".join(p["files"]),
        "com.docker.compose.service": c["service"],
    }


def _render(fmt: str, fields: dict[str, str], labels: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        field, arg = m.group(1), m.group(2)
        if field == ".Label" and arg is not None:
            return labels.get(arg, "")
        if field in fields and arg is None:
            return fields[field]
        raise SystemExit(f"fake docker: template field {m.group(0)} unsupported")

    return _TOKEN.sub(sub, fmt).replace("\\t", "\t")


def _name(project: str, c: dict[str, Any]) -> str:
    return str(c.get("name") or f"{project}-{c['service']}-1")


def _find(state: dict[str, Any], ref: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The container `ref` names, in docker's order (daemon/container.go GetContainer): the full id, then
    the name, then an id prefix."""
    every = list(_containers(state))
    for found in ([x for x in every if x[2] == ref], [x for x in every if _name(x[0], x[3]) == ref],
                  [x for x in every if ref and x[2].startswith(ref)]):
        if found:
            return found[0][1], found[0][3]
    return None


def _ps(state: dict[str, Any], args: list[str]) -> int:
    all_ = quiet = False
    filters: list[str] = []
    fmt = "{{.ID}}"
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-a":
            all_ = True
        elif a == "-q":
            quiet = True
        elif a == "--no-trunc":
            pass
        elif a in ("--filter", "--format") and i + 1 < len(args):
            if a == "--filter":
                filters.append(args[i + 1])
            else:
                fmt = args[i + 1]
            i += 1
        else:
            print(f"fake docker: ps: unsupported {a}", file=sys.stderr)
            return 125
        i += 1
    out = []
    for name, p, cid, c in _containers(state):
        labels = _labels(name, p, c)
        running = c["running"] and not c.get("restarting", False)
        ok = all_ or c["running"]
        for flt in filters:
            key, _, value = flt.partition("=")
            if key == "label":
                k, eq, v = value.partition("=")
                ok = ok and k in labels and (not eq or labels[k] == v)
            elif key == "status" and value == "running":
                ok = ok and running
            else:
                print(f"fake docker: ps: unsupported filter {flt}", file=sys.stderr)
                return 125
        if ok:
            out.append(cid if quiet else _render(fmt, {".ID": cid, ".Names": _name(name, c)}, labels))
    sys.stdout.write("".join(line + "\n" for line in out))
    return 0


def _inspect(state: dict[str, Any], args: list[str]) -> int:
    if len(args) < 3 or args[0] != "--format":
        return 125
    fmt, status = args[1], 0
    refs = args[3:] if args[2:3] == ["--"] else args[2:]
    for ref in refs:
        found = _find(state, ref)
        if found is None:
            print(f"Error: No such object: {ref}", file=sys.stderr)
            status = 1
            continue
        p, c = found
        cid = next(k for k, v in p["containers"].items() if v is c)
        fields = {
            ".Id": cid,
            ".State.Running": "true" if c["running"] else "false",
            ".State.Restarting": "true" if c.get("restarting") else "false",
            ".State.ExitCode": str(c.get("exit", 0)),
            ".State.OOMKilled": "false",
        }
        # the healthcheck's status as `{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}` renders it
        fmt_here = fmt.replace("{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}",
                               c.get("health", "none"))
        print(_render(fmt_here, fields, {}))
    return status


def _start_stop(state: dict[str, Any], verb: str, refs: list[str]) -> int:
    status = 0
    for ref in refs:
        found = _find(state, ref)
        if found is None:
            print(f"Error response from daemon: No such container: {ref}", file=sys.stderr)
            status = 1
            continue
        p, c = found
        if verb == "start" and p.get("start_fails"):
            print(f"Error response from daemon: failed to start container {ref[:12]}", file=sys.stderr)
            status = 1
            continue
        c["running"] = verb == "start"
        c["restarting"] = verb == "start" and bool(p.get("restart_loop"))
        print(ref)
    return status


def _compose(state: dict[str, Any], args: list[str]) -> int:
    name = None
    files: list[str] = []
    while args and args[0] in ("-p", "-f") and len(args) >= 2:
        if args[0] == "-p":
            name = args[1]
        else:
            files.append(args[1])
        args = args[2:]
    if args == ["version"]:
        return 0 if state.get("compose_v2", True) else 1
    p = state["projects"].get(name or os.path.basename(os.getcwd()))
    if p is not None and (p.get("compose_broken") or (files and files != p["files"])):
        print(f"open {files[0] if files else p['workdir']}: no such file or directory", file=sys.stderr)
        return 1
    if not args or args[0] not in ("stop", "start"):
        print(f"fake docker: compose: unsupported {args}", file=sys.stderr)
        return 125
    if p is None or not p["containers"]:
        print("no containers to start" if args[0] == "start" else "", file=sys.stderr)
        return 1 if args[0] == "start" else 0
    if args[0] == "stop":
        for c in p["containers"].values():
            c["running"] = False
        return 0
    if p.get("start_fails"):
        print("Error response from daemon: port is already allocated", file=sys.stderr)
        return 1
    if p.get("on_start_write"):  # something else changes a file while compose starts (a new backup's marker)
        path, text = p["on_start_write"]
        Path(path).write_text(text)
    services = set(args[1:])
    for c in p["containers"].values():
        if not services or c["service"] in services:
            c["running"] = True
            c["restarting"] = bool(p.get("restart_loop"))
    return 0


def main(argv: list[str]) -> int:
    prog = os.path.basename(argv[0])
    args = argv[1:]
    _record([prog, *args])
    with _state() as state:
        if state.get("engine_down"):
            print("Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?",
                  file=sys.stderr)
            return 1
        if prog == "docker-compose":
            return _compose(state, args) if state.get("compose_v1", True) else 127
        if not args:
            return 125
        verb, rest = args[0], args[1:]
        if verb == "container" and rest and rest[0] in ("ls", "inspect", "stop", "start"):
            verb, rest = {"ls": "ps"}.get(rest[0], rest[0]), rest[1:]
        if verb in ("version", "info"):
            return 0
        if verb == "compose":
            return _compose(state, rest)
        if verb == "ps":
            return _ps(state, rest)
        if verb == "inspect":
            return _inspect(state, rest)
        if verb == "stop":
            if rest[:1] == ["-t"]:
                rest = rest[2:]
            return _start_stop(state, "stop", rest)
        if verb == "start":
            return _start_stop(state, "start", rest)
    print(f"fake docker: unsupported: {args}", file=sys.stderr)
    return 125


# ------------------------------------------------------------------------------------ for tests


def cid(project: str, n: int) -> str:
    """A deterministic 64-hex container id."""
    import hashlib

    return hashlib.sha256(f"{project}/{n}".encode()).hexdigest()


@dataclass
class FakeDocker:
    """The stand-in installed in `bin_dir`, its state and its call log under `root`."""

    root: Path
    bin_dir: Path

    @classmethod
    def install(cls, root: Path, bin_dir: Path) -> FakeDocker:
        bin_dir.mkdir(parents=True, exist_ok=True)
        body = Path(__file__).read_text()
        for name in ("docker", "docker-compose", "podman"):
            exe = bin_dir / name
            exe.write_text(f"#!{sys.executable}\n{body}")
            exe.chmod(0o755)
        fd = cls(root, bin_dir)
        fd.save({"projects": {}})
        fd.log.write_text("")
        return fd

    @property
    def state_file(self) -> Path:
        return self.root / "docker-state.json"

    @property
    def log(self) -> Path:
        return self.root / "docker-calls.jsonl"

    @property
    def env(self) -> dict[str, str]:
        return {"FAKE_DOCKER_STATE": str(self.state_file), "FAKE_DOCKER_LOG": str(self.log)}

    def load(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.state_file.read_text())
        return data

    def save(self, state: dict[str, Any]) -> None:
        self.state_file.write_text(json.dumps(state))

    def set(self, **knobs: Any) -> None:
        state = self.load()
        state.update(knobs)
        self.save(state)

    def add_project(self, name: str, services: tuple[str, ...] = ("app",), *, workdir: str | None = None,
                    files: list[str] | None = None, running: bool = True, names: tuple[str, ...] = (),
                    **knobs: Any) -> list[str]:
        """A compose project with one container per service (named PROJECT-SERVICE-1, or as `names`
        says); returns the container ids."""
        state = self.load()
        workdir = workdir or f"/srv/{name}"
        ids = [cid(name, i) for i in range(len(services))]
        containers = {i: {"service": s, "running": running, "restarting": False, "exit": 0}
                      for i, s in zip(ids, services, strict=True)}
        for i, n in zip(ids, names, strict=False):
            containers[i]["name"] = n
        state["projects"][name] = {
            "workdir": workdir,
            "files": files if files is not None else [f"{workdir}/compose.yaml"],
            "containers": containers,
            **knobs,
        }
        self.save(state)
        return ids

    def set_running(self, name: str, running: bool) -> None:
        state = self.load()
        for c in state["projects"][name]["containers"].values():
            c["running"] = running
        self.save(state)

    def running(self) -> dict[str, bool]:
        """project -> every container runs (and does not restart)."""
        return {n: all(c["running"] and not c.get("restarting") for c in p["containers"].values())
                for n, p in self.load()["projects"].items()}

    def calls(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def argvs(self) -> list[list[str]]:
        return [c["argv"] for c in self.calls()]


if __name__ == "__main__":
    sys.exit(main(sys.argv))
