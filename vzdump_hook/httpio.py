"""HTTP requests with one deadline and a size cap: a peer (a guest's controller, a `ready` URL, the PVE
API carrying a guest's output, a webhook receiver) cannot make the node wait or read without limit.

`requests` bounds each socket read, not the request: an answer trickled a byte at a time keeps a 3 s
request going for minutes, and `response.content` reads the whole body before anyone can cut it. Here
the body is streamed and the read stops at `cap` bytes, and a timer shuts the request's sockets down
at the deadline, whatever phase it is in (connect, TLS, headers, body). The sockets are found through
the connection classes of the session's adapter (urllib3 1.26 of Debian 12 and 2.x alike): each
registers the socket it opens, or reuses, with the request running in its thread.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from .errors import HookError

CHUNK = 64 * 1024


class TooLarge(HookError):
    """The answer is longer than the cap: the message names the source and the cap."""


class DeadlineExceeded(HookError):
    """The whole request took longer than its deadline: the message names the source and the time."""


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str
    body: bytes


class _Watch:
    """The sockets of the request running in one thread, shut down when its deadline passes."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.expired = False

    def add(self, sock: Any) -> None:
        if not isinstance(sock, socket.socket):
            return
        with self.lock:
            self.sockets.append(sock)
            if self.expired:
                _shut(sock)

    def expire(self) -> None:
        with self.lock:
            self.expired = True
            for sock in self.sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # wakes a read blocked in another thread; close() would not


_current = threading.local()


def _register(sock: Any) -> None:
    watch = getattr(_current, "watch", None)
    if watch is not None:
        watch.add(sock)


def _watched(cls: type) -> type:
    """A subclass of urllib3's connection class `cls` whose sockets the running request's watch knows."""

    class Watched(cls):  # type: ignore[misc]
        def _new_conn(self) -> Any:
            sock = super()._new_conn()
            _register(sock)
            return sock

        def request(self, *args: Any, **kwargs: Any) -> Any:
            _register(getattr(self, "sock", None))  # a kept-alive connection opens no socket
            return super().request(*args, **kwargs)

    Watched.__name__ = f"Watched{cls.__name__}"
    return Watched


@functools.cache
def _pool_classes() -> dict[str, type]:
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class Pool(HTTPConnectionPool):
        ConnectionCls = _watched(HTTPConnection)

    class TlsPool(HTTPSConnectionPool):
        ConnectionCls = _watched(HTTPSConnection)

    return {"http": Pool, "https": TlsPool}


def mount(session: Any, adapter: Any | None = None) -> Any:
    """Mount `adapter` (default: a requests HTTPAdapter without retries) on `session` for http and https,
    with connection classes that the deadline can reach. Returns the session."""
    if adapter is None:
        from requests.adapters import HTTPAdapter

        adapter = HTTPAdapter(max_retries=0)
    adapter.poolmanager.pool_classes_by_scheme = _pool_classes()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def request(session: Any, method: str, url: str, *, timeout: float, cap: int, source: str,
            connect_timeout: float = 5.0, body: bool = True, **kwargs: Any) -> Answer:
    """`method url` through `session` (prepared with mount()), the whole of it within `timeout` seconds,
    its body read up to `cap` bytes (`body=False`: not read at all, only the status counts).

    Raises DeadlineExceeded and TooLarge (naming `source`), and requests' own exceptions for what fails
    before the deadline (refused, TLS, ...)."""
    timeout = max(0.05, timeout)
    deadline = time.monotonic() + timeout
    headers = {"Accept-Encoding": "identity", **kwargs.pop("headers", {})}  # a compressed answer is not unpacked
    watch = _Watch()
    timer = threading.Timer(timeout, watch.expire)
    timer.daemon = True
    _current.watch = watch
    timer.start()
    resp = None
    try:
        try:
            resp = session.request(method, url, headers=headers, stream=True, allow_redirects=False,
                                   timeout=(min(connect_timeout, timeout), timeout), **kwargs)
            data = _body(resp, cap, deadline, source) if body else b""
        except TooLarge:
            raise
        except Exception:
            if watch.expired or time.monotonic() > deadline:
                raise DeadlineExceeded(f"{source}: no whole answer within {timeout:.1f} s") from None
            raise
        if watch.expired or time.monotonic() > deadline:
            raise DeadlineExceeded(f"{source}: no whole answer within {timeout:.1f} s")
        return Answer(resp.status_code, resp.reason or "", bytes(data))
    finally:
        timer.cancel()
        _current.watch = None
        if resp is not None:
            resp.close()


def _body(resp: Any, cap: int, deadline: float, source: str) -> bytes:
    """The body of `resp`, as it came (a compressed one is not unpacked), up to `cap` bytes."""
    import requests
    import urllib3.exceptions

    data = bytearray()
    try:
        for chunk in resp.raw.stream(CHUNK, decode_content=False):
            data += chunk
            if len(data) > cap:
                raise TooLarge(f"{source}: the answer is longer than {_size(cap)}: not read further")
            if time.monotonic() > deadline:
                break
    except urllib3.exceptions.HTTPError as e:  # as requests' own reading reports them: a broken answer
        raise requests.exceptions.ChunkedEncodingError(f"{source}: {e}") from None
    return bytes(data)


def _size(n: int) -> str:
    mib = 1024 * 1024
    if n >= mib and n % mib == 0:
        return f"{n // mib} MiB"
    return f"{n // 1024} KiB" if n >= 1024 and n % 1024 == 0 else f"{n} bytes"


__all__ = ["Answer", "DeadlineExceeded", "TooLarge", "mount", "request"]
