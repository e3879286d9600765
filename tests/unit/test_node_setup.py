"""`vzdump-hook setup`: makes what a node needs where it is missing, changes nothing that exists, and
tells how to name the hook in vzdump.conf (warning about another hook script there)."""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner, Result

from vzdump_hook import config as configuration
from vzdump_hook.admin import setup as node_setup
from vzdump_hook.admin.cli import cli
from vzdump_hook.admin.enable import default_launcher

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A node whose /etc/vzdump-hook is tmp_path/etc/vzdump-hook (the SSH defaults point there too)."""
    etc = tmp_path / "etc" / "vzdump-hook"
    monkeypatch.setattr(node_setup, "SshConfig", SimpleNamespace(identity_file=str(etc / "id_ed25519"),
                                                                 known_hosts=str(etc / "known_hosts")))
    monkeypatch.delenv(configuration.CONFIG_ENV, raising=False)
    return etc


def setup(etc: Path, vzdump_conf: str | None = None) -> Result:
    conf = etc.parent / "vzdump.conf"
    if vzdump_conf is not None:
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(vzdump_conf)
    return CliRunner().invoke(cli, ["setup", "--config", str(etc / "config.toml"), "--vzdump-conf", str(conf)])


def test_a_fresh_node_gets_a_config_that_handles_no_guest_a_key_and_known_hosts(node: Path) -> None:
    r = setup(node)
    assert r.exit_code == 0, r.output
    assert oct(node.stat().st_mode & 0o777) == "0o700"
    cfg = node / "config.toml"
    assert oct(cfg.stat().st_mode & 0o777) == "0o600"
    assert cfg.read_bytes() == (REPO / "examples" / "node" / "config.toml").read_bytes()
    loaded = configuration.load(str(cfg))
    assert not loaded.guests and not tomllib.loads(cfg.read_text()).get("guests")
    key = node / "id_ed25519"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    fp = subprocess.run(["ssh-keygen", "-lf", str(key) + ".pub"], capture_output=True, text=True, check=True).stdout
    assert "(ED25519)" in fp and "vzdump-hook@" in fp
    kh = node / "known_hosts"
    assert kh.read_text() == "" and oct(kh.stat().st_mode & 0o777) == "0o600"
    # not the Debian package: the launcher of scripts/install.sh
    assert "    script: /usr/local/bin/vzdump-hook\n" in r.output
    assert "vzdump-hook enable" in r.output and "WARNING" not in r.output


def test_a_second_run_changes_nothing(node: Path) -> None:
    assert setup(node).exit_code == 0
    (node / "config.toml").write_text("[defaults]\nstop_timeout = 20\n")  # the admin's edits
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in node.iterdir()}
    r = setup(node)
    assert r.exit_code == 0, r.output
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in node.iterdir()} == before
    assert r.output.count("(not changed)") == 3


def test_another_hook_script_in_vzdump_conf_is_warned_about_and_left_alone(node: Path) -> None:
    text = "bwlimit: 1000\nscript: /root/offsite.sh\n"
    r = setup(node, text)
    assert r.exit_code == 0, r.output
    assert "WARNING:" in r.output and "/root/offsite.sh" in r.output and "vzdump-hook enable" in r.output
    assert (node.parent / "vzdump.conf").read_text() == text


def test_an_enabled_node_is_told_so(node: Path) -> None:
    r = setup(node, "script: /usr/local/bin/vzdump-hook\n")
    assert r.exit_code == 0 and "enabled (script: /usr/local/bin/vzdump-hook)" in r.output, r.output
    assert "add" not in r.output.split("enabled")[0]


def test_the_key_named_in_defaults_is_the_one_made(node: Path, tmp_path: Path) -> None:
    node.mkdir(parents=True, mode=0o700)
    (node / "config.toml").write_text(f'[defaults]\nssh = {{ identity_file = "{tmp_path}/k", '
                                      f'known_hosts = "{tmp_path}/kh" }}\n')
    assert setup(node).exit_code == 0
    assert (tmp_path / "k").exists() and (tmp_path / "kh").exists() and not (node / "id_ed25519").exists()


def test_an_open_config_directory_is_warned_about(node: Path) -> None:
    node.mkdir(parents=True, mode=0o755)
    os.chmod(node, 0o755)
    r = setup(node)
    assert "WARNING:" in r.output and "chmod 0700" in r.output


def test_the_debian_package_names_its_own_launcher() -> None:
    assert default_launcher("/usr/lib/python3/dist-packages/vzdump_hook/enable.py") == "/usr/bin/vzdump-hook"
    assert (default_launcher("/opt/vzdump-hook/lib/python3.11/site-packages/vzdump_hook/enable.py")
            == "/usr/local/bin/vzdump-hook")
