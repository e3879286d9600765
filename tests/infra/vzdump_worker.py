"""The vzdump worker of one simulated job (tests/infra/vzdump.py): the process whose children all of
that job's hooks are, as all hooks of a real job are children of its one vzdump worker. Being its
own process (not pytest), it can be SIGKILLed between two hooks, and the hooks then see their job
is over (their parent is gone).

Protocol on the SOCK_SEQPACKET socket whose fd is its argument (one message per packet):
    request:  JSON {"argv": [...], "env": {...}} with two file descriptors (the hook's stdout and
              stderr) as SCM_RIGHTS
    replies:  JSON {"pid": N}, or {"error": "strerror"} when it could not be started; then, once the
              hook has ended, {"pid": N, "status": S} (S as subprocess's returncode: -N for a signal)
The hook is started with stdin /dev/null, in its own session, in the worker's working directory.
"""

from __future__ import annotations

import array
import json
import os
import socket
import sys


def serve(sock: socket.socket) -> None:
    while True:
        fds = array.array("i")
        data, ancdata, _, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(2 * fds.itemsize))
        if not data:
            return  # the stand-in is gone: so is the job
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        out, err = fds[0], fds[1]
        req = json.loads(data)
        try:
            pid = os.posix_spawn(
                req["argv"][0], req["argv"], req["env"], setsid=True,
                file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                              (os.POSIX_SPAWN_DUP2, out, 1), (os.POSIX_SPAWN_DUP2, err, 2)],
            )
        except OSError as e:
            sock.send(json.dumps({"error": e.strerror or str(e)}).encode())
            continue
        finally:
            os.close(out)
            os.close(err)
        sock.send(json.dumps({"pid": pid}).encode())
        _, status = os.waitpid(pid, 0)
        sock.send(json.dumps({"pid": pid, "status": os.waitstatus_to_exitcode(status)}).encode())


if __name__ == "__main__":
    s = socket.socket(fileno=int(sys.argv[1]))
    s.set_inheritable(False)
    try:
        serve(s)
    except (BrokenPipeError, ConnectionResetError):
        pass
    sys.exit(0)
