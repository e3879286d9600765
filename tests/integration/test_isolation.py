"""The program runs isolated (security issue 20, finding 1): root starts vzdump-hook from any working
directory, with any environment, and no module planted there or named by the environment runs.

Each test plants modules that the program imports early (its own package, json, logging, tomllib)
in the working directory and in PYTHONPATH, a PYTHONSTARTUP file and a user site directory, each
writing a sentinel file when imported, then starts the program the ways it is started: the launcher
(examples/node/vzdump-hook, as vzdump and the admin run it, and as the boot unit runs it), the resident
and `simulate`'s phases. The control shows that the plant works: plain `python3 -m vzdump_hook` from
the same directory runs it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_failsafe import launcher

REPO = Path(__file__).resolve().parents[2]
PLANTED = ("vzdump_hook/__init__.py", "json.py", "logging.py", "tomllib.py", "encodings_extra.py")


def plant(where: Path, sentinels: Path) -> None:
    """Modules at `where` that, imported, leave a file in `sentinels` named for where they were."""
    for rel in PLANTED:
        path = where / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tag = f"{where.name}-{rel.replace('/', '_')}"
        path.write_text(f"open({str(sentinels / tag)!r}, 'w').close()\nraise SystemExit(0)\n")


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[Path, dict[str, str], Path]:
    """(a working directory with planted modules, an environment naming more of them, the sentinel dir)."""
    sentinels = tmp_path / "sentinels"
    sentinels.mkdir()
    cwd = tmp_path / "cwd"
    plant(cwd, sentinels)
    pypath = tmp_path / "pypath"
    plant(pypath, sentinels)
    startup = tmp_path / "startup.py"
    startup.write_text(f"open({str(sentinels / 'startup')!r}, 'w').close()\n")
    userbase = tmp_path / "userbase"
    site = userbase / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    site.mkdir(parents=True)
    (site / "usercustomize.py").write_text(f"open({str(sentinels / 'usercustomize')!r}, 'w').close()\n")
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONPATH": str(pypath),
        "PYTHONSTARTUP": str(startup),
        "PYTHONUSERBASE": str(userbase),
        "PYTHONINSPECT": "1",
        "VZDUMP_HOOK_CONFIG": str(tmp_path / "config.toml"),
        "VZDUMP_HOOK_RUN_DIR": str(tmp_path / "run"),
        "VZDUMP_HOOK_STATE_DIR": str(tmp_path / "state"),
    }
    (tmp_path / "config.toml").write_text("[defaults]\n")
    return cwd, env, sentinels


def test_control_plain_python_m_runs_the_planted_module(hostile: tuple[Path, dict[str, str], Path]) -> None:
    """Without isolation the plant runs: what the tests below rule out is a real attack."""
    cwd, env, sentinels = hostile
    subprocess.run([sys.executable, "-m", "vzdump_hook", "--version"], cwd=cwd, env=env, capture_output=True,
                   timeout=60)
    assert sorted(p.name for p in sentinels.iterdir()), "the planted modules did not run: the control is broken"


@pytest.mark.parametrize("argv", [["--version"], ["check"], ["recover", "--all"], ["job-init"], ["job-start"]])
def test_the_launcher_runs_no_planted_module(tmp_path: Path, hostile: tuple[Path, dict[str, str], Path],
                                             argv: list[str]) -> None:
    """Admin commands (exec'd), the boot unit's `recover --all` and vzdump's phases: nothing planted runs,
    and the program did its work (its own output, not the plant's silent exit)."""
    cwd, env, sentinels = hostile
    hook = launcher(tmp_path, sys.executable)
    phase_env = dict(env)
    if not argv[0].startswith("-") and argv[0] not in ("check", "recover"):
        phase_env.update({"STOREID": "local", "DUMPDIR": "/var/lib/vz/dump"})
    r = subprocess.run([hook, *argv], cwd=cwd, env=phase_env, capture_output=True, text=True, timeout=120)
    assert not list(sentinels.iterdir()), (f"planted code ran: {sorted(p.name for p in sentinels.iterdir())}\n"
                                           f"{r.stdout}{r.stderr}")
    out = r.stdout + r.stderr
    if argv == ["--version"]:
        assert r.returncode == 0 and "vzdump-hook" in out and "0." in out, out
    elif argv[0] in ("job-init", "job-start"):
        assert r.returncode == 0 and "could not run" not in out, out  # the program ran: not the launcher's fallback
    else:
        assert "Traceback" not in out, out
        assert r.returncode in (0, 1), out


def test_every_python_the_program_starts_is_isolated() -> None:
    """Each `sys.executable` the package starts (the resident, `simulate`'s phases) is given -I."""
    found = 0
    for path in sorted((REPO / "vzdump_hook").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.List) and node.elts and ast.unparse(node.elts[0]) == "sys.executable":
                found += 1
                assert len(node.elts) > 1 and ast.unparse(node.elts[1]) == "'-I'", (
                    f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert found >= 2, "the resident's and simulate's spawns were not found"


def test_the_launcher_and_the_boot_unit_never_start_python_without_isolation() -> None:
    text = (REPO / "examples" / "node" / "vzdump-hook").read_text()
    runs = [line for line in text.splitlines() if '"$PYTHON"' in line and not line.lstrip().startswith("#")]
    assert len(runs) == 2 and all('"$PYTHON" -I -m vzdump_hook' in line for line in runs), runs
    assert "VZDUMP_HOOK_PYTHON" not in text  # no environment variable chooses the interpreter
    unit = (REPO / "examples" / "node" / "vzdump-hook-boot-recover.service").read_text()
    assert "\nExecStart=/usr/local/bin/vzdump-hook recover --all\n" in unit  # the launcher, never python3 directly


def test_chained_scripts_get_no_lc_ctype_that_vzdump_did_not_give(tmp_path: Path) -> None:
    """-I makes Python coerce the C locale (LC_CTYPE=C.UTF-8 in its environment); a chained script
    still gets vzdump's environment as vzdump gave it."""
    hook = launcher(tmp_path, sys.executable)
    seen = tmp_path / "env"
    script = tmp_path / "chained.sh"
    script.write_text(f"#!/bin/sh\nenv > {seen}\n")
    script.chmod(0o755)
    config = tmp_path / "config.toml"
    config.write_text(f'[hook]\nchain = ["{script}"]\n[defaults]\n')
    env = {"VZDUMP_HOOK_CONFIG": str(config), "VZDUMP_HOOK_RUN_DIR": str(tmp_path / "run"),
           "VZDUMP_HOOK_STATE_DIR": str(tmp_path / "state"), "STOREID": "local", "DUMPDIR": "/var/lib/vz/dump"}
    r = subprocess.run(["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items()), hook, "job-start"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    got = dict(line.split("=", 1) for line in seen.read_text().splitlines() if "=" in line)
    assert "LC_CTYPE" not in got and not any(k.startswith("VZDUMP_HOOK_LAUNCHER") for k in got), got
    assert got["STOREID"] == "local"
    r = subprocess.run(["/usr/bin/env", "-i", "LC_CTYPE=C", *(f"{k}={v}" for k, v in env.items()), hook, "job-start"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    got = dict(line.split("=", 1) for line in seen.read_text().splitlines() if "=" in line)
    assert r.returncode == 0 and got.get("LC_CTYPE") in ("C", "C.UTF-8"), got  # one vzdump gave is kept
