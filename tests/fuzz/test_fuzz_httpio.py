"""Fuzz the bounded HTTP reads (vzdump_hook/httpio.py) with servers that answer in random hostile
ways: random head and body split into random pieces with random pauses, a Content-Length that lies
or is missing, chunked encoding, an early close. Whatever the server does, a request ends with the
whole body (when it fits the cap and came in time), TooLarge (over the cap), DeadlineExceeded (over
the time) or one of requests' own errors, never later than its timeout plus a small margin, and never
with more than the cap in hand."""

from __future__ import annotations

import socket
import threading
import time

import requests
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.profile import budget
from vzdump_hook import httpio

TIMEOUT = 0.6
CAP = 4096


def serve_once(pieces: list[tuple[bytes, float]]) -> tuple[socket.socket, threading.Thread]:
    listener = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        try:
            listener.settimeout(5)
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            try:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                for piece, pause in pieces:
                    time.sleep(pause)
                    conn.sendall(piece)
            except OSError:
                pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return listener, t


@st.composite
def answers(draw: st.DrawFn) -> tuple[list[tuple[bytes, float]], bytes, bool]:
    """(pieces the server sends, the body it means, whether the head is well-formed with a true length)."""
    body = draw(st.binary(max_size=3 * CAP))
    style = draw(st.sampled_from(["length", "lying-length", "close", "chunked"]))
    if style == "length":
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        wire = head + body
    elif style == "lying-length":
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body) + draw(st.integers(1, 100))}\r\n\r\n".encode()
        wire = head + body
    elif style == "close":
        wire = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body
    else:
        wire = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                + (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n")
    cuts = sorted(draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    bounds = [0, *cuts, len(wire)]
    pauses = draw(st.lists(st.sampled_from([0.0, 0.0, 0.01, 0.05, 0.2]), min_size=len(bounds) - 1,
                           max_size=len(bounds) - 1))
    pieces = [(wire[a:b], p) for (a, b), p in zip(zip(bounds, bounds[1:], strict=False), pauses, strict=True)]
    return pieces, body, style in ("length", "close", "chunked")


@budget(40)
@given(answers())
def test_a_request_ends_in_time_with_the_body_or_a_named_error(
        answer: tuple[list[tuple[bytes, float]], bytes, bool]) -> None:
    pieces, body, honest = answer
    listener, thread = serve_once(pieces)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/x"
    start = time.monotonic()
    try:
        with requests.Session() as s:
            s.trust_env = False
            httpio.mount(s)
            try:
                got = httpio.request(s, "GET", url, timeout=TIMEOUT, cap=CAP, source="fuzz")
                outcome = "ok"
            except httpio.TooLarge as e:
                assert "fuzz: the answer is longer than 4 KiB" in str(e)
                outcome = "large"
            except httpio.DeadlineExceeded as e:
                assert f"fuzz: no whole answer within {TIMEOUT:.1f} s" in str(e)
                outcome = "late"
            except requests.RequestException:
                outcome = "error"
        took = time.monotonic() - start
        assert took < TIMEOUT + 0.5, took
        total_pause = sum(p for _, p in pieces)
        if outcome == "ok":
            assert len(got.body) <= CAP and got.status == 200
            if honest:
                assert got.body == body
        if honest and len(body) <= CAP and total_pause < TIMEOUT / 3:
            assert outcome == "ok", outcome
        if honest and len(body) > CAP and total_pause < TIMEOUT / 3:
            assert outcome == "large", outcome
    finally:
        listener.close()
        thread.join(6)
