"""config.py: TOML validated into frozen dataclasses; every problem named by its key path, all at once."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from vzdump_hook import config
from vzdump_hook.config import CONFIG_ENV, DEFAULT_CONFIG_PATH, QuiescePolicy
from vzdump_hook.errors import ConfigError
from vzdump_hook.stacks.table import StackSpec, valid_stack_name
from vzdump_hook.transports.tables import AgentConfig, PctConfig, SshConfig

REPO = Path(__file__).resolve().parents[2]

FULL = """
[hook]
state_dir = "/var/lib/vzdump-hook-test"
run_dir = "/run/vzdump-hook-test"
phase_timeout = 900
sweep_timeout = 30
pve_dir = "/etc/pve"

[defaults]
stop_timeout = 20
on_quiesce_error = "continue"
command_timeout = 45
ssh = { user = "backup", port = 2222, identity_file = "/etc/vzdump-hook/key", known_hosts = "/etc/vzdump-hook/kh" }

[guests.101]
stacks = ["web", { name = "db", stop_timeout = 60 }]
ssh = { host = "10.0.0.101" }
parallel = true
max_downtime = 300
marker_path = "/var/lib/other/marker.json"

[guests.102]
stacks = "auto"
exclude = ["monitoring"]
compose_command = "docker-compose"
on_quiesce_error = "abort"
resume_wait = 0
ssh = { host = "app2.lan", port = 22, connect_timeout = 2.5 }

[guests.103]
enabled = false
ssh = { host = "10.0.0.103" }
"""


def parse(text: str) -> config.Config:
    return config.parse(tomllib.loads(text), "test.toml")


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        parse(text)
    return ei.value.problems


GUEST = '[guests.101]\nssh = { host = "h" }\n'


# -- valid documents ---------------------------------------------------------------------------


def test_full_example_parses_into_dataclasses() -> None:
    cfg = parse(FULL)
    assert cfg.source == "test.toml"
    assert cfg.hook == config.HookSettings("/var/lib/vzdump-hook-test", "/run/vzdump-hook-test", 900.0, 30.0,
                                           "/etc/pve")
    g = cfg.guests[101]
    assert g.vmid == 101 and g.transport == "ssh"
    assert g.ssh == SshConfig("10.0.0.101", 2222, "backup", "/etc/vzdump-hook/key", "/etc/vzdump-hook/kh", 10.0)
    assert g.stacks == (StackSpec("web"), StackSpec("db", 60))
    assert g.stop_timeout == 20.0 and g.command_timeout == 45.0
    assert g.stop_timeout_of("db") == 60 and g.stop_timeout_of("web") == 20.0 and g.stop_timeout_of("other") == 20.0
    assert g.parallel is True and g.max_downtime == 300.0
    assert g.marker_path == "/var/lib/other/marker.json"
    assert g.compose_command is None
    assert g.on_quiesce_error is QuiescePolicy.CONTINUE
    assert g.describe_target() == "ssh backup@10.0.0.101:2222"

    h = cfg.guests[102]
    assert h.stacks is None and h.exclude == ("monitoring",)
    assert h.compose_command == ("docker-compose",)
    assert h.on_quiesce_error is QuiescePolicy.ABORT
    assert h.resume_wait == 0.0
    assert h.ssh == SshConfig("app2.lan", 22, "backup", "/etc/vzdump-hook/key", "/etc/vzdump-hook/kh", 2.5)


def test_disabled_guest_is_parsed_but_not_offered() -> None:
    cfg = parse(FULL)
    assert 103 in cfg.guests
    assert cfg.guest(103) is None
    assert cfg.guest(101) is cfg.guests[101]
    assert cfg.guest(999) is None


def test_minimal_guest_gets_every_default() -> None:
    g = parse(GUEST).guests[101]
    assert g == config.GuestConfig(vmid=101, transport="ssh", ssh=SshConfig("h"), stacks=None)
    assert g.marker_path == "/var/lib/vzdump-hook/marker.json"
    assert g.on_quiesce_error is QuiescePolicy.CONTINUE
    assert g.stop_timeout == 30.0 and g.resume_wait == 180.0 and g.enabled


def test_empty_document_is_valid() -> None:
    cfg = parse("")
    assert cfg.guests == {} and cfg.hook == config.HookSettings()


def test_shipped_example_config_is_valid() -> None:
    path = REPO / "examples" / "config.toml"
    if not path.exists():
        pytest.skip("examples/config.toml not present")
    cfg = config.load(str(path))
    assert cfg.guest(101) is not None
    assert cfg.guests[101].stacks == (StackSpec("db"), StackSpec("web", 60.0))


def test_shipped_example_names_every_key() -> None:
    """The example is the reference for every key (README): each key the validator knows appears in
    it, set or commented out, under its table."""
    import dataclasses
    import re

    text = (REPO / "examples" / "config.toml").read_text()
    tables: dict[str, set[str]] = {}
    table = ""
    for line in text.splitlines():
        if m := re.match(r"^\[([a-z.0-9]+)\]", line):
            table = m[1]
        elif m := re.match(r"^#? ?([a-z_]+) = ", line):
            tables.setdefault(table, set()).add(m[1])
    names = lambda cls: {f.name for f in dataclasses.fields(cls)}  # noqa: E731
    assert names(config.HookSettings) <= tables["hook"]
    assert set(config._GUEST_KEYS) - {"ssh", "pct", "agent", "enabled", "transport"} <= tables["defaults"]
    assert names(SshConfig) - {"host"} <= tables["defaults.ssh"]
    assert names(PctConfig) <= tables["defaults.pct"]
    assert names(AgentConfig) <= tables["defaults.agent"]


def test_compose_command_values() -> None:
    def cc(value: str) -> tuple[str, ...] | None:
        return parse(GUEST + f"compose_command = {value}\n").guests[101].compose_command

    assert cc('"docker compose"') == ("docker", "compose")
    assert cc('"docker-compose"') == ("docker-compose",)
    assert cc('"auto"') is None


def test_recorded_table_validates_back_to_the_same_guest() -> None:
    """hook.py keeps GuestConfig.table in host state and validates it again to resume."""
    cfg = parse(FULL)
    for vmid in (101, 102):
        g = cfg.guests[vmid]
        assert config.validate_guest(vmid, g.table) == g


# -- defaults merging --------------------------------------------------------------------------


def test_guest_keys_override_defaults() -> None:
    cfg = parse("[defaults]\nstop_timeout = 5\nparallel = true\n" + GUEST + "stop_timeout = 7\n")
    g = cfg.guests[101]
    assert g.stop_timeout == 7.0 and g.parallel is True


def test_sub_tables_merge_key_by_key() -> None:
    cfg = parse('[defaults.ssh]\nuser = "backup"\nport = 2200\n[guests.101]\nssh = { host = "a", port = 22 }\n'
                '[guests.102]\nssh = { host = "b" }\n')
    assert cfg.guests[101].ssh == SshConfig("a", 22, "backup")
    assert cfg.guests[102].ssh == SshConfig("b", 2200, "backup")


def test_merge_does_not_leak_between_guests() -> None:
    cfg = parse('[defaults.ssh]\nuser = "u"\n[guests.101.ssh]\nhost = "a"\nuser = "x"\n[guests.102.ssh]\nhost = "b"\n')
    assert cfg.guests[101].ssh.user == "x"  # type: ignore[union-attr]
    assert cfg.guests[102].ssh.user == "u"  # type: ignore[union-attr]


def test_guest_list_replaces_default_list() -> None:
    cfg = parse('[defaults]\nstacks = ["a", "b"]\n' + GUEST + 'stacks = ["c"]\n')
    assert cfg.guests[101].stacks == (StackSpec("c"),)


def test_defaults_error_reported_once_under_its_own_path() -> None:
    got = problems("[defaults]\nstop_timeout = 0\n" + GUEST + '[guests.102]\nssh = { host = "h" }\n')
    assert got == ["defaults.stop_timeout: must be 1-3600 (got 0)"]


def test_host_in_defaults_is_refused() -> None:
    got = problems('[defaults.ssh]\nhost = "everyone"\n' + GUEST)
    assert got == ["defaults.ssh.host: a host is per guest: set it in [guests.VMID.ssh]"]


# -- every error names its key path -------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("ssh = { host = 'h', port = 70000 }", "guests.101.ssh.port: must be 1-65535 (got 70000)"),
        ("ssh = { host = 'h', port = 0 }", "guests.101.ssh.port: must be 1-65535"),
        ("ssh = { host = 'h', port = '22' }", "guests.101.ssh.port: must be an integer"),
        ("ssh = { host = 'h', port = 22.5 }", "guests.101.ssh.port: must be an integer"),
        ("ssh = { host = 'h', port = true }", "guests.101.ssh.port: must be an integer"),
        ("ssh = { host = '' }", "guests.101.ssh.host: must be a non-empty string"),
        ("ssh = { port = 22 }", "guests.101.ssh.host: missing"),
        ("ssh = 'h'", "guests.101.ssh: must be a table"),
        ("ssh = { host = 'h', connect_timeout = 0 }", "guests.101.ssh.connect_timeout: must be 0.1-300"),
        ("ssh = { host = 'h', user = 5 }", "guests.101.ssh.user: must be a non-empty string"),
        ("ssh = { host = 'h', proxy = 'x' }", "guests.101.ssh.proxy: unknown key"),
        ("ssh = { host = 'h' }\nstop_timeout = true", "guests.101.stop_timeout: must be a number"),
        ("ssh = { host = 'h' }\nstop_timeout = 0.5", "guests.101.stop_timeout: must be 1-3600"),
        ("ssh = { host = 'h' }\nstop_timeout = nan", "guests.101.stop_timeout: must be 1-3600"),
        ("ssh = { host = 'h' }\nmax_downtime = 5", "guests.101.max_downtime: must be 10-604800"),
        ("ssh = { host = 'h' }\ncommand_timeout = 0", "guests.101.command_timeout: must be 1-3600"),
        ("ssh = { host = 'h' }\nresume_wait = -1", "guests.101.resume_wait: must be 0-3600"),
        ("ssh = { host = 'h' }\nparallel = 'yes'", "guests.101.parallel: must be true or false"),
        ("ssh = { host = 'h' }\nenabled = 1", "guests.101.enabled: must be true or false"),
        ("ssh = { host = 'h' }\non_quiesce_error = 'ignore'",
         "guests.101.on_quiesce_error: must be one of 'continue', 'abort'"),
        ("ssh = { host = 'h' }\ncompose_command = 'podman-compose'", "guests.101.compose_command: must be one of"),
        ("ssh = { host = 'h' }\ntransport = 'telnet'", "guests.101.transport: must be one of 'ssh'"),
        ("ssh = { host = 'h' }\nstacks = 'all'", 'guests.101.stacks: must be "auto" or a non-empty list'),
        ("ssh = { host = 'h' }\nstacks = []", 'guests.101.stacks: must be "auto" or a non-empty list'),
        ("ssh = { host = 'h' }\nstacks = ['Web']", "guests.101.stacks[0]: not a compose project name"),
        ("ssh = { host = 'h' }\nstacks = ['db', '../etc']", "guests.101.stacks[1]: not a compose project name"),
        ("ssh = { host = 'h' }\nstacks = ['db', '-rf']", "guests.101.stacks[1]: not a compose project name"),
        ("ssh = { host = 'h' }\nstacks = ['db', 'db']", "guests.101.stacks[1]: 'db' is listed twice"),
        ("ssh = { host = 'h' }\nstacks = [{ stop_timeout = 5 }]", "guests.101.stacks[0].name: missing"),
        ("ssh = { host = 'h' }\nstacks = [{ name = 'db', stop_timeout = 0 }]",
         "guests.101.stacks[0].stop_timeout: must be 1-3600"),
        ("ssh = { host = 'h' }\nstacks = [{ name = 'db', signal = 'INT' }]",
         "guests.101.stacks[0].signal: unknown key"),
        ("ssh = { host = 'h' }\nexclude = 'monitoring'", "guests.101.exclude: must be a list of compose project names"),
        ("ssh = { host = 'h' }\nexclude = [1]", "guests.101.exclude: must be a list of compose project names"),
        ("ssh = { host = 'h' }\nstop_timout = 5", "guests.101.stop_timout: unknown key"),
    ],
)
def test_problem_names_its_key_path(extra: str, expected: str) -> None:
    got = problems(f"[guests.101]\n{extra}\n")
    assert any(p.startswith(expected) for p in got), got


def test_missing_ssh_table_for_ssh_transport() -> None:
    got = problems("[guests.101]\nstacks = 'auto'\n")
    assert got == ["guests.101.ssh: missing (transport is ssh: give at least ssh.host)"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[hook]\nphase_timeout = 1", "hook.phase_timeout: must be 5-86400"),
        ("[hook]\nsweep_timeout = 'x'", "hook.sweep_timeout: must be a number"),
        ("[hook]\nrun_dir = 5", "hook.run_dir: must be a non-empty string"),
        ("[hook]\nlog_level = 'debug'", "hook.log_level: unknown key"),
        ("hook = 5", "hook: must be a table"),
        ("defaults = 5", "defaults: must be a table"),
        ("guests = 5", "guests: must be a table"),
        ("[defaults]\ncolour = 'blue'", "defaults.colour: unknown key"),
        ("[defaults.ssh]\nport = 0", "defaults.ssh.port: must be 1-65535"),
        ("[guest.101]\nssh = { host = 'h' }", "(top level).guest: unknown key"),
        ("[guests]\n101 = 'h'", "guests.101: must be a table"),
    ],
)
def test_problem_outside_guests_names_its_key_path(text: str, expected: str) -> None:
    got = problems(text + "\n")
    assert any(p.startswith(expected) for p in got), got


@pytest.mark.parametrize("key", ["abc", "99", "0101", "-101", "1000000000", "101a", "1e3"])
def test_guest_keys_must_be_vmids(key: str) -> None:
    got = problems(f'[guests."{key}"]\nssh = {{ host = "h" }}\n')
    assert got == [f"guests.{key}: the key must be a VMID (an integer 100-999999999)"]


@pytest.mark.parametrize("key", ["100", "101", "999999999"])
def test_valid_vmid_keys(key: str) -> None:
    assert int(key) in parse(f'[guests.{key}]\nssh = {{ host = "h" }}\n').guests


def test_passwords_are_refused() -> None:
    got = problems('[guests.101]\nssh = { host = "h", password = "hunter2" }\n')
    assert "guests.101.ssh.password: passwords are not supported: use a key (identity_file)" in got
    assert not any("hunter2" in p for p in got)


def test_password_in_defaults_is_refused() -> None:
    got = problems('[defaults.ssh]\npassword = "x"\n' + GUEST)
    assert any(p.startswith("defaults.ssh.password: passwords are not supported") for p in got)


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ('[hook]\nstate_dir = "state"', "hook.state_dir"),
        ('[hook]\nrun_dir = "./run"', "hook.run_dir"),
        ('[hook]\npve_dir = "etc/pve"', "hook.pve_dir"),
        (GUEST + 'marker_path = "marker.json"', "guests.101.marker_path"),
        ('[guests.101]\nssh = { host = "h", identity_file = "id_ed25519" }', "guests.101.ssh.identity_file"),
        ('[guests.101]\nssh = { host = "h", known_hosts = "~/.ssh/known_hosts" }', "guests.101.ssh.known_hosts"),
        ('[defaults.ssh]\nidentity_file = "key"\n' + GUEST, "defaults.ssh.identity_file"),
    ],
)
def test_relative_paths_are_refused(text: str, path: str) -> None:
    got = problems(text + "\n")
    assert len(got) == 1 and got[0].startswith(f"{path}: must be an absolute path"), got
    assert "no working directory" in got[0]


def test_all_problems_reported_at_once() -> None:
    text = (
        "[hook]\nphase_timeout = 0\n"
        "[defaults]\nbogus = 1\n"
        '[guests.101]\nssh = { host = "h", port = 70000 }\nstop_timeout = 0\n'
        '[guests.102]\nssh = { host = "h" }\nmarker_path = "rel"\n'
        '[guests.x]\nssh = { host = "h" }\n'
    )
    with pytest.raises(ConfigError) as ei:
        parse(text)
    e = ei.value
    paths = sorted(p.split(":")[0] for p in e.problems)
    assert paths == sorted(["hook.phase_timeout", "defaults.bogus", "guests.101.ssh.port", "guests.101.stop_timeout",
                            "guests.102.marker_path", "guests.x"])
    text_ = str(e)
    assert text_.startswith("test.toml: 6 problems\n")
    for p in e.problems:
        assert f"\n  {p}" in text_
    assert e.exit_code == 2


def test_single_problem_message_is_one_line() -> None:
    with pytest.raises(ConfigError) as ei:
        parse('[guests.101]\nssh = { host = "h", port = 0 }\n')
    assert str(ei.value) == "test.toml: guests.101.ssh.port: must be 1-65535 (got 0)"


def test_valid_guests_are_not_half_built_when_another_is_invalid() -> None:
    with pytest.raises(ConfigError) as ei:
        parse(GUEST + '[guests.102]\nssh = { host = "h", port = 0 }\n')
    assert [p.split(":")[0] for p in ei.value.problems] == ["guests.102.ssh.port"]


def test_config_is_frozen() -> None:
    g = parse(GUEST).guests[101]
    with pytest.raises(AttributeError):
        g.stop_timeout = 1.0  # type: ignore[misc]


def test_valid_stack_name() -> None:
    assert valid_stack_name("db")
    assert valid_stack_name("my_app-2.prod")
    assert valid_stack_name("0abc")
    for bad in ("", "-x", "_x", ".x", "Web", "a b", "a/b", "a;b", "x" * 129, "ü"):
        assert not valid_stack_name(bad), bad


# -- load() and config_path() ------------------------------------------------------------------


def test_load_reads_and_validates(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(FULL)
    cfg = config.load(str(p))
    assert cfg.source == str(p) and set(cfg.guests) == {101, 102, 103}


def test_load_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as ei:
        config.load(str(p))
    assert ei.value.source == str(p)
    assert str(ei.value).startswith(f"{p}: no such file")
    assert CONFIG_ENV in str(ei.value)


def test_load_bad_toml(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[guests.101\nssh = {\n")
    with pytest.raises(ConfigError) as ei:
        config.load(str(p))
    assert str(ei.value).startswith(f"{p}: not valid TOML")


def test_load_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        config.load(str(tmp_path))
    assert str(ei.value).startswith(f"{tmp_path}: cannot read")


def test_load_invalid_document_names_file_and_key(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[guests.101]\nssh = { host = "h", port = 0 }\n')
    with pytest.raises(ConfigError) as ei:
        config.load(str(p))
    assert str(ei.value) == f"{p}: guests.101.ssh.port: must be 1-65535 (got 0)"


def test_load_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_bytes(b"# M\xfcller's guests\n[hook]\n")
    with pytest.raises(ConfigError) as ei:
        config.load(str(p))
    assert "not valid TOML" in str(ei.value) or "UTF-8" in str(ei.value)


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert config.config_path() == DEFAULT_CONFIG_PATH == "/etc/vzdump-hook/config.toml"
    monkeypatch.setenv(CONFIG_ENV, "/srv/other.toml")
    assert config.config_path() == "/srv/other.toml"
    assert config.config_path("/explicit.toml") == "/explicit.toml"
    monkeypatch.setenv(CONFIG_ENV, "")
    assert config.config_path() == DEFAULT_CONFIG_PATH


def test_load_uses_env_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "env.toml"
    p.write_text(GUEST)
    monkeypatch.setenv(CONFIG_ENV, str(p))
    cfg = config.load()
    assert cfg.source == str(p) and 101 in cfg.guests


def test_early_resume_and_qmp_dir() -> None:
    cfg = parse('[hook]\nqmp_dir = "/tmp/qmp"\n[defaults]\nearly_resume = false\n[guests.101]\nssh = { host = "h" }\n'
                '[guests.102]\nssh = { host = "h" }\nearly_resume = true\n')
    assert cfg.hook.qmp_dir == "/tmp/qmp"
    assert cfg.guests[101].early_resume is False and cfg.guests[102].early_resume is True
    default = parse('[guests.101]\nssh = { host = "h" }\n')
    assert default.hook.qmp_dir == "/var/run/qemu-server" and default.guests[101].early_resume is True


def test_early_resume_and_qmp_dir_problems() -> None:
    assert problems('[hook]\nqmp_dir = "run/qemu"\n')[0].startswith("hook.qmp_dir: must be an absolute path")
    assert problems('[guests.101]\nssh = { host = "h" }\nearly_resume = "yes"\n') == [
        "guests.101.early_resume: must be true or false (got 'yes')"]
