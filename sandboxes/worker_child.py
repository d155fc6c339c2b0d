"""What runs in the processes the worker forks: a snippet, a program, the stateful kernel.

Part of the warm worker (`worker.py`), shipped with it as one program (`pool.worker_source`), so
standard library only. Kept apart because everything here runs after the fork, in a process
the snippet's code controls (or shares, for the kernel), with the limits and descriptors the
worker set up for it: nothing it sends back is trusted (`worker_wire`). The /proc process tree
(`children_map`, `descendants`) is here because the kernel sweeps its own children with it;
the worker's sweep uses it too.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import math
import os
import resource
import signal
import sys
import time
import traceback

from turnrl.sandboxes.worker_wire import KERNEL_CMD_FD, REPORT_FD, read_frame

ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "TMPDIR": "/tmp"}
"""The environment of the worker and of all it runs; `worker.main` points HOME and TMPDIR at
the private folder when there is no sandbox (the subprocess backend)."""


def children_map() -> dict[int, list[int]]:
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
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def descendants(root: int, kids: dict[int, list[int]]) -> list[int]:
    out, todo = [], list(kids.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def kernel_loop() -> None:
    namespace: dict[str, object] = {"__name__": "__main__", "__builtins__": builtins}
    while True:
        frame = read_frame(KERNEL_CMD_FD)
        if frame is None:
            os._exit(0)
        req = json.loads(frame)
        used = resource.getrusage(resource.RUSAGE_SELF)
        soft = math.ceil(used.ru_utime + used.ru_stime + req["cpu_s"])
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
        rep = execute(req["code"], namespace)
        end_children()
        rep["seq"] = req["seq"]
        os.write(REPORT_FD, json.dumps(rep).encode() + b"\n")


def end_children() -> None:
    """Kill what a stateful snippet left and reap it here: only a parent can reap its
    children, and the worker's sweep would leave them zombies holding the sandbox's pids."""
    for _ in range(200):
        left = descendants(os.getpid(), children_map())
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        if not left:
            return
        time.sleep(0.001)


def execute(code: str, namespace: dict[str, object]) -> dict[str, object]:
    """Run `code` as `__main__`; print a traceback (without the worker's frames) on error."""
    try:
        exec(compile(code, "<snippet>", "exec"), namespace)
        rep: dict[str, object] = {"completed": True}
    except BaseException as e:  # SystemExit and KeyboardInterrupt are the snippet's end too
        if isinstance(e, SystemExit) and e.code in (None, 0):
            rep = {"completed": False, "exception": f"SystemExit: {e.code}"}
        else:
            tb = e.__traceback__.tb_next if e.__traceback__ else None
            with contextlib.suppress(BaseException):
                traceback.print_exception(type(e), e, tb)
            rep = {"completed": False, "exception": f"{type(e).__name__}: {e}"[:2000]}
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    return rep


def run_snippet(code: str) -> None:
    rep = execute(code, {"__name__": "__main__", "__builtins__": builtins})
    os.write(REPORT_FD, json.dumps(rep).encode() + b"\n")
    os._exit(0)


def exec_program(argv: list[str]) -> None:
    try:
        os.execvpe(argv[0], argv, ENV)
    except OSError as e:
        os.write(2, f"cannot run {argv[0]!r}: {e.strerror}\n".encode())
        os._exit(127)
