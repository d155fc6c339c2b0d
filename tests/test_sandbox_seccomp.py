"""The seccomp deny filter and the session-keyring helper, on the real kernel.

Each check forks a child, loads the filter there with the worker's own `install_seccomp` (a
filter cannot be removed, so never in the pytest process), makes raw syscalls through libc's
`syscall()` and reports what happened through a pipe. Denied syscalls get arguments that are
invalid (-1 everywhere), so that even an unfiltered call would do nothing.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import platform
import resource
import select
import signal
import struct
import subprocess
import sys
from collections.abc import Callable

import pytest

from turnrl.sandboxes import seccomp
from turnrl.sandboxes.worker import install_seccomp

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.syscall.restype = ctypes.c_long
X86_64 = platform.machine() == "x86_64"
X32_SYSCALL_BIT = 0x40000000
KEYCTL_GET_KEYRING_ID = 0
KEYCTL_JOIN_SESSION_KEYRING = 1
KEYCTL_SEARCH = 10
KEYCTL_READ = 11
KEY_SPEC_SESSION_KEYRING = -3


def raw_syscall(nr: int, *args: int | bytes | None) -> tuple[int, int]:
    """(return value, errno) of syscall `nr`; errno is 0 on success."""
    cargs = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    ctypes.set_errno(0)
    ret = int(LIBC.syscall(ctypes.c_long(nr), *cargs))
    return ret, (ctypes.get_errno() if ret < 0 else 0)


def keyctl(*args: int | bytes | None) -> tuple[int, int]:
    return raw_syscall(seccomp.keyctl_nr(), *args)


def in_child(fn: Callable[[], object], program: bytes | None = None) -> object:
    """Run `fn` in a forked child, under `program` if given; return its JSON-able result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        reply = b'{"error": "the child raised before it could report"}'
        try:
            os.close(r)
            os.setsid()  # no controlling terminal: vhangup(), say, has nothing to hang up
            if program is not None:
                install_seccomp(program)
            reply = json.dumps({"ok": fn()}).encode()
        except BaseException as e:
            reply = json.dumps({"error": repr(e)}).encode()
        finally:
            try:
                os.write(w, reply)
            finally:
                os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), f"the child died: status {status:#x}"
    got = json.loads(b"".join(chunks))
    assert "error" not in got, got["error"]
    return got["ok"]


def test_the_filter_is_a_bpf_program() -> None:
    program = seccomp.deny_filter()
    assert program and len(program) % 8 == 0
    assert seccomp.deny_filter() is program  # built once per process
    # The last instruction returns (BPF_RET | BPF_K): a program that falls off its end is
    # rejected by the kernel.
    code, _, _, _ = struct.unpack("=HBBI", program[-8:])
    assert code == 0x06


def test_the_deny_list_spares_what_the_worker_and_python_need() -> None:
    """A regression lock: each of these is made by the worker or by every Python program."""
    needed = {"clone", "clone3", "fork", "vfork", "execve", "execveat", "prctl", "prlimit64"}
    needed |= {"setrlimit", "pidfd_open", "pidfd_send_signal", "waitid", "wait4", "kill"}
    needed |= {"memfd_create", "pipe2", "select", "pselect6", "poll", "ppoll", "epoll_wait"}
    needed |= {"mmap", "mprotect", "munmap", "madvise", "futex", "setsid", "seccomp"}
    assert len(set(seccomp.DENIED)) == len(seccomp.DENIED)
    assert needed.isdisjoint(seccomp.DENIED)


@pytest.mark.skipif(not X86_64, reason="the names missing from the table are x86_64's")
def test_every_denied_name_resolves_on_x86_64() -> None:
    """A misspelt name would be skipped silently: all resolve but those x86_64 lacks."""
    absent = {"vm86", "vm86old", "stime", "umount", "clock_settime64", "clock_adjtime64"}
    assert set(seccomp.DENIED) - set(seccomp.denied_numbers()) == absent
    assert seccomp.denied_numbers()["io_uring_setup"] == 425  # arch/x86/entry/syscalls
    assert seccomp.keyctl_nr() == 250


def probe_denied() -> dict[str, int]:
    denied = seccomp.denied_numbers()
    return {name: raw_syscall(nr, -1, -1, -1, -1, -1, -1)[1] for name, nr in denied.items()}


def test_every_denied_syscall_gets_the_filter_errno() -> None:
    """An errno that no syscall here returns by itself: each one was answered by the filter,
    not refused by the kernel for want of a capability or a valid argument."""
    program = seccomp.build_filter(errno.ENOTRECOVERABLE)
    got = in_child(probe_denied, program)
    assert got == {name: errno.ENOTRECOVERABLE for name in seccomp.denied_numbers()}


def test_deny_filter_answers_eperm() -> None:
    got = in_child(probe_denied, seccomp.deny_filter())
    assert got == {name: errno.EPERM for name in seccomp.denied_numbers()}


def test_without_the_filter_the_probes_are_not_denied_by_it() -> None:
    """The probes themselves reach the kernel (and do nothing there), so the two tests above
    see the filter and not a probe that fails on its own with the same errno."""
    got = in_child(probe_denied)
    assert isinstance(got, dict)
    assert errno.ENOTRECOVERABLE not in got.values()
    assert got["io_uring_setup"] != errno.EPERM  # no capability needed: EINVAL or EFAULT


def probe_x32() -> dict[str, int]:
    # x32 has its own numbers for the calls whose arguments differ (ptrace 521,
    # process_vm_readv 539), the 64-bit ones elsewhere; all with bit 30 set.
    nrs = {"getpid": 39, "io_uring_setup": 425, "keyctl": 250, "ptrace": 521, "pvr": 539}
    return {k: raw_syscall(X32_SYSCALL_BIT | nr, -1, -1, -1, -1)[1] for k, nr in nrs.items()}


@pytest.mark.skipif(not X86_64, reason="x32 is an x86_64 ABI")
def test_x32_syscall_numbers_are_denied() -> None:
    got = in_child(probe_x32, seccomp.deny_filter())
    assert got == {k: errno.EPERM for k in ("getpid", "io_uring_setup", "keyctl", "ptrace", "pvr")}
    # Unfiltered, the kernel answers by itself: ENOSYS without the x32 ABI, else per call.
    assert in_child(probe_x32)["getpid"] != errno.EPERM  # type: ignore[index]


def int80(nr: int, a1: int, a2: int) -> int:
    """An i386 syscall from this 64-bit process (`int 0x80`); returns eax (-errno on error)."""
    code = (
        b"\x53"  # push rbx (callee-saved; the i386 ABI takes the first argument in ebx)
        + b"\xb8"
        + struct.pack("<i", nr)  # mov eax, nr
        + b"\xbb"
        + struct.pack("<i", a1)  # mov ebx, a1
        + b"\xb9"
        + struct.pack("<i", a2)  # mov ecx, a2
        + b"\xcd\x80"  # int 0x80
        + b"\x5b"  # pop rbx
        + b"\xc3"  # ret
    )
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    return int(ctypes.CFUNCTYPE(ctypes.c_int)(address)())


def probe_i386() -> dict[str, int]:
    # i386 numbers: getpid 20, ptrace 26, keyctl 288, io_uring_setup 425.
    return {
        "getpid": int80(20, 0, 0),
        "ptrace": int80(26, -1, -1),
        "keyctl": int80(288, -1, -1),
        "io_uring_setup": int80(425, -1, -1),
        "pid": os.getpid(),
    }


@pytest.mark.skipif(not X86_64, reason="int 0x80 is the i386 ABI on x86_64")
def test_i386_syscalls_are_denied() -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # does this kernel run i386 syscalls at all (IA32 emulation)?
        os.write(w, b"1" if int80(20, 0, 0) == os.getpid() else b"0")
        os._exit(0)
    os.close(w)
    works = os.read(r, 1) == b"1"
    os.close(r)
    os.waitpid(pid, 0)
    if not works:
        pytest.skip("this kernel has no IA32 emulation: int 0x80 does not reach it")
    got = in_child(probe_i386, seccomp.deny_filter())
    assert isinstance(got, dict)
    del got["pid"]
    assert got == {k: -errno.EPERM for k in ("getpid", "ptrace", "keyctl", "io_uring_setup")}


def ordinary_work() -> dict[str, object]:
    done: dict[str, object] = {}
    done["exec"] = subprocess.run(["/bin/true"], check=False).returncode
    script = (
        "import ctypes, json, threading\n"
        "t = threading.Thread(target=print, args=('thread',)); t.start(); t.join()\n"
        "print(json.dumps([ctypes.sizeof(ctypes.c_long)]))\n"
    )
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False)
    done["python"] = [child.returncode, child.stdout.decode(), child.stderr.decode()[-500:]]
    fd = os.memfd_create("probe")
    done["memfd"] = os.write(fd, b"abc")
    os.close(fd)
    # As the worker does: a child per call, watched through a pidfd and select, limits set.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, b"x")
        os._exit(7)
    pidfd = os.pidfd_open(pid)
    ready, _, _ = select.select([pidfd, r], [], [], 10)
    done["pidfd"] = bool(ready)
    info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
    done["waitid"] = info.si_status if info is not None else None
    os.close(pidfd)
    done["pipe"] = os.read(r, 1).decode()
    resource.prlimit(0, resource.RLIMIT_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE))
    resource.setrlimit(resource.RLIMIT_CPU, (100, 101))
    done["prctl"] = ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return done


def test_ordinary_work_runs_under_the_filter() -> None:
    got = in_child(ordinary_work, seccomp.deny_filter())
    assert isinstance(got, dict)
    code, out, err = got.pop("python")
    assert (code, err) == (0, "")
    assert out.startswith("thread\n[")
    assert got == {"exec": 0, "memfd": 3, "pidfd": True, "waitid": 7, "pipe": "x", "prctl": 0}


# --- the session keyring --------------------------------------------------------------------


def session_keyring_id() -> int:
    return keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 1)[0]


def read_key(key: int) -> tuple[str, int]:
    """(payload, errno) of reading `key`."""
    buf = ctypes.create_string_buffer(64)
    n, err = keyctl(KEYCTL_READ, key, ctypes.addressof(buf), 64)
    return (buf.raw[:n].decode() if n >= 0 else ""), err


def as_trainer(then: Callable[[int, int], object]) -> object:
    """In a forked child (so that pytest's own keyrings stay as they are): join a named session
    keyring as a trainer's login session would have, add a secret to it, and call
    `then(session keyring id, key id)`."""

    def trainer() -> object:
        name = f"turnrl-test-{os.getpid()}".encode()
        ring, err = keyctl(KEYCTL_JOIN_SESSION_KEYRING, name)
        if err == errno.ENOSYS:
            return "no keys"
        assert err == 0, os.strerror(err)
        key, err = raw_syscall(
            seccomp.syscall_number("add_key") or -1,
            b"user",
            b"turnrl-secret",
            b"hunter2",
            7,
            KEY_SPEC_SESSION_KEYRING,
        )
        assert err == 0, os.strerror(err)
        assert read_key(key) == ("hunter2", 0)
        return then(ring, key)

    got = in_child(trainer)
    if got == "no keys":
        pytest.skip("this kernel is built without keys (CONFIG_KEYS)")
    return got


def test_join_new_session_keyring_leaves_the_trainers_keys_behind() -> None:
    def then(ring: int, key: int) -> object:
        def sandbox() -> object:
            before = [session_keyring_id(), *read_key(key)]
            seccomp.join_new_session_keyring()
            search = keyctl(KEYCTL_SEARCH, KEY_SPEC_SESSION_KEYRING, b"user", b"turnrl-secret", 0)
            return {
                "before": before,
                "after": session_keyring_id(),
                "read": read_key(key)[1],
                "search": search[1],
            }

        return {"ring": ring, "sandbox": in_child(sandbox)}

    got = as_trainer(then)
    assert isinstance(got, dict)
    ring, sandbox = got["ring"], got["sandbox"]
    # Before joining, the child is in the trainer's keyring and reads the secret ...
    assert sandbox["before"] == [ring, "hunter2", 0]
    # ... after, it has a keyring of its own and the key is neither readable nor findable.
    assert sandbox["after"] > 0 and sandbox["after"] != ring
    assert sandbox["read"] == errno.EACCES
    assert sandbox["search"] == errno.ENOKEY


def test_join_new_session_keyring_as_preexec_fn() -> None:
    """The launcher's use: the program it starts cannot read the trainer's key."""
    reader = (
        "import ctypes, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "buf = ctypes.create_string_buffer(64)\n"
        "n = libc.syscall(*[ctypes.c_long(int(a)) for a in sys.argv[1:]], buf, ctypes.c_long(64))\n"
        "print(buf.raw[:n].decode() if n >= 0 else ctypes.get_errno())\n"
    )

    def then(ring: int, key: int) -> object:
        argv = [sys.executable, "-c", reader, str(seccomp.keyctl_nr()), str(KEYCTL_READ), str(key)]
        plain = subprocess.run(argv, capture_output=True, text=True, check=True)
        joined = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            check=True,
            preexec_fn=seccomp.join_new_session_keyring,
        )
        return [plain.stdout.strip(), joined.stdout.strip()]

    assert as_trainer(then) == ["hunter2", str(errno.EACCES)]
