"""report.py in-process: the textfile's format (checked with Prometheus' own parser), the job-end
message, and the [hook] keys that configure them."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.test_config import parse
from vzdump_hook.guest.marker import StackRecord
from vzdump_hook.node import report
from vzdump_hook.node.state import GuestRecord, Status


def rec(vmid: int, status: Status, stacks: tuple[str, ...] = ("db",), crash: bool = False,
        down: float | None = 2.5) -> GuestRecord:
    r = GuestRecord(vmid, "lxc", "snapshot", {}, status=status, crash_consistent=crash)
    r.stacks = [StackRecord(s, ("docker", "compose"), "/srv", ("/srv/compose.yaml",), ("a" * 12,), True, ("app",))
                for s in stacks]
    if down is not None:
        r.stop_started, r.resumed_at = 100.0, 100.0 + down
    return r


def test_render_parses_and_says_what_each_guest_is() -> None:
    guests = {
        "101": {"stacks": ["db", "web"], "down": [], "downtime": 2.5, "result": "ok",
                "last_success": 1796127404.911797},
        "102": {"stacks": ["app"], "down": ["app"], "downtime": None, "result": "still-down", "last_success": None},
    }
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(report.render(guests, 1796127500.0)) for s in f.samples}
    assert samples[("vzdump_hook_last_downtime_seconds", (("stack", "web"), ("vmid", "101")))] == 2.5
    assert ("vzdump_hook_last_downtime_seconds", (("stack", "app"), ("vmid", "102"))) not in samples
    assert samples[("vzdump_hook_last_success_timestamp_seconds", (("vmid", "101"),))] == 1796127404.911797
    assert samples[("vzdump_hook_stack_down", (("stack", "app"), ("vmid", "102")))] == 1
    assert samples[("vzdump_hook_stacks_down", (("vmid", "102"),))] == 1
    assert [r for (n, labels), v in samples.items() if n == "vzdump_hook_last_result" and v == 1
            for r in [dict(labels)]] == [
        {"result": "ok", "vmid": "101"}, {"result": "still-down", "vmid": "102"}]


def test_results_and_message() -> None:
    records = [rec(101, Status.RESUMED), rec(102, Status.RESUME_FAILED, down=None),
               rec(103, Status.RESUMED, crash=True), rec(104, Status.CONFIG_ERROR, stacks=(), down=None)]
    assert [report.result_of(r) for r in records] == ["ok", "still-down", "crash-consistent", "not-quiesced"]
    m = report.job_message("pve1", "pve1/123", records, None)
    assert m.problem and m.title == "vzdump-hook on pve1: stacks still DOWN"
    assert m.text.splitlines()[0] == "STACKS STILL DOWN in guest(s) 102: run `vzdump-hook recover` on pve1"
    assert "101: ok, down 2.5 s (db)" in m.text.splitlines()
    ok = report.job_message("pve1", "pve1/123", [rec(101, Status.RESUMED)], None)
    assert not ok.problem and ok.title == "vzdump-hook on pve1: ok" and ok.data["result"] == "ok"


@pytest.mark.parametrize(("text", "problem"), [
    ('metrics_file = "x.prom"', "hook.metrics_file: must be an absolute path"),
    ("notify = 5", "hook.notify: must be a table"),
    ('notify = { url = "ftp://x" }', "hook.notify.url: must be an http:// or https:// URL"),
    ('notify = { url = "http://x", format = "slack" }', "hook.notify.format: must be one of"),
    ('notify = { url = "http://x", timeout = 0 }', "hook.notify.timeout: must be 1-60"),
    ('notify = { url = "http://x", token_file = "/nonexistent/t" }',
     "hook.notify.token_file: /nonexistent/t does not exist"),
    ('notify = { url = "http://x", secret = "s" }', "hook.notify.secret: unknown key"),
])
def test_report_keys_are_validated(text: str, problem: str) -> None:
    from vzdump_hook.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        parse(f"[hook]\n{text}\n")
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


# -- guest names in the textfile and the message (security issue 20, finding 5) ----------------------

HOSTILE = 'db"\\\n# TYPE x\x1b[2J\x85\u2028\u202e'
SHOWN = r'db"\\x0a# TYPE x\x1b[2J\x85\u2028\u202e'  # as text.escape writes it: one line, printable


def test_a_hostile_stack_name_is_one_escaped_label_value() -> None:
    guests = {"101": {"stacks": [HOSTILE], "down": [HOSTILE], "downtime": 1.5, "result": "still-down",
                      "last_success": None}}
    text = report.render(guests, 1796127500.0)
    lines = text[:-1].split("\n")
    assert all(ln.isprintable()
               and (ln.startswith("# HELP ") or ln.startswith("# TYPE ") or ln.startswith("vzdump_hook_"))
               for ln in lines), text
    assert len([ln for ln in lines if ln.startswith("# TYPE ")]) == 6  # no sample line became a comment or a new family
    samples = [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]
    assert ("vzdump_hook_stack_down", {"vmid": "101", "stack": SHOWN}, 1.0) in samples
    assert ("vzdump_hook_last_downtime_seconds", {"vmid": "101", "stack": SHOWN}, 1.5) in samples


def test_the_message_shows_guest_names_and_the_config_problem_escaped() -> None:
    m = report.job_message("pve1", "pve1/123", [rec(101, Status.RESUME_FAILED, stacks=(HOSTILE, "web"), down=None)],
                           "guests.101: bad\nvzdump-hook: ok\x1b[2J")
    lines = m.text.split("\n")
    assert lines == [
        "STACKS STILL DOWN in guest(s) 101: run `vzdump-hook recover` on pve1",
        "config unusable, guests backed up WITHOUT quiescing: guests.101: bad\\x0avzdump-hook: ok\\x1b[2J",
        f"101: still-down ({SHOWN}, web)",
    ]
    assert (m.data["guests"][0]["stacks"] == [SHOWN, "web"]
            and m.data["config_problem"] == "guests.101: bad\\x0avzdump-hook: ok\\x1b[2J")
