"""The `subprocess` backend's supervisor: a child subreaper above each worker, so that nothing a
snippet starts outlives the worker, even when the snippet kills the worker itself.

The worker is a subreaper too and sweeps what each call leaves, but a snippet runs as the same
user and can SIGKILL it; its orphans (a daemon that double-forked, setsid and exec'd, which
carries no run tag) would then be re-parented to the host's init and live on. Under this
supervisor they are re-parented to it instead: when the worker exits, however it exits, the
supervisor kills every process left below it, reaps them, and exits.

It holds no part of the protocol: the worker inherits stdin and stdout straight from the host,
and the supervisor points its own copies at /dev/null before it waits, so the host sees the
channel close as soon as the worker is gone. It dies with the trainer (parent-death signal
SIGTERM, on which it kills the tree first; the signal follows the trainer's thread that started
it, the event loop's), and the worker dies with it (SIGKILL).

Standard library only, nothing from turnrl: the host passes this file's source with
`python -I -c`. Usage: `supervisor --parent=PID [--join=CGROUP_PROCS]... -- WORKER ARGV...`
(`--join`: write its pid into that cgroup's `cgroup.procs` before the worker starts).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
SWEEP_S = 10.0
"""How long the final sweep keeps killing (a fork bomb races its first passes)."""


class Shutdown(Exception):
    """SIGTERM: the trainer died (the parent-death signal), or someone asked it to stop."""


def _shutdown(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Shutdown


def _prctl(libc: ctypes.CDLL, option: int, value: int) -> None:
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}, {value})")


def _descendants() -> list[int]:
    """Every process below this one, zombies included (by parent pid, from /proc)."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after the last ')'.
        kids.setdefault(int(stat[stat.rindex(b")") + 2 :].split()[1]), []).append(int(name))
    out, todo = [], list(kids.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] != 0:
            pass


def end_tree() -> None:
    """SIGKILL and reap everything below this process until nothing is left."""
    deadline = time.monotonic() + SWEEP_S
    while (victims := _descendants()) and time.monotonic() < deadline:
        for pid in victims:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.001)
        _reap()


def main() -> None:
    split = sys.argv.index("--")
    options, program = sys.argv[1:split], sys.argv[split + 1 :]
    parent = next(int(o.removeprefix("--parent=")) for o in options if o.startswith("--parent="))
    joins = [o.removeprefix("--join=") for o in options if o.startswith("--join=")]
    libc = ctypes.CDLL(None, use_errno=True)
    signal.signal(signal.SIGTERM, _shutdown)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _prctl(libc, PR_SET_CHILD_SUBREAPER, 1)
    _prctl(libc, PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the trainer died before the signal was armed
        return
    for procs in joins:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    me = os.getpid()
    worker = os.fork()
    if worker == 0:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _prctl(libc, PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() == me:
                os.execvp(program[0], program)
        finally:
            os._exit(127)
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.close(devnull)
        while os.waitpid(-1, 0)[0] != worker:
            pass
    except (Shutdown, ChildProcessError):
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    end_tree()


if __name__ == "__main__":
    main()
