"""The warm worker: a small server that runs *inside* a sandbox and forks a child per call.

It is started once per sandbox (by bubblewrap, inside a container, or as a plain process) with
the sandbox's own Python, and must therefore use the standard library only and import nothing
from turnrl: the host passes its source with `python3 -c`, this module's together with the two
it imports (`worker_wire`: the formats on its descriptors; `worker_child`: what runs in the
processes it forks), joined into one program (`pool.worker_source`). This module is the worker
process itself: its startup, the request loop, and the supervision of every call's processes.

Requests arrive on stdin and replies leave on stdout as frames (`worker_wire`), both kept on
private descriptors; fds 0-2 are pointed at /dev/null so that nothing the worker or a child
prints can corrupt the stream. Requests:

- `{"op": "ping"}` -> `{"pong": true}`; `{"op": "exit"}` kills everything and exits;
- `{"op": "exec", "code": ..., "stateful": bool, "limits": {...}}`: a Python snippet, in a child
  forked for the call (stateless) or in the session's long-lived interpreter (stateful);
- `{"op": "run", "argv": [...], "stdin": base64, "limits": {...}}`: a program.

Every request carries an `id` that its reply echoes, so a reply that is not the answer to the
request just sent (a stream out of step) is recognised by the host. Only this process holds the
channel: it is the sandbox's pid 1 (bwrap `--as-pid-1`, docker without `--init`), keeps the
pipes on private descriptors, and is not dumpable, so no code it runs can open, ptrace or
inherit them; the host also caps and checks every reply (`turnrl.sandboxes.pool`).

After every call the worker kills every process the call left behind (it is a child
subreaper, so daemonised grandchildren are re-parented to it and found), and reaps zombies.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import functools
import json
import math
import os
import resource
import select
import signal
import sys
import time

from turnrl.sandboxes.worker_child import (
    ENV,
    children_map,
    descendants,
    exec_program,
    kernel_loop,
    run_snippet,
)
from turnrl.sandboxes.worker_wire import (
    KERNEL_CMD_FD,
    REPORT_BYTES,
    REPORT_FD,
    Capture,
    ReportLines,
    parse_report,
    read_frame,
    write_frame,
)

PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2


def install_seccomp(program: bytes) -> None:
    """Load a classic-BPF seccomp filter (an array of 8-byte `struct sock_filter`, as the host
    built it with libseccomp: `turnrl.sandboxes.seccomp`) on this process; every process it
    forks afterwards inherits it and cannot remove it. `no_new_privs` first, which loading a
    filter without CAP_SYS_ADMIN requires (and which bars setuid gains anyway)."""
    if not program or len(program) % 8:
        raise ValueError(
            f"a seccomp program is a non-empty array of 8-byte entries, got {len(program)} bytes"
        )

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    buf = ctypes.create_string_buffer(program, len(program))
    prog = SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_char_p))
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


class Worker:
    def __init__(self, in_fd: int, out_fd: int, pidns: bool, rlimit_as: bool) -> None:
        self.in_fd, self.out_fd, self.pidns = in_fd, out_fd, pidns
        self.rlimit_as = rlimit_as
        """No cgroup bounds memory: cap each child's address space instead."""
        self.devnull = os.open(os.devnull, os.O_RDWR)
        self.kernel: Kernel | None = None
        self.exited: dict[int, int] = {}
        self.cpu_seen = 0.0

    # --- process bookkeeping ------------------------------------------------------------

    def reap(self) -> None:
        """Collect every exited child (zombies of re-parented orphans included)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.exited[pid] = status

    def sweep(self, keep_kernel: bool) -> None:
        """SIGKILL everything a call left behind, until nothing is left (a fork bomb races
        the first passes; the pids limit bounds it)."""
        keep = {os.getpid(), 1}
        if keep_kernel and self.kernel is not None:
            keep.add(self.kernel.pid)
        for _ in range(200):
            kids = children_map()
            # Descendants of the kernel are a snippet's leftovers too: only the kernel stays.
            victims = {p for p in descendants(os.getpid(), kids) if p not in keep}
            if self.pidns:  # in our own pid namespace nothing else may live
                victims |= {p for ps in kids.values() for p in ps if p not in keep}
            if not victims:
                break
            for pid in victims:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.001)
            self.reap()
        self.reap()

    def limit_memory(self, limits: dict[str, float]) -> None:
        if self.rlimit_as:
            size = int(limits["memory_mb"]) * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (size, size))

    # --- calls --------------------------------------------------------------------------

    def serve(self) -> None:
        while True:
            frame = read_frame(self.in_fd)
            if frame is None:
                return
            req = json.loads(frame)
            op = req.get("op")
            call_id = req.get("id")
            if op == "ping":
                resp: dict[str, object] = {"pong": True}
            elif op == "exit":
                if self.kernel is not None:
                    self.kernel.kill(self)
                    self.kernel = None
                self.sweep(keep_kernel=False)
                write_frame(self.out_fd, {"bye": True, "id": call_id})
                return
            elif op == "exec" and req.get("stateful"):
                resp = self.exec_stateful(req["code"], req["limits"])
            elif op == "exec":
                resp = self.spawn(functools.partial(run_snippet, req["code"]), req["limits"], b"")
            elif op == "run":
                argv = req["argv"]
                stdin = base64.b64decode(req.get("stdin", ""))
                resp = self.spawn(functools.partial(exec_program, argv), req["limits"], stdin)
            else:
                resp = {"error": f"unknown op {op!r}"}
            resp["id"] = call_id
            write_frame(self.out_fd, resp)

    def spawn(self, target: object, limits: dict[str, float], stdin: bytes) -> dict[str, object]:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        rep_r, rep_w = os.pipe()
        stdin_fd = self.devnull
        if stdin:
            stdin_fd = os.memfd_create("stdin")
            os.write(stdin_fd, stdin)
            os.lseek(stdin_fd, 0, os.SEEK_SET)
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child
            try:
                os.setsid()
                os.dup2(stdin_fd, 0)
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                os.dup2(rep_w, REPORT_FD)
                os.closerange(REPORT_FD + 1, 1 << 16)
                cpu = max(1, math.ceil(limits["cpu_s"]))
                resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
                self.limit_memory(limits)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGPIPE, signal.SIG_DFL)
                target()  # type: ignore[operator]
            finally:
                os._exit(127)
        for fd in (out_w, err_w, rep_w):
            os.close(fd)
        if stdin_fd != self.devnull:
            os.close(stdin_fd)
        resp = self.collect(pid, out_r, err_r, rep_r, limits, t0)
        self.sweep(keep_kernel=True)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        used = usage.ru_utime + usage.ru_stime
        # The call's leftovers were reaped by the sweep: their CPU time is this call's too.
        call_cpu = resp["cpu_s"]
        assert isinstance(call_cpu, float)
        resp["cpu_s"] = call_cpu + used - self.cpu_seen
        self.cpu_seen = used
        return resp

    def collect(
        self, pid: int, out_r: int, err_r: int, rep_r: int, limits: dict[str, float], t0: float
    ) -> dict[str, object]:
        """Read a child's output until it exits or the wall limit passes."""
        out, err = Capture(int(limits["output_bytes"])), Capture(int(limits["output_bytes"]))
        report = bytearray()
        pidfd = os.pidfd_open(pid)
        streams = {out_r: out, err_r: err}
        open_fds = [out_r, err_r, rep_r, pidfd]
        deadline = t0 + limits["wall_s"]
        timed_out = False
        status = None
        while status is None:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                break
            ready, _, _ = select.select(open_fds, [], [], left)
            for fd in ready:
                if fd == pidfd:
                    _, status = os.waitpid(pid, 0)
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    open_fds.remove(fd)
                elif fd == rep_r:
                    report += chunk[: REPORT_BYTES - len(report)]
                else:
                    streams[fd].feed(chunk)
        wall = time.monotonic() - t0
        # What the child wrote before it exited is in the pipes; leftovers still writing are
        # about to be killed, so take only what is there now.
        for fd in (out_r, err_r, rep_r):
            os.set_blocking(fd, False)
            while fd in open_fds:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                if fd == rep_r:
                    report += chunk[: REPORT_BYTES - len(report)]
                else:
                    streams[fd].feed(chunk)
        for fd in (out_r, err_r, rep_r, pidfd):
            os.close(fd)
        return self.result(status, out, err, bytes(report), timed_out, wall, pid, limits)

    def result(
        self,
        status: int,
        out: Capture,
        err: Capture,
        report: bytes,
        timed_out: bool,
        wall: float,
        pid: int,
        limits: dict[str, float],
    ) -> dict[str, object]:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = usage.ru_utime + usage.ru_stime
        cpu_delta, self.cpu_seen = cpu - self.cpu_seen, cpu
        code = sig = None
        if os.WIFEXITED(status):
            code = os.WEXITSTATUS(status)
        elif os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_delta >= limits["cpu_s"]):
            timed_out = True
        rep = parse_report(report)
        return {
            "stdout": out.dump(),
            "stderr": err.dump(),
            "exit_code": code,
            "signal": sig,
            "timed_out": timed_out,
            "wall_s": wall,
            "cpu_s": cpu_delta,
            "completed": bool(rep.get("completed")) and code == 0 and not timed_out,
            "exception": rep.get("exception"),
        }

    def limit_memory_of(self, pid: int, limits: dict[str, float]) -> None:
        if self.rlimit_as:
            size = int(limits["memory_mb"]) * 1024 * 1024
            resource.prlimit(pid, resource.RLIMIT_AS, (size, size))

    # --- the stateful interpreter -------------------------------------------------------

    def exec_stateful(self, code: str, limits: dict[str, float]) -> dict[str, object]:
        lost_before = self.kernel is not None and not self.kernel.alive()
        if lost_before and self.kernel is not None:
            self.kernel.kill(self)  # died between calls (a thread called os._exit, say)
        if self.kernel is None or lost_before:
            self.kernel = Kernel.start(self)
        k = self.kernel
        if k.calls == 0:
            self.limit_memory_of(k.pid, limits)
        k.calls += 1
        out, err = Capture(int(limits["output_bytes"])), Capture(int(limits["output_bytes"]))
        t0 = time.monotonic()
        write_frame(k.cmd_w, {"code": code, "cpu_s": limits["cpu_s"], "seq": k.calls})
        streams = {k.out_r: out, k.err_r: err}
        lines = ReportLines(k.calls)
        deadline = t0 + limits["wall_s"]
        timed_out = interrupted = dead = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                if not interrupted:
                    # Like a notebook: interrupt first, so the variables survive.
                    timed_out = interrupted = True
                    os.kill(k.pid, signal.SIGINT)
                    deadline = time.monotonic() + 0.5
                    continue
                dead = True
                break
            ready, _, _ = select.select([k.out_r, k.err_r, k.rep_r, k.pidfd], [], [], left)
            if k.pidfd in ready:
                dead = True
                break
            for fd in ready:
                chunk = os.read(fd, 65536)
                if fd == k.rep_r:
                    lines.feed(chunk)
                elif chunk:
                    streams[fd].feed(chunk)
            if lines.found is not None:
                break
        k.drain(streams)
        wall = time.monotonic() - t0
        # Billed from the end of the last call: what background threads burnt in between is
        # this call's too (the kernel's soft RLIMIT_CPU bounds it; see `kernel_loop`).
        cpu_now = k.cpu()
        cpu, k.billed = max(cpu_now - k.billed, 0.0), cpu_now
        threads = 0 if dead else k.threads() - 1
        exit_code = sig = None
        if dead:
            status = k.kill(self)
            if os.WIFEXITED(status):
                exit_code = os.WEXITSTATUS(status)
            elif os.WIFSIGNALED(status):
                sig = os.WTERMSIG(status)
            if sig == signal.SIGXCPU:
                timed_out = True
            self.kernel = None
        rep = (
            parse_report(lines.found or b"")
            if not dead
            else {"completed": False, "exception": None}
        )
        self.sweep(keep_kernel=True)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu_seen = usage.ru_utime + usage.ru_stime
        return {
            "stdout": out.dump(),
            "stderr": err.dump(),
            "exit_code": exit_code if dead else 0,
            "signal": sig,
            "timed_out": timed_out,
            "wall_s": wall,
            "cpu_s": cpu,
            "completed": bool(rep.get("completed")) and not timed_out,
            "exception": rep.get("exception"),
            "state_lost": dead or lost_before,
            "threads": threads,
        }


class Kernel:
    """A long-lived child holding one session's Python state."""

    def __init__(self, pid: int, cmd_w: int, out_r: int, err_r: int, rep_r: int) -> None:
        self.pid, self.cmd_w, self.out_r, self.err_r, self.rep_r = pid, cmd_w, out_r, err_r, rep_r
        self.pidfd = os.pidfd_open(pid)
        self.calls = 0
        self.billed = 0.0
        """CPU seconds of the kernel already billed to calls."""

    @classmethod
    def start(cls, worker: Worker) -> Kernel:
        cmd_r, cmd_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        rep_r, rep_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.setsid()
                os.dup2(worker.devnull, 0)
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                os.dup2(rep_w, REPORT_FD)
                os.dup2(cmd_r, KERNEL_CMD_FD)
                os.closerange(KERNEL_CMD_FD + 1, 1 << 16)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGPIPE, signal.SIG_DFL)
                kernel_loop()
            finally:
                os._exit(127)
        for fd in (cmd_r, out_w, err_w, rep_w):
            os.close(fd)
        return cls(pid, cmd_w, out_r, err_r, rep_r)

    def alive(self) -> bool:
        try:
            flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
            return os.waitid(os.P_PIDFD, self.pidfd, flags) is None
        except ChildProcessError:  # already reaped by a sweep
            return False

    def cpu(self) -> float:
        """User + system time of every thread of the kernel and of the children it waited
        for (utime, stime, cutime, cstime of proc(5)'s stat)."""
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    def threads(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/task"))
        except OSError:
            return 0

    def drain(self, streams: dict[int, Capture]) -> None:
        for fd, cap in streams.items():
            os.set_blocking(fd, False)
            try:
                while chunk := os.read(fd, 65536):
                    cap.feed(chunk)
            except BlockingIOError:
                pass
            os.set_blocking(fd, True)

    def kill(self, worker: Worker) -> int:
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:  # reaped by a sweep: its status was recorded there
            status = worker.exited.pop(self.pid, signal.SIGKILL)
        for fd in (self.cmd_w, self.out_r, self.err_r, self.rep_r, self.pidfd):
            os.close(fd)
        return status


def main() -> None:
    in_fd, out_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    os.set_inheritable(in_fd, False)
    os.set_inheritable(out_fd, False)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        # Not dumpable: a snippet running as the same uid cannot open /proc/<worker>/fd/*.
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    for arg in sys.argv:
        if arg.startswith("--seccomp="):
            install_seccomp(base64.b64decode(arg.removeprefix("--seccomp=")))
    sandboxed = "--pidns" in sys.argv
    rlimit_as = "--rlimit-as" in sys.argv
    sys.argv = [""]  # snippets see what `python -c` with no arguments shows
    if sandboxed:
        os.chdir("/tmp")
    else:  # the subprocess backend: the private folder it was started in
        ENV.update(HOME=os.getcwd(), TMPDIR=os.getcwd())
    os.environ.clear()
    os.environ.update(ENV)
    Worker(in_fd, out_fd, sandboxed, rlimit_as).serve()


if __name__ == "__main__":
    main()
