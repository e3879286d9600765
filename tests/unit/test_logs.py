"""logs.py: whatever a log call carries, the task log gets one line per record with no character that
breaks a line, drives a terminal or reorders the text (security issue 20, finding 5). Two halves:
the Formatter escapes every argument whatever its type (property-based), and every logging call in
vzdump_hook/ passes what varies as an argument, never inside its template (AST)."""

from __future__ import annotations

import ast
import dataclasses
import enum
import io
import logging
import math
import re
import sys
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vzdump_hook.errors import ConfigError, MarkerError, TransportError
from vzdump_hook.logs import Formatter
from vzdump_hook.node.job import JobId
from vzdump_hook.text import escape

PACKAGE = Path(__file__).resolve().parents[2] / "vzdump_hook"

# What the task log must never carry raw. Named by Unicode's own tables, not by text.py's list.
BIDI_CLASSES = {"LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI"}  # embeddings, overrides, isolates
BIDI_MARKS = {"\u200e", "\u200f", "\u061c"}  # LRM, RLM, ALM (bidi classes L, R, AL: named here)
HOSTILE = "\n\r\x0b\x0c\x1c\x1d\x1e\x1b\x00\x07\x08\x7f\x85\x9b\x80\x9f\u2028\u2029\u202a\u202b\u202c\u202d\u202e" \
          "\u2066\u2067\u2068\u2069\u200e\u200f\u061c\ud800\udc80\udfff"
FORGED = "\nvzdump-hook: all stacks running"


def unsafe(c: str) -> str | None:
    """Why `c` may not be in a task-log line, or None."""
    if ("a" + c + "b").splitlines() != ["a" + c + "b"]:
        return "breaks the line"
    cat = unicodedata.category(c)
    if cat == "Cc":
        return "control character (C0, DEL, C1)"
    if cat == "Cs":
        return "lone surrogate"
    if unicodedata.bidirectional(c) in BIDI_CLASSES or c in BIDI_MARKS:
        return "bidi control"
    return None


def assert_safe_line(line: str) -> None:
    bad = [(f"U+{ord(c):04X}", why) for c in line if (why := unsafe(c))]
    assert not bad, (bad, line)


def test_the_oracle_knows_every_hostile_character() -> None:
    # the checks below cannot pass by not looking: each character of HOSTILE is caught by it
    assert [c for c in HOSTILE if unsafe(c) is None] == []
    assert [c for c in "az09 ~\\\"'%\u00e9\u00a0\u4e2d\U0001f600" if unsafe(c)] == []


@contextmanager
def task_log(level: int = logging.DEBUG) -> Iterator[io.StringIO]:
    """The hook's own Formatter on a logger under vzdump_hook, writing to a buffer."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(Formatter())
    logger = logging.getLogger("vzdump_hook.test_logs")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    raise_exceptions, logging.raiseExceptions = logging.raiseExceptions, False  # a formatting error fails the test
    try:
        handler.handleError = _reraise  # type: ignore[method-assign]
        yield out
    finally:
        logging.raiseExceptions = raise_exceptions
        logger.handlers[:], logger.level, logger.propagate = saved


def _reraise(record: logging.LogRecord) -> None:
    raise sys.exc_info()[1] or AssertionError("handleError without an exception")


def logged(*args: Any, **kwargs: Any) -> str:
    with task_log() as out:
        logging.getLogger("vzdump_hook.test_logs").warning(*args, **kwargs)
    text = out.getvalue()
    assert text.endswith("\n")
    return text[:-1]


# -- arguments of every type --------------------------------------------------------------------

hostile_text = st.lists(st.one_of(st.sampled_from(HOSTILE), st.characters(),
                                  st.sampled_from([FORGED, "\x1b[2J", "%s", "%(x)s", "\\x0a"])),
                        max_size=10).map("".join)


class Shouting:
    """An object whose str() and repr() are anything."""

    def __init__(self, s: str, r: str) -> None:
        self.s, self.r = s, r

    def __str__(self) -> str:
        return self.s

    def __repr__(self) -> str:
        return self.r


class Number(int):
    """A number (a subclass: `%d` takes it) that prints as anything."""

    text = ""

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__


class Real(float):
    text = ""

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__


@dataclasses.dataclass(frozen=True)
class Labelled:
    name: str
    labels: tuple[str, ...]


def _number(n: int, text: str) -> Number:
    x = Number(n)
    x.text = text
    return x


def _real(f: float, text: str) -> Real:
    x = Real(f)
    x.text = text
    return x


def _str_enum(text: str) -> enum.Enum:
    return enum.StrEnum("Hostile", {"A": text or "x"}).A  # type: ignore[attr-defined,no-any-return]


def _exception(cls: type[Exception], text: str) -> Exception:
    try:
        raise cls(text)
    except Exception as e:  # with a traceback, as a caught one has
        return e


texts = st.one_of(
    hostile_text,
    st.builds(lambda t: t.encode("utf-8", "surrogatepass"), hostile_text),
    st.builds(Shouting, hostile_text, hostile_text),
    st.builds(lambda t: JobId(t, t, 4242, 1), hostile_text),  # a marker's job, as hook.py logs it
    st.builds(Labelled, hostile_text, st.tuples(hostile_text, hostile_text)),
    st.lists(hostile_text, max_size=3),
    st.tuples(hostile_text, st.integers()),
    st.dictionaries(hostile_text, hostile_text, max_size=2),
    st.builds(_exception, st.sampled_from([ValueError, OSError, MarkerError, Exception]), hostile_text),
    st.builds(lambda t: TransportError("compose stop failed", command=t, stderr=t), hostile_text),
    st.builds(lambda t: ConfigError([t], t), hostile_text),  # one problem: one line
    st.builds(_str_enum, hostile_text),
    st.builds(PurePosixPath, hostile_text),
    st.none(),
)
numbers = st.one_of(
    st.integers(), st.floats(), st.booleans(),
    st.builds(_number, st.integers(-(2**40), 2**40), hostile_text),
    st.builds(_real, st.floats(allow_nan=False, allow_infinity=False, width=32), hostile_text),
)
TEXT_CONVERSIONS = ["%s", "%r", "%a", "%-20s", "%.5s"]
NUMBER_CONVERSIONS = TEXT_CONVERSIONS + ["%d", "%i", "%5d", "%.1f", "%g", "%e"]


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, tuple[Any, ...], list[str]]:
    """A template with one conversion per argument, its arguments, and what each must show as."""
    parts, args, shown = ["guest 101:"], [], []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            a = draw(numbers)
            conv = draw(st.sampled_from(NUMBER_CONVERSIONS))
            if conv in ("%d", "%i", "%5d") and isinstance(a, float) and not math.isfinite(a):
                conv = "%s"  # "%d" % inf raises, as it should
            if type(a) in (int, float, bool):
                expect: str | None = conv % (a,)  # a plain number shows as itself
            elif conv == "%s":
                expect = escape(str(a))
            elif conv == "%r":
                expect = escape(repr(a))
            elif conv in TEXT_CONVERSIONS:
                expect = None
            else:  # a number's subclass: its value, whatever it prints as
                expect = conv % (int(a) if isinstance(a, int) else float(a),)
        else:
            a = draw(texts)
            conv = draw(st.sampled_from(TEXT_CONVERSIONS))
            expect = escape(str(a)) if conv == "%s" else escape(repr(a)) if conv == "%r" else None
        parts.append(conv)
        args.append(a)
        if expect is not None:
            shown.append(expect)
    return " ".join(parts), tuple(args), shown


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls())
def test_any_argument_of_any_type_leaves_one_safe_line(call: tuple[str, tuple[Any, ...], list[str]]) -> None:
    template, args, shown = call
    line = logged(template, *args)
    assert line.startswith("vzdump-hook: WARNING: guest 101: ")
    assert "\n" not in line
    assert_safe_line(line)
    for s in shown:  # nothing is lost: each argument is there, escaped
        assert s in line, (s, line)


@settings(max_examples=200, deadline=None)
@given(hostile_text, st.one_of(texts, numbers))
def test_mapping_arguments_are_escaped_too(name: str, value: Any) -> None:
    line = logged("%(vmid)d %(name)s %(value)r", {"vmid": 101, "name": name, "value": value})
    assert line.startswith("vzdump-hook: WARNING: 101 " + escape(name) + " ")
    assert "\n" not in line
    assert_safe_line(line)


@settings(max_examples=200, deadline=None)
@given(texts)
def test_a_message_passed_without_a_template_is_escaped(msg: Any) -> None:
    line = logged(msg)
    assert "\n" not in line
    assert_safe_line(line)
    assert line == f"vzdump-hook: WARNING: {escape(str(msg))}"


def test_numbers_stay_numbers() -> None:
    assert logged("%d %.1f %s %r %x %5.2f", 101, 2.25, 7, 0.5, 255, 1) == "vzdump-hook: WARNING: 101 2.2 7 0.5 ff  1.00"

    class Step(enum.IntEnum):
        ONE = 1

    assert logged("%d %s %r", Step.ONE, Step.ONE, Step.ONE) == "vzdump-hook: WARNING: 1 1 <Step.ONE: 1>"
    assert logged("%d s, %.1f", _number(3, "\n3"), _real(1.5, "\x1b")) == "vzdump-hook: WARNING: 3 s, 1.5"


def test_text_is_refused_where_a_number_is_wanted_as_without_escaping() -> None:
    for template, arg in (("%d", "5"), ("%.1f", "1.5"), ("%d", b"5"), ("%x", 1.5)):
        try:
            template % (arg,)
        except TypeError:
            pass
        else:
            raise AssertionError(f"{template} % {arg!r} formats: the case below proves nothing")
        with task_log() as out:
            try:
                logging.getLogger("vzdump_hook.test_logs").warning(template, arg)
            except TypeError:
                continue
        raise AssertionError(f"{template} % {arg!r} logged: {out.getvalue()!r}")


@settings(max_examples=100, deadline=None)
@given(st.lists(hostile_text, min_size=2, max_size=4), hostile_text)
def test_a_config_error_keeps_its_problems_on_their_own_lines_each_escaped(problems: list[str], source: str) -> None:
    text = logged("config: %s", ConfigError(problems, source))
    first, *rest = text.split("\n")
    where = f"{escape(source)}: " if source else ""
    assert first == f"vzdump-hook: WARNING: config: {where}{len(problems)} problems"
    assert rest == [f"  {escape(p)}" for p in problems]  # no problem can start a line of its own
    for line in text.split("\n"):
        assert_safe_line(line)


@settings(max_examples=100, deadline=None)
@given(hostile_text, st.booleans())
def test_a_traceback_is_indented_and_escaped(text: str, stack: bool) -> None:
    try:
        raise OSError(FORGED + text)
    except OSError:
        with task_log() as out:
            logging.getLogger("vzdump_hook.test_logs").debug("%s: traceback", text, exc_info=True, stack_info=stack)
    first, *rest = out.getvalue()[:-1].split("\n")
    assert first == f"vzdump-hook: {escape(text)}: traceback"
    assert rest[0] == "  Traceback (most recent call last):"
    assert any(ln.startswith("  OSError: ") for ln in rest)
    assert ("  Stack (most recent call last):" in rest) is stack
    for line in [first, *rest]:
        assert_safe_line(line)
    assert all(ln.startswith("  ") for ln in rest)  # no line of it passes for a line of ours
    # the exception's own line break, indented
    assert any(ln.startswith("  vzdump-hook: all stacks running") for ln in rest)


def test_exception_logs_the_traceback_and_a_bare_exc_info_nothing() -> None:
    try:
        raise ValueError("\x1b[31mred\u202e")
    except ValueError:
        with task_log() as out:
            logging.getLogger("vzdump_hook.test_logs").exception("failed")
    assert out.getvalue().splitlines()[-1] == "  ValueError: \\x1b[31mred\\u202e"
    assert logged("no exception here", exc_info=True) == "vzdump-hook: WARNING: no exception here"


# -- every logging call in the package: the template is ours, what varies is an argument ------------

LOG_METHODS = {"debug", "info", "warning", "warn", "error", "exception", "critical", "fatal", "log"}
LOGGER = re.compile(r"(?:^|\.)(?:_?log|_?logger|logging|LOG)$")
CONVERSION = re.compile(r"%(?:\((?P<key>[^)]*)\))?[#0 +-]*(?:\*|\d+)?"
                        r"(?:\.(?:\*|\d+))?[hlL]?(?P<type>[diouxXeEfFgGcrsa%])")


def _is_logger(node: ast.expr) -> bool:
    if isinstance(node, ast.Call):  # logging.getLogger(...).warning(...)
        return isinstance(node.func, ast.Attribute) and node.func.attr == "getLogger"
    return isinstance(node, ast.Name | ast.Attribute) and bool(LOGGER.search(ast.unparse(node)))


def logging_calls(source: str) -> Iterator[tuple[int, ast.Call, ast.expr | None, list[ast.expr]]]:
    """(line, call, template, arguments after it) for every logging call in `source`."""
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LOG_METHODS
                and _is_logger(node.func.value)):
            args = node.args[1:] if node.func.attr == "log" else node.args
            yield node.lineno, node, (args[0] if args else None), args[1:]


def problems(source: str) -> list[str]:
    """What is wrong with the logging calls in `source`: a template that is not a literal string,
    holds a control character or %c, or whose conversions do not match its arguments."""
    bad = []
    for line, call, template, rest in logging_calls(source):
        if not (isinstance(template, ast.Constant) and isinstance(template.value, str)):
            bad.append(f"{line}: the template is not a literal string: {ast.unparse(call)[:120]}")
            continue
        text = template.value
        convs = [m for m in CONVERSION.finditer(text) if m["type"] != "%"]
        if escape(text) != text:
            bad.append(f"{line}: the template holds a control character: {text!r}")
        if any(m["type"] == "c" for m in convs):
            bad.append(f"{line}: %c turns a number into a character: {text!r}")
        if any(isinstance(a, ast.Starred) for a in rest) or any(m["key"] is not None for m in convs):
            continue
        if len(convs) != len(rest):
            bad.append(f"{line}: {len(convs)} conversion(s), {len(rest)} argument(s): {ast.unparse(call)[:120]}")
    return bad


def test_every_logging_call_has_a_literal_template_and_passes_the_rest_as_arguments() -> None:
    found, bad = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        where, source = str(path.relative_to(PACKAGE.parent)), path.read_text()
        found += [(where, ast.unparse(call)) for _, call, _, _ in logging_calls(source)]
        bad += [f"{where}:{p}" for p in problems(source)]
    assert not bad, "\n".join(bad)
    # the scan sees the calls it is about (it cannot pass by finding none)
    assert len(found) > 80, found
    assert any(w == "vzdump_hook/phase/preflight.py" and "marker left by job" in c for w, c in found)
    assert any(w == "vzdump_hook/phase/handover.py" and c.startswith("log.log(level,") for w, c in found)
    assert {"/".join(w.split("/")[1:3]) for w, _ in found} >= {
        "phase/quiesce.py", "resident/daemon.py", "node/report.py", "guest/recovery.py", "stacks/container.py",
        "transports/base.py",
    }


def test_the_scan_reports_what_it_is_for() -> None:
    src = """
log.warning(f"guest {vmid}: {text}")
log.log(level, text)
logger.info("%s %s", a)
logging.getLogger(__name__).error("%c", n)
self.log.debug("a\\nb")
log.info("%(a)s %d%%", {"a": 1})
log.info("%s: %5.1f s", *pair)
log.debug("%s %-3d %r", a, b, c)
"""
    assert [p.split(":")[0] for p in problems(src)] == ["2", "3", "4", "5", "6"]
    assert [m["type"] for m in CONVERSION.finditer("%(a)s %-5.1f %% %c %r")] == ["s", "f", "%", "c", "r"]
