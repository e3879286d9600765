"""One resume path (issue 22): a guest's stacks are started only by the session's `resume`, and only
guest/resume.py calls it (Resumer for this job's stacks, under the lock and the host record;
resume_leftover for another job's marker, under the lock). Read from the package's source, so a new
caller elsewhere fails here before it can start stacks twice."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "vzdump_hook"


def calls(attr: str) -> dict[str, list[str]]:
    """Where `<something>.attr(...)` is called, by module path (relative to the package)."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr:
                found.setdefault(str(path.relative_to(PACKAGE)), []).append(ast.unparse(node.func.value))
    return found


def test_only_the_resume_path_calls_the_sessions_resume() -> None:
    found = calls("resume")
    # phase/resume_point.py's own resume() goes to the Resumer; the scan sees those calls by their module name
    others = {where: on for where, on in found.items() if set(on) - {"resume_point"}}
    assert set(others) == {"guest/resume.py"}, others
    assert len(others["guest/resume.py"]) >= 3  # Resumer, and resume_leftover with and without the lock held


def test_stacks_are_started_only_inside_the_session_and_the_kinds() -> None:
    starters = {where for where, on in calls("start").items() if any("driver" in o for o in on)}
    assert starters, "the scan finds the drivers' start calls"
    # the session's resume and its quiesce's undo (guest/stops.py), and the kinds' dispatch
    assert starters <= {"guest/session.py", "guest/stops.py", "stacks/kinds.py"}, starters
