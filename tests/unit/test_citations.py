"""Every file the code and the documents cite exists in the repository (issue 22: no document outside it).

A citation is a repository path written out: `vzdump_hook/...py`, `docs/...md`, `tests/...py` (with an
optional `::test_name`, which must be defined in that file), `examples/...`, `bench/...`, `scripts/...`.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CITED = re.compile(r"(?<![\w./-])((?:vzdump_hook|docs|tests|examples|bench|scripts|debian)/[\w./-]*\w)(::\w+)?")
# paths written out that are not files of this repository: a temporary file a script makes, a path in
# QEMU's documentation. A name in capitals (`stacks/KIND.py`, `markers/NAME.json`) is a pattern.
NOT_FILES = {"debian/changelog.new", "docs/interop/qmp-spec"}
PATTERN = re.compile(r"/[A-Z_]+(\.\w+)?$")


def tracked() -> list[str]:
    return subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True,
                          check=True).stdout.split()


def citations() -> list[tuple[str, str, str]]:
    found = []
    for name in tracked():
        if not name.endswith((".py", ".md", ".sh", ".toml", ".service", ".timer")) and "/" in name:
            continue
        try:
            text = (ROOT / name).read_text()
        except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
            continue
        for m in CITED.finditer(text):
            found.append((name, m[1].rstrip("."), (m[2] or "")[2:]))
    return found


def test_every_cited_file_exists() -> None:
    files = set(tracked())
    dirs = {str(Path(f).parent) for f in files} | {str(p) for f in files for p in Path(f).parents}

    def exists(path: str) -> bool:
        module = path.split(".")[0] + ".py"  # tests/integration/hookenv, tests/integration/hookenv.HookSetup
        return (bool({path, path.rstrip("/"), module} & (files | dirs)) or path in NOT_FILES or "*" in path
                or "..." in path or bool(PATTERN.search(path)))

    missing = sorted({f"{src}: {path}" for src, path, _ in citations() if not exists(path)})
    assert not missing, "\n".join(missing)


def test_every_cited_test_is_defined() -> None:
    missing = sorted({f"{src}: {path}::{test}" for src, path, test in citations()
                      if test and path.endswith(".py") and (ROOT / path).exists()
                      and not re.search(rf"^(async )?def {test}\b|^class {test}\b", (ROOT / path).read_text(), re.M)})
    assert not missing, "\n".join(missing)


def test_the_scan_finds_citations() -> None:
    cited = {path for _, path, _ in citations()}
    assert {"docs/design.md", "docs/controller-api.md", "tests/infra/vzdump.py", "examples/node/vzdump-hook"} <= cited
