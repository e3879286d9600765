"""`vzdump-hook enable`: vzdump.conf names the hook; an existing script moves into [hook] chain."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from vzdump_hook import config as configuration
from vzdump_hook.admin.cli import cli
from vzdump_hook.admin.enable import plan, with_chain
from vzdump_hook.errors import HookError

OURS = "/usr/local/bin/vzdump-hook"
CONF = "# vzdump default settings\n\n#tmpdir: DIR\nscript: /root/offsite.sh\nbwlimit: 1000\n"


def test_plan_replaces_the_other_script_and_keeps_it_visible() -> None:
    p = plan(CONF)
    assert p.moved == ("/root/offsite.sh",) and not p.already
    assert p.vzdump_conf == (
        "# vzdump default settings\n\n#tmpdir: DIR\n"
        f"script: {OURS}\n# script: /root/offsite.sh   # moved to [hook] chain by vzdump-hook enable\nbwlimit: 1000\n"
    )
    assert [line for line in p.vzdump_conf.splitlines() if line.startswith("script:")] == [f"script: {OURS}"]


def test_plan_appends_when_there_is_no_script_and_is_idempotent() -> None:
    p = plan("bwlimit: 1000")
    assert p.vzdump_conf == f"bwlimit: 1000\nscript: {OURS}\n" and p.moved == ()
    again = plan(p.vzdump_conf)
    assert again.already and again.vzdump_conf == p.vzdump_conf


def test_plan_two_script_lines_one_of_them_ours() -> None:
    p = plan(f"script: {OURS}\nscript: /root/a.sh\n")
    assert p.moved == ("/root/a.sh",)
    assert [line for line in p.vzdump_conf.splitlines() if line.startswith("script:")] == [f"script: {OURS}"]


@pytest.mark.parametrize("text", ["", "[defaults]\nstop_timeout = 10\n",
                                  "[hook] # node settings\nphase_timeout = 60\n\n"
                                  "[guests.101]\nssh = { host = \"h\" }\n"])
def test_with_chain_gives_a_valid_config_with_the_chain(text: str) -> None:
    new = with_chain(text, ("/root/offsite.sh",), "c.toml")
    cfg = configuration.parse(tomllib.loads(new))
    assert cfg.hook.chain == ("/root/offsite.sh",)
    assert tomllib.loads(new) | {"hook": {}} == tomllib.loads(text) | {"hook": {}}  # nothing else changed


def test_with_chain_refuses_to_edit_an_existing_chain_or_broken_toml() -> None:
    with pytest.raises(HookError, match="add /root/b.sh to it yourself"):
        with_chain('[hook]\nchain = ["/root/a.sh"]\n', ("/root/b.sh",), "c.toml")
    assert (with_chain('[hook]\nchain = ["/root/a.sh"]\n', ("/root/a.sh",), "c.toml")
            == '[hook]\nchain = ["/root/a.sh"]\n')
    with pytest.raises(HookError, match="not valid TOML"):
        with_chain("[hook\n", ("/root/a.sh",), "c.toml")


def test_enable_command_moves_the_script_after_confirmation(tmp_path: Path) -> None:
    vz, cfg = tmp_path / "vzdump.conf", tmp_path / "config.toml"
    vz.write_text(CONF)
    cfg.write_text("[defaults]\n")
    args = ["enable", "--vzdump-conf", str(vz), "--config", str(cfg)]
    r = CliRunner().invoke(cli, args, input="n\n")
    assert r.exit_code == 1 and vz.read_text() == CONF and cfg.read_text() == "[defaults]\n"
    # no answer to read (cron, a script): it says how to run it unattended, and changes nothing
    r = CliRunner().invoke(cli, args, input="")
    assert r.exit_code == 1 and "--yes (-y) to go ahead unattended" in r.output and "Aborted!" not in r.output
    assert vz.read_text() == CONF
    r = CliRunner().invoke(cli, args, input="y\n")
    assert r.exit_code == 0, r.output
    assert configuration.load(str(cfg)).hook.chain == ("/root/offsite.sh",)
    assert f"script: {OURS}\n" in vz.read_text()
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0 and "already enabled" in r.output
