"""The Debian package, as an admin meets it: built from this checkout with Debian's tooling
(scripts/build-deb.sh), checked by the lintian of Debian 12 (this host's) and of Debian 13 (in a Debian 13
root with lintian), installed with `apt install ./vzdump-hook_*.deb` into a
clean Debian root made here with mmdebstrap from Debian's packages (Debian 12 and 13), then used there
against the test guest: --help, setup, trust, check, guest install, a backup job played by the vzdump
stand-in through the packaged launcher with vzdump's emptied environment, an upgrade to a build with a
higher version (the config, key and known_hosts untouched), and purge (everything the package made is
gone, nothing in the guest changed).

The root shares this host's network namespace (chroot changes the file system only), so its
vzdump-hook reaches the test guest's sshd on the guest's veth address as a PVE node reaches a guest.
Each command in the root runs in a mount namespace of its own with /proc and /dev mounted, which
vanishes with it. The roots are cached in /var/cache/vzdh-test/deb-roots/, keyed by their recipe: a
tarball with the dependencies' .debs downloaded, not installed, so that installing the package also
shows that its Depends pull in what it needs. Debian 13's lintian runs in a root of its own (cached the same
way, lintian installed), so that lintian's dependencies cannot stand in for the package's in those roots.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.infra import compose
from tests.infra.cache import CACHE_ROOT, cached
from tests.infra.guest import TestGuest
from tests.infra.vzdump import GuestSpec, GuestType, JobStatus, Mode, run_job

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
MIRROR = os.environ.get("VZDUMP_HOOK_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CACHE = CACHE_ROOT / "deb-roots"
SUITES = {"bookworm": "Debian 12 (PVE 8)", "trixie": "Debian 13 (PVE 9)"}
# what the package's Depends name, downloaded into the root's apt cache (not installed)
DEPS = ("python3", "python3-click", "python3-paramiko", "python3-requests", "openssh-client")
RECIPE_VERSION = 1  # bump when the recipe below changes in a way its text does not show
VMID = 101
NODE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C.UTF-8",
            "DEBIAN_FRONTEND": "noninteractive"}
# enter ROOT ($0): a private mount namespace with /proc and /dev, then chroot; every path absolute (vzdump empties PATH)
ENTER = '/bin/mount -t proc proc "$0/proc" && /bin/mount --rbind /dev "$0/dev" && exec /usr/sbin/chroot "$0" "$@"'


def missing_tools() -> str | None:
    if os.geteuid() != 0:
        return "needs root (chroot, mount namespaces)"
    for tool in ("mmdebstrap", "dpkg-buildpackage", "lintian", "unshare", "dh_python3"):
        if shutil.which(tool, path=NODE_ENV["PATH"]) is None:
            return f"{tool} is not installed (scripts/setup-test-host.sh installs it)"
    return None


def recipe(suite: str) -> list[str]:
    """The mmdebstrap command line that makes the root (without its output path)."""
    return [
        "mmdebstrap", "--variant=minbase", "--skip=cleanup/apt/lists", "--skip=cleanup/apt/cache",
        "--customize-hook=chroot \"$1\" apt-get install --download-only -y -q " + " ".join(DEPS),
        suite, "-", MIRROR,
    ]


def lintian_recipe(suite: str) -> list[str]:
    """The mmdebstrap command line that makes a root with `suite`'s lintian installed (without its output path)."""
    return ["mmdebstrap", "--variant=minbase", "--include=lintian", suite, "-", MIRROR]


LINTIAN = ("lintian", "--pedantic", "-I", "-E", "--fail-on", "error,warning")
# Where Debian 13 has /bin, /sbin and /lib as symlinks into /usr: a package that ships a file there fails its lintian
# (aliased-location). Debian 12's debhelper puts units in /lib/systemd/system; debian/rules moves them.
ALIASED = ("./bin/", "./sbin/", "./lib/", "./lib32/", "./lib64/", "./libx32/", "./libo32/")


def root_tarball(suite: str, name: str | None = None, argv: list[str] | None = None) -> Path:
    """The cached root `name` (default: `suite`, made by recipe(suite)), made (a minute or two, from Debian's
    mirror) when its recipe `argv` changed."""
    argv = argv or recipe(suite)

    def build(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            r = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE, text=True, env=NODE_ENV, timeout=1200)
        if r.returncode != 0:
            pytest.fail(f"mmdebstrap {suite} from {MIRROR} failed: {r.stderr[-2000:]}")

    return cached(CACHE, name or suite, ".tar", [RECIPE_VERSION, argv], build)


@dataclass
class Root:
    """A Debian root in a directory; run() runs a command in it as root, with the node's environment."""

    path: Path
    suite: str

    def run(self, *argv: str, env: dict[str, str] | None = None, input: str = "",
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
        cmd = ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", ENTER, str(self.path), *argv]
        return subprocess.run(cmd, env=NODE_ENV | (env or {}), input=input, capture_output=True, text=True,
                              timeout=timeout)

    def ok(self, *argv: str, **kw: Any) -> str:
        r = self.run(*argv, **kw)
        assert r.returncode == 0, f"{' '.join(argv)}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r.stdout + r.stderr

    def file(self, path: str) -> Path:
        return self.path / path.lstrip("/")

    def hook_wrapper(self, where: Path) -> str:
        """An executable that vzdump (the stand-in) can run as its hook script: it enters the root and
        execs the packaged /usr/bin/vzdump-hook in the same process, with the environment it was given."""
        script = where / "vzdump-hook-in-root"
        script.write_text(f"#!/bin/sh\nexec /usr/bin/unshare --mount --propagation private /bin/sh -c '{ENTER}' "
                          f"'{self.path}' /usr/bin/vzdump-hook \"$@\"\n")
        script.chmod(0o755)
        return str(script)


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """This checkout as a .deb, and the same with a higher version (for the upgrade)."""
    problem = missing_tools()
    if problem:
        pytest.skip(problem)
    out = tmp_path_factory.mktemp("debs")
    first = subprocess.run([str(REPO / "scripts/build-deb.sh"), str(out)], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    second = subprocess.run([str(REPO / "scripts/build-deb.sh"), str(out), "99.0.0+upgrade"], capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    return Path(first.stdout.strip()), Path(second.stdout.strip())


@pytest.fixture(params=sorted(SUITES))
def root(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
         debs: tuple[Path, Path]) -> Iterator[Root]:
    tar = root_tarball(request.param)
    where = tmp_path_factory.mktemp(f"root-{request.param}")
    subprocess.run(["tar", "-C", str(where), "-xf", str(tar)], check=True)  # as root: owners, modes, device nodes
    for deb in debs:
        shutil.copy(deb, where / "tmp")
    yield Root(where, request.param)
    shutil.rmtree(where, ignore_errors=True)


def assert_lintian_clean(r: subprocess.CompletedProcess[str], explained_info: tuple[str, ...] = ()) -> None:
    """In: a run of LINTIAN, and the info tags that the package may show. Fails on any error or warning that the
    package's overrides do not answer (overridden tags are not printed; alien-tag, an override of a tag that this
    lintian does not know, is an error), and on any other info tag."""
    tags = [line for line in r.stdout.splitlines() if re.match(r"^[EWIPX]: ", line)]
    assert r.returncode == 0 and not [t for t in tags if t.startswith(("E:", "W:"))], r.stdout + r.stderr
    infos = [t for t in tags if t.startswith("I:") and t.split()[2] not in explained_info]
    assert not infos, r.stdout


def test_lintian_finds_no_error_and_every_warning_has_a_reason(debs: tuple[Path, Path]) -> None:
    """Debian 12's lintian (this host's). Its one info tag is the one that no override in a package for Debian 12
    and 13 can answer: see debian/vzdump-hook.lintian-overrides."""
    r = subprocess.run([*LINTIAN, str(debs[0])], capture_output=True, text=True, env=NODE_ENV, timeout=600)
    assert_lintian_clean(r, explained_info=("package-supports-alternative-init-but-no-init.d-script",))
    # every override says why, in the comment above it
    paragraphs = (REPO / "debian/vzdump-hook.lintian-overrides").read_text().split("\n\n")
    for p in paragraphs:
        rules = [line for line in p.splitlines() if line.strip() and not line.startswith("#")]
        assert not rules or p.lstrip().startswith("#"), f"an override without its reason: {rules}"


def test_debian_13_lintian_finds_no_error_and_every_warning_has_a_reason(
        debs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> None:
    """Debian 13's lintian, in a root of its own, on the same .deb: nothing under /lib, /bin, /sbin
    (aliased-location), no override of a tag that it no longer knows (alien-tag)."""
    names = subprocess.run(["dpkg-deb", "--contents", str(debs[0])], capture_output=True, text=True, check=True,
                           env=NODE_ENV).stdout
    shipped = [line.split()[5] for line in names.splitlines()]
    assert "./usr/lib/systemd/system/vzdump-hook-boot-recover.service" in shipped, names
    assert not [f for f in shipped if f.startswith(ALIASED)], names
    tar = root_tarball("trixie", "trixie-lintian", lintian_recipe("trixie"))
    where = tmp_path_factory.mktemp("root-trixie-lintian")
    try:
        subprocess.run(["tar", "-C", str(where), "-xf", str(tar)], check=True)
        shutil.copy(debs[0], where / "tmp")
        root = Root(where, "trixie")
        assert root.file("/etc/os-release").read_text().count("VERSION_CODENAME=trixie") == 1
        r = root.run(*LINTIAN, f"/tmp/{debs[0].name}")
        assert r.returncode != 127, r.stderr
        assert_lintian_clean(r)
    finally:
        shutil.rmtree(where, ignore_errors=True)


AGENT_RUN = """
import sys
from vzdump_hook.transports.tables import AgentConfig
from vzdump_hook.transports.agent import AgentTransport
port, token_id = int(sys.argv[1]), sys.argv[2]
for cfg in (AgentConfig(pvesh="/opt/vzdh/pvesh", node="testnode"),
            AgentConfig(api="https", host="127.0.0.1", port=port, token_id=token_id, token_file="/opt/vzdh/token", verify="/opt/vzdh/ca.pem", node="testnode")):
    r = AgentTransport(101, cfg).run(["sh", "-c", 'echo "agent says $0"', "hi"], timeout=30)
    print(cfg.api, r.exit_status, r.stdout.strip())
assert not [m for m in sys.modules if m.startswith("proxmoxer")]
"""  # noqa: E501


def run_agent_transport(root: Root, tmp_path: Path) -> list[str]:
    """The packaged agent transport in the root against the PVE API double on this host's loopback: through
    a `pvesh` stand-in in the root (/usr/bin/python3 and the double's pvesh client), and over HTTPS."""
    from tests.infra import pve_api

    api = pve_api.PveApiDouble(tmp_path / "api")
    try:
        api.add_vm(VMID)  # its commands run as processes of this host
        d = root.file("/opt/vzdh")
        d.mkdir(parents=True)
        shutil.copy(pve_api.__file__, d / "pve_api.py")
        shutil.copy(api.ca_file, d / "ca.pem")
        (d / "pvesh.json").write_text(json.dumps({"url": api.url, "auth": f"PVEAPIToken={api.token_id}={api.secret}",
                                                  "ca": "/opt/vzdh/ca.pem", "log": "/opt/vzdh/calls.jsonl"}))
        (d / "pvesh").write_text('#!/bin/sh\nexec /usr/bin/python3 -I /opt/vzdh/pve_api.py pvesh '
                                 '/opt/vzdh/pvesh.json "$@"\n')
        (d / "pvesh").chmod(0o755)
        (d / "token").write_text(api.secret + "\n")
        (d / "token").chmod(0o600)
        out = root.ok("python3", "-c", AGENT_RUN, str(api.port), api.token_id)
        assert len(api.calls("exec")) == 2
        return out.splitlines()
    finally:
        api.close()


def sha(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode & 0o7777


def test_install_use_upgrade_and_purge(root: Root, debs: tuple[Path, Path], test_guest: TestGuest, compose_project: Any,
                                       tmp_path: Path) -> None:
    first, second = (f"/tmp/{d.name}" for d in debs)
    assert root.file("/etc/os-release").read_text().count(f"VERSION_CODENAME={root.suite}") == 1
    assert root.run("python3", "-c", "import paramiko").returncode != 0  # clean: the Depends bring it

    # -- install: apt install ./vzdump-hook_*.deb ---------------------------------------------------------
    root.ok("apt-get", "install", "-y", "-q", "--no-install-recommends", first)
    assert root.run("python3", "-c", "import proxmoxer").returncode != 0  # the agent transport needs none
    launcher = root.file("/usr/bin/vzdump-hook").read_text()
    assert launcher.startswith("#!/bin/sh\n") and "\nPYTHON=/usr/bin/python3\n" in launcher
    etc = root.file("/etc/vzdump-hook")
    assert oct(etc.stat().st_mode & 0o777) == "0o700"
    cfg = etc / "config.toml"
    assert oct(cfg.stat().st_mode & 0o777) == "0o600" and "guests" not in tomllib.loads(cfg.read_text())
    wants = root.file("/etc/systemd/system/multi-user.target.wants/vzdump-hook-boot-recover.service")
    unit = os.readlink(wants)
    assert unit in ("/lib/systemd/system/vzdump-hook-boot-recover.service",
                    "/usr/lib/systemd/system/vzdump-hook-boot-recover.service")
    assert "\nExecStart=/usr/bin/vzdump-hook recover --all\n" in root.file(unit).read_text()
    # shipped in /usr (Debian 13: /lib is a symlink to usr/lib); /lib/... above is the same file
    assert "/usr/lib/systemd/system/vzdump-hook-boot-recover.service" in root.ok("dpkg", "-L", "vzdump-hook").split()
    assert root.file("/usr/share/doc/vzdump-hook/config.example.toml").is_file()
    # the README's links into docs/ lead somewhere in the installed package too
    doc = root.file("/usr/share/doc/vzdump-hook")
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)", (doc / "README.md").read_text()))
    assert "docs/design.md" in linked and all((doc / f).is_file() for f in linked), linked
    assert root.file("/usr/share/man/man8/vzdump-hook.8.gz").is_file()

    out = root.ok("vzdump-hook", "--help")
    assert "setup" in out and "check" in out
    assert root.ok("vzdump-hook", "--version").strip() == "vzdump-hook 0.1.0"
    # a phase as vzdump runs it, emptied environment, through the launcher: a fresh install handles no guest
    r = root.run("/usr/bin/env", "-i", "/usr/bin/vzdump-hook", "job-start")
    assert r.returncode == 0, r.stdout + r.stderr

    # -- setup: key, known_hosts, the vzdump.conf line; another hook script is warned about ---------------
    other = root.file("/root/offsite.sh")
    other.write_text("#!/bin/sh\nexit 0\n")
    other.chmod(0o755)
    root.file("/etc/vzdump.conf").write_text("# vzdump default settings\nscript: /root/offsite.sh\n")
    out = root.ok("vzdump-hook", "setup")
    assert ("\n    script: /usr/bin/vzdump-hook\n" in out
            and "WARNING: /etc/vzdump.conf names another hook script: /root/offsite.sh" in out), out
    assert (etc / "id_ed25519").is_file() and (etc / "known_hosts").read_text() == ""
    out = root.ok("vzdump-hook", "enable", "--yes")
    assert root.file("/etc/vzdump.conf").read_text().count("\nscript: /usr/bin/vzdump-hook\n") == 1, out

    # -- a guest: the node's key into its authorized_keys, trust, check, the guest side from the package ---
    db = compose_project("db", {"app": "sleeper"})
    compose.up(db)
    with open(test_guest.workdir / "authorized_keys", "a") as f:
        f.write((etc / "id_ed25519.pub").read_text())
    with open(cfg, "a") as f:
        f.write(f'\n[guests.{VMID}]\nssh = {{ host = "{test_guest.host}" }}\nstacks = ["{db.name}"]\n'
                f'marker_path = "{test_guest.workdir / "marker.json"}"\n')
    out = root.ok("vzdump-hook", "trust", str(VMID), "--yes")
    assert test_guest.host_key_fingerprint in out and "added to /etc/vzdump-hook/known_hosts" in out
    guest_root = test_guest.workdir / "root"  # the guest side goes below this directory of the guest, not into its /
    install_env = {"VZDUMP_HOOK_GUEST_ROOT": str(guest_root)}
    out = root.ok("vzdump-hook", "guest", "install", str(VMID), "--authorized-keys",
                  str(test_guest.workdir / "authorized_keys"), env=install_env)
    installed = guest_root / "usr/local/sbin/vzdump-hook-recover"
    assert installed.read_bytes() == root.file("/usr/share/vzdump-hook/guest/vzdump-hook-recover").read_bytes(), out
    out = root.ok("vzdump-hook", "check", env=install_env)
    assert f"a backup stops: {db.name}" in out and "guest side: recovery current" in out, out

    # -- a backup job, played by the vzdump stand-in through the packaged launcher ---------------------------
    result = run_job(root.hook_wrapper(tmp_path), [GuestSpec(VMID, GuestType.LXC, Mode.SNAPSHOT)], timeout=180)
    log = result.task_log()
    assert result.status is JobStatus.OK, log
    assert (f"pre-stop {VMID}: stopped {db.name}" in log
            and re.search(rf"(pre|post)-restart {VMID}: started {db.name}", log)), log
    assert compose.running_services(db) == {"app"} and not (test_guest.workdir / "marker.json").exists()
    assert "resumed" in root.ok("vzdump-hook", "history", str(VMID))

    # -- the agent transport with Debian's packages alone (no proxmoxer): pvesh, and HTTPS with a token --------
    agent_out = run_agent_transport(root, tmp_path)
    assert agent_out == ["local 0 agent says hi", "https 0 agent says hi"], agent_out

    # -- upgrade: a build with a higher version over it; what the admin made is not touched -------------------
    kept = {p: sha(etc / p) for p in ("config.toml", "id_ed25519", "id_ed25519.pub", "known_hosts")}
    root.ok("apt-get", "install", "-y", "-q", second)
    assert root.ok("dpkg-query", "-W", "-f", "${Version}", "vzdump-hook") == "99.0.0+upgrade"
    assert {p: sha(etc / p) for p in kept} == kept
    assert os.path.islink(wants)
    out = root.ok("vzdump-hook", "check", env=install_env)
    assert f"a backup stops: {db.name}" in out

    # -- purge: the node's files go; the guest keeps everything, a marker included ----------------------------
    marker = test_guest.workdir / "marker.json"
    marker.write_text('{"left": "by a job"}')
    guest_before = {p: sha(p) for p in [*guest_root.rglob("*"), test_guest.workdir / "authorized_keys", marker]
                    if p.is_file()}
    r = root.run("apt-get", "purge", "-y", "-q", "vzdump-hook")
    assert r.returncode == 0, r.stdout + r.stderr
    # else every job fails: the admin is told
    assert "WARNING: /etc/vzdump.conf names /usr/bin/vzdump-hook" in r.stdout + r.stderr
    for gone in ("/etc/vzdump-hook", "/var/lib/vzdump-hook", "/usr/bin/vzdump-hook", "/usr/share/vzdump-hook",
                 "/usr/lib/python3/dist-packages/vzdump_hook"):
        assert not root.file(gone).exists(), gone
    assert not os.path.lexists(wants)
    assert (root.run("dpkg-query", "-W", "vzdump-hook").returncode != 0
            or "un" in root.ok("dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "vzdump-hook"))
    assert {p: sha(p) for p in guest_before} == guest_before
    assert compose.running_services(db) == {"app"}
