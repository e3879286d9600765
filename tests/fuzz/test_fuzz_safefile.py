"""Fuzz the files written as root (vzdump_hook/node/safefile.py): random layouts an attacker could leave
(a link or a directory of its own at the target, links at names next to it, a directory that is a
link, belongs to another user or may be written by others), a random name and content. Whatever the
layout: the victim file is unchanged, and the write either leaves exactly the content at the target
as a regular file of the asked mode, or is refused with UnsafePath, or fails with an OSError."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.profile import budget
from vzdump_hook.node import safefile

NOBODY = pwd.getpwnam("nobody").pw_uid
NAMES = st.text(alphabet="abcxyz.-_0123456789", min_size=1, max_size=12).filter(lambda n: n not in (".", ".."))


@st.composite
def layouts(draw: st.DrawFn) -> dict[str, object]:
    return {
        "name": draw(NAMES),
        "data": draw(st.binary(max_size=200)),
        "mode": draw(st.sampled_from([0o600, 0o644])),
        "dir": draw(st.sampled_from(["root", "root-0775", "root-1777", "nobody", "link-to-root-dir"])),
        "at_target": draw(st.sampled_from(["nothing", "link-to-victim", "dangling-link", "regular", "directory"])),
        "neighbours": draw(st.lists(NAMES, max_size=4)),
    }


@budget(60)
@given(layouts())
def test_the_victim_is_never_written_and_the_target_is_whole_or_untouched(layout: dict[str, object]) -> None:
    base = Path(tempfile.mkdtemp(prefix="vzdh-fuzz-file-"))
    try:
        victim = base / "victim"
        victim.write_bytes(b"victim\n")
        real = base / "real"
        real.mkdir(mode=0o755)
        d = base / "d"
        kind = layout["dir"]
        if kind == "link-to-root-dir":
            d.symlink_to(real)
        else:
            d.mkdir()
            d.chmod({"root": 0o755, "root-0775": 0o775, "root-1777": 0o1777, "nobody": 0o755}[str(kind)])
            if kind == "nobody":
                os.chown(d, NOBODY, NOBODY)
        where = real if kind == "link-to-root-dir" else d
        name = str(layout["name"])
        for n in layout["neighbours"]:  # type: ignore[attr-defined]
            for planted in (f"{n}", f".{name}.{n}.tmp", f"{name}.{n}.tmp"):
                if not (where / planted).exists() and planted != name:
                    (where / planted).symlink_to(victim)
        target = where / name
        at = layout["at_target"]
        if at == "link-to-victim":
            target.symlink_to(victim)
        elif at == "dangling-link":
            target.symlink_to(base / "nowhere")
        elif at == "regular":
            target.write_bytes(b"old")
        elif at == "directory":
            target.mkdir()
        try:
            safefile.write_atomic(str(d / name), bytes(layout["data"]), int(layout["mode"]))  # type: ignore[call-overload]
            outcome = "written"
        except safefile.UnsafePath:
            outcome = "refused"
        except OSError:
            outcome = "failed"
        assert victim.read_bytes() == b"victim\n"
        assert not (base / "nowhere").exists()
        if kind in ("root-0775", "root-1777", "nobody", "link-to-root-dir"):
            assert outcome == "refused", (kind, outcome)
        if outcome == "written":
            st_ = os.lstat(target)
            assert stat.S_ISREG(st_.st_mode) and stat.S_IMODE(st_.st_mode) == layout["mode"]
            assert target.read_bytes() == layout["data"]
        leftovers = [p.name for p in where.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()]
        assert leftovers == [], leftovers
    finally:
        shutil.rmtree(base, ignore_errors=True)
