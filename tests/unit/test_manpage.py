"""vzdump-hook(8) against the program's own --help: every command and every option that --help shows
is in the man page, and groff formats it without a warning."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from vzdump_hook.admin.cli import cli


def helptext(*words: str) -> str:
    r = CliRunner().invoke(cli, [*words, "--help"])
    assert r.exit_code == 0, r.output
    return r.output


def commands(*words: str) -> list[str]:
    """The command names that `vzdump-hook WORDS --help` lists under "Commands:"."""
    text = helptext(*words)
    section = text.split("Commands:\n", 1)[1] if "Commands:\n" in text else ""
    return [line.split()[0] for line in section.splitlines() if line.startswith("  ") and line.split()]


@pytest.fixture(scope="module")
def page() -> str:
    """The man page as groff formats it (groff-base: scripts/setup-test-host.sh installs it)."""
    roff = subprocess.run([sys.executable, "-m", "vzdump_hook.admin.manpage"], capture_output=True, text=True,
                          check=True, env={"SOURCE_DATE_EPOCH": "0"}).stdout
    assert '.TH VZDUMP\\-HOOK 8 "1970-01-01"' in roff  # the build's date, not today's: reproducible
    if not shutil.which("groff"):
        pytest.skip("groff is not installed (Debian: groff-base)")
    warnings = subprocess.run(["groff", "-man", "-ww", "-z"], input=roff, capture_output=True, text=True)
    assert warnings.returncode == 0 and warnings.stderr == "", warnings.stderr
    return subprocess.run(["groff", "-man", "-Tutf8", "-P-cbou", "-rLL=200n"], input=roff, capture_output=True,
                          text=True, check=True).stdout


def test_every_command_and_option_of_the_help_is_in_the_man_page(page: str) -> None:
    top = commands()
    assert {"check", "setup", "enable", "guest"} <= set(top)  # the parse found the list
    sections = {s.split(" [OPTIONS]")[0]: s for s in re.split(r"^ {3}(?=vzdump-hook )", page, flags=re.M)[1:]}
    every = [(c,) for c in top if c != "guest"] + [("guest", c) for c in commands("guest")]
    assert sorted(sections) == sorted(f"vzdump-hook {' '.join(w)}" for w in every)
    for words in every:
        section = sections[f"vzdump-hook {' '.join(words)}"]
        for option in re.findall(r"(?<![\w-])--[a-z][a-z-]+", helptext(*words)):
            assert option in section, (words, option)
    for option in re.findall(r"(?<![\w-])--[a-z][a-z-]+", helptext()):
        assert option in page.split("COMMANDS")[0]


def test_the_page_names_the_packaged_paths(page: str) -> None:
    for path in ("/etc/vzdump-hook/config.toml", "/usr/share/doc/vzdump-hook/config.example.toml",
                 "script: /usr/bin/vzdump-hook"):
        assert path in page
