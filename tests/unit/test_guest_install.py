"""vzdump_hook.guest.install: deploying the guest side over a Transport, idempotently, with --dry-run,
and the check of whether it is in place and current.

The transport here runs the commands with a real local `sh` (files under a temporary install root),
and plays sshd's part for authorized_keys: a key whose line has `command=` gets that command, with
the request in SSH_ORIGINAL_COMMAND. The real sshd is in tests/integration/test_restricted_key.py."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from vzdump_hook import config as configuration
from vzdump_hook.errors import ConnectError
from vzdump_hook.guest import install as gi
from vzdump_hook.guest import shipped
from vzdump_hook.guest.install import FILES, Installer, InstallError, Layout, Setup, restricted_keys
from vzdump_hook.guest.node_key import split_options
from vzdump_hook.transports.base import Transport, shell_join

REPO = Path(__file__).resolve().parents[2]
VMID = 101


class LocalSsh(Transport):
    """Commands run by a local sh as sshd would run them for the key `identity_file`."""

    name = "local"

    def __init__(self, home: Path, keys: Path, identity_file: str) -> None:
        super().__init__(f"local ({Path(identity_file).name})")
        self.home, self.keys = home, keys
        self.blob = Path(identity_file + ".pub").read_text().split()[1]
        self.commands: list[str] = []

    def _exec(self, argv: Sequence[str], stdin: bytes | None, timeout: float) -> tuple[int, bytes, bytes]:
        line = shell_join(argv)
        self.commands.append(line)
        forced: str | None = None
        for entry in (self.keys.read_text().splitlines() if self.keys.exists() else []):
            if self.blob in entry.split():
                opts, _ = split_options(entry)
                forced = next((o[len('command="') : -1] for o in opts if o.startswith('command="')), None)
                break
        else:
            raise ConnectError("Permission denied (publickey)", command=line)
        env = {"PATH": os.environ["PATH"], "HOME": str(self.home), "SSH_CONNECTION": "10.0.0.1 50000 10.0.0.2 22"}
        if forced is not None:
            env["SSH_ORIGINAL_COMMAND"] = line
        p = subprocess.run(["sh", "-c", forced if forced is not None else line], input=stdin or b"",
                           capture_output=True, env=env, timeout=timeout)
        return p.returncode, p.stdout, p.stderr


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True)
    return str(path)


class Env:
    def __init__(self, tmp: Path) -> None:
        self.root = tmp / "guest-root"
        self.home = tmp / "home"
        self.home.mkdir()
        self.node_key = keygen(tmp / "node_key")
        self.admin_key = keygen(tmp / "admin_key")
        self.keys = self.home / ".ssh" / "authorized_keys"
        self.keys.parent.mkdir(mode=0o700)
        # the guest as the admin set it up: both keys may run anything, plus an unrelated line
        self.keys.write_text("# keys\n" + Path(self.node_key + ".pub").read_text()
                             + Path(self.admin_key + ".pub").read_text()
                             + "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOther other@host\n")
        self.keys.chmod(0o600)
        self.layout = Layout(str(self.root))
        self.guest = configuration.validate_guest(
            VMID, {"ssh": {"host": "192.0.2.1", "identity_file": self.node_key},
                   "marker_path": str(self.root / "var/lib/vzdump-hook/marker.json")})
        self.out: list[str] = []
        self.opened: list[LocalSsh] = []

    def opener(self, g: configuration.GuestConfig) -> Transport:
        assert g.ssh is not None
        t = LocalSsh(self.home, self.keys, g.ssh.identity_file)
        self.opened.append(t)
        return t

    def installer(self, **kw: Any) -> Installer:
        self.out.clear()
        return Installer(self.guest, self.layout, self.out.append, opener=self.opener, **kw)

    def tree(self) -> dict[str, tuple[bytes, int]]:
        files = {str(p): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in self.root.rglob("*")
                 if p.is_file() and "var/log" not in str(p)}
        files[str(self.keys)] = (self.keys.read_bytes(), stat.S_IMODE(self.keys.stat().st_mode))
        return files

    def text(self) -> str:
        return "\n".join(self.out)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def test_fresh_install_deploys_everything_and_restricts_the_node_key(env: Env) -> None:
    assert env.installer().run()
    text = env.text()
    for f in FILES:
        p = Path(env.layout.path(f.key))
        assert p.is_file() and stat.S_IMODE(p.stat().st_mode) == f.mode, f.key
        if f.source:
            assert p.read_bytes() == (REPO / "examples" / "guest" / f.source).read_bytes()
        assert f"{p}: create (mode {f.mode:04o})" in text
    conf = Path(env.layout.path("conf")).read_text()
    assert f"VMID={VMID}\n" in conf and f"MARKER={env.guest.marker_path}\n" in conf and f"ROOT={env.root}\n" in conf
    lines = env.keys.read_text().splitlines()
    node_blob = Path(env.node_key + ".pub").read_text().split()[1]
    admin_line = Path(env.admin_key + ".pub").read_text().strip()
    assert lines[1].startswith(f'command="{env.layout.wrapper_command}",restrict ssh-ed25519 {node_blob} ')
    assert lines[0] == "# keys" and lines[2] == admin_line and lines[3].endswith("other@host")
    assert stat.S_IMODE(env.keys.stat().st_mode) == 0o600
    assert "checked: a new connection with the node's key runs only vzdump-hook's commands" in text
    # what the node's key can do now: the hook's verbs, nothing else
    t = env.opener(env.guest)
    assert t.run(["true"], timeout=10).ok
    refused = t.run(["id"], timeout=10)
    assert refused.exit_status == 126 and "refused" in refused.stderr
    assert t.read_file(env.guest.marker_path, limit=100, timeout=10) is None


def test_second_install_changes_nothing_even_through_the_restricted_key(env: Env) -> None:
    env.installer().run()
    before = env.tree()
    assert env.installer().run()
    assert "everything current; the key used is restricted to the wrapper: nothing to do" in env.text()
    assert env.tree() == before
    # with an unrestricted key: every file is looked at and left alone
    inst = env.installer(identity_file=env.admin_key)
    assert inst.run()
    assert inst.changed == [] and env.tree() == before
    assert env.text().count(": unchanged") == len(FILES) + 1  # the files and authorized_keys


def test_dry_run_changes_nothing_and_shows_what_would(env: Env) -> None:
    env.root.mkdir()
    before = env.tree()
    inst = env.installer(dry_run=True)
    assert inst.run()
    assert env.tree() == before
    text = env.text()
    assert all(f"{env.layout.path(f.key)}: would create" in text for f in FILES)
    assert "would restrict the node's key (ssh-ed25519)" in text
    assert f'+command="{env.layout.wrapper_command}",restrict ssh-ed25519' in text
    assert len(inst.changed) == len(FILES)


def test_dry_run_shows_the_diff_of_a_changed_file_and_install_updates_only_it(env: Env) -> None:
    env.installer().run()
    recover = Path(env.layout.path("recover"))
    recover.write_text(recover.read_text().replace("CHECK=0 FORCE=0", "CHECK=0 FORCE=1"))
    wrapper = Path(env.layout.path("wrapper"))
    wrapper.chmod(0o700)
    inst = env.installer(dry_run=True, identity_file=env.admin_key)
    inst.run()
    text = env.text()
    assert (f"{recover}: would update" in text and "-CHECK=0 FORCE=1 QUIET=0" in text
            and "+CHECK=0 FORCE=0 QUIET=0" in text)
    assert f"{wrapper}: would set mode 0755 (was 700)" in text
    assert f"{env.layout.path('conf')}: unchanged" in text
    assert "CHECK=0 FORCE=1 QUIET=0" in recover.read_text()
    inst = env.installer(identity_file=env.admin_key)
    inst.run()
    assert inst.changed == [str(recover), str(wrapper)]
    assert "CHECK=0 FORCE=1 QUIET=0" not in recover.read_text() and stat.S_IMODE(wrapper.stat().st_mode) == 0o755


def test_outdated_files_cannot_be_changed_through_the_restricted_key(env: Env) -> None:
    env.installer().run()
    Path(env.layout.path("timer")).write_text("[Timer]\nOnBootSec=1h\n")
    before = env.tree()
    with pytest.raises(InstallError, match="--identity-file"):
        env.installer().run()
    assert env.tree() == before


def test_a_broken_wrapper_never_locks_the_node_out(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = tmp_path / "files"
    files.mkdir()
    for f in FILES:
        if f.source:
            (files / f.source).write_bytes((REPO / "examples" / "guest" / f.source).read_bytes())
    (files / "vzdump-hook-wrapper").write_text("#!/bin/sh\necho broken >&2\nexit 1\n")
    monkeypatch.setenv(gi.GUEST_FILES_ENV, str(files))
    keys_before = env.keys.read_bytes()
    with pytest.raises(InstallError, match="the wrapper does not work in the guest, the key is left unrestricted"):
        env.installer().run()
    assert env.keys.read_bytes() == keys_before
    assert env.opener(env.guest).run(["id"], timeout=10).ok


def test_no_restrict_leaves_authorized_keys_alone(env: Env) -> None:
    before = env.keys.read_bytes()
    inst = env.installer(restrict=False)
    inst.run()
    assert env.keys.read_bytes() == before and len(inst.changed) == len(FILES)


def test_authorized_keys_missing_is_created(env: Env) -> None:
    env.keys.unlink()
    env.keys.parent.rmdir()
    # the node reaches the guest some other way (here: the admin key's transport for everything)
    admin = Path(env.admin_key + ".pub").read_text()

    def opener(g: configuration.GuestConfig) -> Transport:
        assert g.ssh is not None
        if not env.keys.exists():  # before the install writes it, the node connects like the admin does
            t = LocalSsh(env.home, env.home / "admin_keys", env.admin_key)
            (env.home / "admin_keys").write_text(admin)
            return t
        return LocalSsh(env.home, env.keys, g.ssh.identity_file)

    Installer(env.guest, env.layout, env.out.append, opener=opener).run()
    assert stat.S_IMODE(env.keys.parent.stat().st_mode) == 0o700 and stat.S_IMODE(env.keys.stat().st_mode) == 0o600
    assert env.keys.read_text().startswith(f'command="{env.layout.wrapper_command}",restrict ssh-ed25519 ')


# -- what check reports ---------------------------------------------------------------------------------


def test_check_line_for_each_state(env: Env) -> None:
    t = env.opener(env.guest)
    s = gi.inspect(t, env.guest, env.layout, 1e18)
    assert s.restricted is False and s.recovery == "NOT INSTALLED"
    assert s.line(VMID) == ("guest side: recovery NOT INSTALLED; node key NOT restricted (it may run any command): "
                            f"`vzdump-hook guest install {VMID}`")
    env.installer(restrict=False).run()
    s = gi.inspect(env.opener(env.guest), env.guest, env.layout, 1e18)
    assert s.recovery == "current" and s.wrapper == "current" and s.restricted is False
    assert s.line(VMID).startswith("guest side: recovery current; node key NOT restricted")
    env.installer().run()
    s = gi.inspect(env.opener(env.guest), env.guest, env.layout, 1e18)
    assert s.restricted is True and s.complete
    assert s.line(VMID) == "guest side: recovery current; node key restricted to the wrapper (current)"
    with open(env.layout.path("conf"), "a") as f:
        f.write("MARKER=/elsewhere\n")
    s = gi.inspect(env.opener(env.guest), env.guest, env.layout, 1e18)
    assert s.recovery == "OUTDATED (guest.conf)"
    assert s.line(VMID).endswith(f"`vzdump-hook guest install {VMID}` with an unrestricted key (--identity-file)")
    Path(env.layout.path("recover")).unlink()
    s = gi.inspect(env.opener(env.guest), env.guest, env.layout, 1e18)
    assert s.recovery == "OUTDATED (vzdump-hook-recover, guest.conf)"


@pytest.mark.parametrize("restrict", [False, True])
def test_check_reports_an_insecure_marker_directory(env: Env, restrict: bool) -> None:
    env.installer(restrict=restrict).run()
    mdir = Path(env.guest.marker_path).parent
    assert gi.inspect(env.opener(env.guest), env.guest, env.layout, 1e18).marker_dir == "missing"
    mdir.mkdir(parents=True, mode=0o755)
    mdir.chmod(0o755)
    line = gi.describe(env.opener(env.guest), env.guest, 1e18)
    assert f"marker directory INSECURE: {mdir} has mode 755" in line, line
    mdir.chmod(0o700)
    s = gi.inspect(env.opener(env.guest), env.guest, env.layout, 1e18)
    assert s.marker_dir == "ok" and "INSECURE" not in s.line(VMID)


def test_a_changed_marker_path_makes_the_settings_outdated(env: Env) -> None:
    env.installer(restrict=False).run()
    from dataclasses import replace

    moved = replace(env.guest, marker_path="/srv/marker.json")
    s = gi.inspect(env.opener(env.guest), moved, env.layout, 1e18)
    assert s.files["conf"] == "outdated" and s.files["wrapper"] == "current"


def test_describe_never_raises(env: Env) -> None:
    class Dead(Transport):
        def _exec(self, argv: Sequence[str], stdin: bytes | None, timeout: float) -> tuple[int, bytes, bytes]:
            raise ConnectError("connection refused")

    assert gi.describe(Dead("dead"), env.guest, 1e18).startswith("guest side: unknown (connection refused")


def test_setup_line_of_a_transport_without_a_key() -> None:
    s = Setup({k: "current" for k in ("recover", "service", "timer", "conf", "wrapper")}, False, "enabled active")
    assert s.line(7, "pct") == "guest side: recovery current; no SSH key to restrict (transport pct)"
    assert s.line(7, "ssh").endswith("node key NOT restricted (it may run any command): `vzdump-hook guest install 7`")


def test_setup_line_without_systemd_says_so() -> None:
    s = Setup({k: "current" for k in ("recover", "service", "timer", "conf", "wrapper")}, True, "no-systemd")
    assert "no systemd: run it at boot and every minute by other means" in s.line(1)
    s = Setup({k: "current" for k in ("recover", "service", "timer", "conf", "wrapper")}, True, "disabled inactive")
    assert "timer NOT ACTIVE (disabled inactive)" in s.line(1) and not s.complete


# -- authorized_keys editing ----------------------------------------------------------------------------

KEY = "AAAAC3NzaC1lZDI1NTE5AAAAINode"


@pytest.mark.parametrize("before,after", [
    (f"ssh-ed25519 {KEY} root@pve\n", f'command="/w",restrict ssh-ed25519 {KEY} root@pve\n'),
    (f'from="10.0.0.1",no-pty ssh-ed25519 {KEY} c\n', f'command="/w",restrict,from="10.0.0.1" ssh-ed25519 {KEY} c\n'),
    (f'command="/old \\"x\\"",restrict ssh-ed25519 {KEY}\n', f'command="/w",restrict ssh-ed25519 {KEY}\n'),
    ("ssh-rsa AAAAother x\n", f"ssh-rsa AAAAother x\ncommand=\"/w\",restrict ssh-ed25519 {KEY} vzdump-hook\n"),
    ("", f'command="/w",restrict ssh-ed25519 {KEY} vzdump-hook\n'),
    (f"# ssh-ed25519 {KEY} commented out\nssh-ed25519 {KEY} a\nssh-ed25519 {KEY} dup\n",
     f'# ssh-ed25519 {KEY} commented out\ncommand="/w",restrict ssh-ed25519 {KEY} a\n'),
], ids=["plain", "keeps-from", "replaces-command", "appends", "empty-file", "comment-and-duplicate"])
def test_restricted_keys(before: str, after: str) -> None:
    assert restricted_keys(before, "ssh-ed25519", KEY, "/w") == after
    assert restricted_keys(after, "ssh-ed25519", KEY, "/w") == after  # idempotent


def test_the_node_public_key_from_the_private_key_when_there_is_no_pub(tmp_path: Path) -> None:
    key = keygen(tmp_path / "k")
    want = Path(key + ".pub").read_text().split()[:2]
    os.unlink(key + ".pub")
    g = configuration.validate_guest(VMID, {"ssh": {"host": "h", "identity_file": key}})
    assert list(gi.node_public_key(g)) == want
    g = configuration.validate_guest(VMID, {"ssh": {"host": "h", "identity_file": str(tmp_path / "nope")}})
    with pytest.raises(InstallError, match="cannot read the node's public key"):
        gi.node_public_key(g)


def test_guest_files_are_found_next_to_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(gi.GUEST_FILES_ENV, raising=False)
    assert gi.guest_files_dir() == REPO / "examples" / "guest"
    monkeypatch.setenv(gi.GUEST_FILES_ENV, str(tmp_path))  # empty: ignored, the next candidate is used
    assert gi.guest_files_dir() == REPO / "examples" / "guest"


def test_guest_files_of_a_non_editable_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # scripts/install.sh: pip installs from the checkout into a venv; pip's direct_url.json names it
    monkeypatch.delenv(gi.GUEST_FILES_ENV, raising=False)
    monkeypatch.setattr(shipped, "__file__", "/opt/venv/lib/python3.11/site-packages/vzdump_hook/guest_install.py")
    monkeypatch.setattr(shipped, "_installed_from", lambda: str(REPO))
    assert gi.guest_files_dir() == REPO / "examples" / "guest"
    monkeypatch.setattr(shipped, "_installed_from", lambda: "")
    monkeypatch.setattr(shipped, "PACKAGED", "/nonexistent")
    with pytest.raises(InstallError, match=gi.GUEST_FILES_ENV):
        gi.guest_files_dir()


def test_guest_files_of_the_debian_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # the .deb: the package in /usr/lib/python3/dist-packages, the files in /usr/share/vzdump-hook/guest
    # (tests/integration/test_deb.py installs the real package into a Debian root)
    monkeypatch.delenv(gi.GUEST_FILES_ENV, raising=False)
    monkeypatch.setattr(shipped, "__file__", "/usr/lib/python3/dist-packages/vzdump_hook/guest_install.py")
    monkeypatch.setattr(shipped, "_installed_from", lambda: "")
    monkeypatch.setattr(shipped, "PACKAGED", str(tmp_path))
    shutil.copytree(REPO / "examples" / "guest", tmp_path / "guest")
    assert gi.guest_files_dir() == tmp_path / "guest"
    (tmp_path / "guest" / "vzdump-hook-wrapper").unlink()  # incomplete: not used
    with pytest.raises(InstallError):
        gi.guest_files_dir()


def test_layout_from_env() -> None:
    assert (Layout.from_env({}).root == "/"
            and Layout.from_env({}).wrapper_command == "/usr/local/sbin/vzdump-hook-wrapper")
    lay = Layout.from_env({gi.GUEST_ROOT_ENV: "/tmp/g r"})
    assert lay.path("conf") == "/tmp/g r/etc/vzdump-hook/guest.conf"
    assert lay.wrapper_command == ("'/tmp/g r/usr/local/sbin/vzdump-hook-wrapper' "
                                   "--conf '/tmp/g r/etc/vzdump-hook/guest.conf'")
