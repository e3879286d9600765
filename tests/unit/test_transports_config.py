"""Config of the pct and agent transports ([guests.X.pct], [guests.X.agent], the token file) and the
opt-in by PVE tag (tags.py, and the hook handling a tagged guest without a config table)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from vzdump_hook import config
from vzdump_hook.errors import ConfigError
from vzdump_hook.node import tags
from vzdump_hook.node.job import node_name
from vzdump_hook.transports.tables import AgentConfig, PctConfig


def parse(text: str) -> config.Config:
    return config.parse(tomllib.loads(text), "test.toml")


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        parse(text)
    return ei.value.problems


@pytest.fixture
def token(tmp_path: Path) -> Path:
    t = tmp_path / "token"
    t.write_text("secret\n")
    t.chmod(0o600)
    return t


def test_pct_and_agent_tables_with_defaults(token: Path) -> None:
    cfg = parse(f"""
[guests.101]
transport = "pct"
[guests.102]
transport = "agent"
[guests.103]
transport = "agent"
agent = {{ api = "https", host = "pve1.lan", port = 8007, token_id = "backup@pve!hook", token_file = "{token}", verify = true, node = "pve1" }}
[guests.104]
transport = "pct"
pct = {{ path = "/opt/pct" }}
""")  # noqa: E501
    assert cfg.guests[101].pct == PctConfig("/usr/sbin/pct") and cfg.guests[101].describe_target() == "pct 101"
    assert cfg.guests[102].agent == AgentConfig() and cfg.guests[102].describe_target() == "agent 102 via pvesh"
    a = cfg.guests[103].agent
    assert a == AgentConfig("https", "/usr/bin/pvesh", "pve1.lan", 8007, "backup@pve!hook", str(token), True, "pve1")
    assert cfg.guests[103].describe_target() == "agent 103 via https://pve1.lan:8007"
    assert cfg.guests[104].pct == PctConfig("/opt/pct")
    assert cfg.guests[101].ssh is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('transport = "agent"\nagent = { api = "http" }', "guests.101.agent.api: must be one of 'local', 'https'"),
        ('transport = "agent"\nagent = { api = "https" }', "guests.101.agent.token_id: missing (api is https"),
        ('transport = "agent"\nagent = { api = "https", token_id = "root@pam" }',
         "guests.101.agent.token_id: must be USER@REALM!TOKENNAME"),
        ('transport = "agent"\nagent = { verify = false }', "guests.101.agent.verify: TLS is always verified"),
        ('transport = "agent"\nagent = { token = "abc" }',
         "guests.101.agent.token: secrets are not kept in the config"),
        ('transport = "agent"\nagent = { pvesh = "pvesh" }', "guests.101.agent.pvesh: must be an absolute path"),
        ('transport = "agent"\nagent = { port = 0 }', "guests.101.agent.port: must be 1-65535"),
        ('transport = "agent"\nagent = { node = "no such" }', "guests.101.agent.node: must be a PVE node name"),
        ('transport = "agent"\nagent = { bogus = 1 }', "guests.101.agent.bogus: unknown key"),
        ('transport = "pct"\npct = { path = "pct" }', "guests.101.pct.path: must be an absolute path"),
        ('transport = "pct"\npct = "x"', "guests.101.pct: must be a table"),
        ('transport = "lxc"', "guests.101.transport: must be one of 'ssh', 'pct', 'agent'"),
    ],
)
def test_problems_name_their_key_path(text: str, expected: str) -> None:
    found = problems(f"[guests.101]\n{text}\n")
    assert any(p.startswith(expected) for p in found), found


def test_the_token_file_must_be_roots_alone(tmp_path: Path, token: Path) -> None:
    base = ('[guests.101]\ntransport = "agent"\n'
            'agent = {{ api = "https", token_id = "root@pam!h", token_file = "{}" }}\n')
    assert parse(base.format(token)).guests[101].agent is not None
    token.chmod(0o640)
    assert problems(base.format(token)) == [f"guests.101.agent.token_file: {token} must be readable by root alone "
                                            f"(mode 0640): chmod 600 {token}"]
    token.chmod(0o400)
    parse(base.format(token))
    os.chown(token, 1000, 0)
    assert problems(base.format(token))[0].startswith(f"guests.101.agent.token_file: {token} must be owned by root "
                                                      "(owner uid 1000)")
    missing = tmp_path / "absent"
    assert problems(base.format(missing))[0].startswith(f"guests.101.agent.token_file: {missing} does not exist")
    # in [defaults] (what tagged VMs use) it is checked too, under its own path
    assert problems(f'[defaults]\nagent = {{ api = "https", token_id = "root@pam!h", '
                    f'token_file = "{missing}" }}\n')[0].startswith("defaults.agent.token_file:")


def test_a_recorded_guest_table_validates_without_the_token_file(tmp_path: Path) -> None:
    """Resume uses the settings recorded at quiesce: a token file changed since must not strand stacks."""
    g = config.validate_guest(101, {"transport": "agent", "agent": {"api": "https", "token_id": "root@pam!h",
                                                                    "token_file": str(tmp_path / "gone")}})
    assert g.agent is not None and g.agent.api == "https"


def test_hook_tag_setting() -> None:
    assert parse("").hook.tag == "vzdump-hook"
    assert parse('[hook]\ntag = "backup-app"').hook.tag == "backup-app"
    assert parse('[hook]\ntag = ""').hook.tag == ""
    assert problems('[hook]\ntag = "No Tag"')[0].startswith("hook.tag: must be a PVE tag")


# -- tags -------------------------------------------------------------------------------------------


def pve_guest(pve: Path, node: str, kind: str, vmid: int, text: str) -> None:
    d = pve / "nodes" / node / kind
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{vmid}.conf").write_text(text)


def test_read_tags_from_the_current_section_only(tmp_path: Path) -> None:
    p = tmp_path / "101.conf"
    p.write_text("#description with tags: fake\ncores: 2\ntags: Prod;vzdump-hook,db other\n\n[snap1]\ntags: old\n")
    assert tags.read_tags(str(p)) == {"prod", "vzdump-hook", "db", "other"}
    p.write_text("cores: 2\n[snap1]\ntags: vzdump-hook\n")
    assert tags.read_tags(str(p)) == frozenset()
    assert tags.read_tags(str(tmp_path / "absent")) == frozenset()


@pytest.fixture
def cluster(tmp_path: Path) -> Path:
    pve = tmp_path / "pve"
    me = node_name()
    pve_guest(pve, me, "lxc", 201, "hostname: ct\ntags: vzdump-hook\n")
    pve_guest(pve, me, "qemu-server", 202, "name: vm\ntags: web;vzdump-hook\n")
    pve_guest(pve, me, "qemu-server", 203, "name: untagged\n")
    pve_guest(pve, me, "lxc", 204, "tags: vzdump-hook\n")  # has a table that says enabled = false
    pve_guest(pve, me, "qemu-server", 205, "tags: vzdump-hook\n")  # has a table with ssh
    pve_guest(pve, "other-node", "lxc", 206, "tags: vzdump-hook\n")
    return pve


def cluster_config(pve: Path, extra: str = "") -> config.Config:
    return parse(f"""
[hook]
pve_dir = "{pve}"
{extra}
[defaults]
stop_timeout = 7
stacks = ["db"]
agent = {{ node = "pve9" }}
[guests.204]
transport = "pct"
enabled = false
[guests.205]
ssh = {{ host = "10.0.0.5" }}
""")


def test_tagged_guests_get_the_defaults_and_the_transport_of_their_type(cluster: Path) -> None:
    cfg = cluster_config(cluster)
    ct, vm = tags.guest_config(cfg, 201), tags.guest_config(cfg, 202)
    assert (ct is not None and ct.transport == "pct" and ct.stop_timeout == 7 and ct.stacks is not None
            and ct.stacks[0].name == "db")
    assert vm is not None and vm.transport == "agent" and vm.agent is not None and vm.agent.node == "pve9"
    assert vm.table["transport"] == "agent"  # recorded at quiesce, so a resume works even if the tag is removed
    assert tags.guest_config(cfg, 203) is None  # not tagged
    assert tags.guest_config(cfg, 204) is None  # the table wins: enabled = false
    g205 = tags.guest_config(cfg, 205)
    assert g205 is not None and g205.transport == "ssh"  # the table wins over the tag
    assert tags.guest_config(cfg, 999) is None


def test_a_configurable_tag_and_no_tag(cluster: Path) -> None:
    assert tags.guest_config(cluster_config(cluster, 'tag = "web"'), 202) is not None
    assert tags.guest_config(cluster_config(cluster, 'tag = "web"'), 201) is None
    assert tags.guest_config(cluster_config(cluster, 'tag = ""'), 201) is None


def test_members_say_who_is_in_and_why(cluster: Path) -> None:
    cfg = cluster_config(cluster)
    found = {m.vmid: m for m in tags.members(cfg)}
    assert sorted(found) == [201, 202, 204, 205, 206]
    assert (found[201].guest is not None
            and found[201].why == f"tag vzdump-hook (lxc on {node_name()}): [defaults], transport pct")
    assert found[202].why.endswith("transport agent")
    assert found[204].guest is None and "enabled = false" in found[204].why and "wins over its tag" in found[204].why
    assert found[205].guest is not None and found[205].why == "config table (wins over its tag vzdump-hook)"
    # the sweep: this node's tagged guests
    assert [m.vmid for m in tags.members(cfg, node_name())] == [201, 202, 204, 205]


def test_the_hook_handles_a_tagged_guest_without_a_table(cluster: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.unit.fakes import FakeGuest, transport_factory
    from vzdump_hook.node.job import JobId
    from vzdump_hook.phase import runner as hookmod
    from vzdump_hook.phase.runner import PhaseRunner
    from vzdump_hook.vzdump.phases import GuestType, Mode, Phase

    guest = FakeGuest()
    guest.add_project("db", 1)
    opened: list[object] = []
    factory = transport_factory({201: guest})

    def spy(g: object) -> object:
        opened.append(g)
        return factory(g)

    monkeypatch.setattr("vzdump_hook.guest.session.open_transport", spy)
    cfg = cluster_config(cluster)
    settings = hookmod.HookSettings(state_dir=str(tmp_path / "state"), run_dir=str(tmp_path / "run"),
                                    pve_dir=str(cluster))
    job = JobId.current()
    for phase in (Phase.BACKUP_START, Phase.PRE_STOP):
        assert PhaseRunner(cfg, settings, job).run(phase, GuestType.LXC, Mode.SNAPSHOT, 201) == 0
    assert guest.down_stacks() == ["db"] and opened[0].transport == "pct"  # type: ignore[attr-defined]
    assert PhaseRunner(cfg, settings, job).run(Phase.POST_RESTART, GuestType.LXC, Mode.SNAPSHOT, 201) == 0
    assert guest.running_stacks() == ["db"] and not guest.files


def test_a_tagged_vm_without_the_guest_agent_is_warned_about(cluster: Path) -> None:
    me = node_name()
    (cluster / "nodes" / me / "qemu-server" / "207.conf").write_text("name: agentful\ntags: vzdump-hook\n"
                                                                     "agent: enabled=1,fstrim_cloned_disks=1\n")
    (cluster / "nodes" / me / "qemu-server" / "208.conf").write_text("name: off\ntags: vzdump-hook\nagent: 0\n"
                                                                     "[snap1]\nagent: 1\n")
    warned = {int(w.split(":", 1)[0]) for w in tags.warnings(cluster_config(cluster))}
    assert warned == {202, 208}  # 202 has no agent line, 208 has it off (its snapshot's does not count); 205 is ssh
    (w,) = [w for w in tags.warnings(cluster_config(cluster)) if w.startswith("208:")]
    assert "qm set 208 --agent enabled=1" in w
