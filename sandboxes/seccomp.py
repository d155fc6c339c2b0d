"""A seccomp deny-list for sandboxed code, and a private session keyring for each sandbox.

`deny_filter()` is a classic-BPF program (built with libseccomp, which knows every
architecture's syscall numbers) that makes the syscalls in `DENIED` fail with EPERM and allows
everything else. The host builds it; the worker loads it on itself at start
(`worker.install_seccomp`), so the worker and every snippet it forks run under it and cannot
remove it. Under docker it stacks on the daemon's default profile: the kernel applies the
stricter answer of the two, so io_uring, which docker 20.10's profile still allows, is denied
there too.

What it denies, and why:
- The usual primitives of published kernel privilege escalations, which ordinary code never
  needs: io_uring, `userfaultfd` (holds a kernel copy mid-flight to win races),
  `perf_event_open`, `bpf`, and the key syscalls (the keyring code has had its own CVEs, and a
  sandbox has no keys of its own to manage).
- Reaching other processes: `ptrace`, `process_vm_readv`/`_writev`, `pidfd_getfd` (steals an
  fd, like ptrace), `process_madvise`, `kcmp`. They are what code would use on the worker or on
  pid 1, which hold the host's channel. `ptrace` is denied outright, not "all but the caller's
  own children": a filter sees only the syscall's arguments (a pid), never whose child that pid
  is, and a pid can be recycled. So debuggers and `strace` do not work inside.
- Docker's default deny set: mounts and namespaces, modules and kexec, reboot, swap, clocks,
  accounting, the kernel log, raw I/O ports, quotas, file handles (`open_by_handle_at` is the
  "shocker" container escape), fanotify, NUMA placement of other processes, and syscalls
  removed from the kernel long ago. Names this architecture lacks (`vm86`, `stime`, ...) are
  skipped, as are names the installed libseccomp does not know yet.

Foreign ABIs cannot go around it: a syscall made through another ABI of the same CPU (i386's
`int 0x80`, x32 numbers with bit 30 set on x86_64) carries different numbers, so libseccomp
sends everything that is not the native ABI to the "bad architecture" action, which here is
EPERM too (libseccomp's default kills the calling thread only, which would leave a threaded
process half alive). No legitimate sandbox program is 32-bit.

Deliberately not filtered: `clone`/`clone3` namespace flags (seccomp cannot read `clone3`'s
argument struct; namespaces are bwrap's and docker's to restrict), `personality`, socket
families (the network namespace is the boundary), and everything the worker and ordinary
programs use (fork, exec, prctl, prlimit, pidfd_open, memfd_create, mmap, ...).

`join_new_session_keyring()` is for the launcher's `preexec_fn`: it puts the sandbox in a
fresh anonymous session keyring, so code inside cannot reach the keys in the trainer's session
keyring (a login session or a systemd service has one) nor keys another sandbox left there.
The kernel lets a session keyring overrun the uid's key quota, so joining never fails for it,
but each live sandbox holds one key of the trainer uid's quota (`kernel.keys.maxkeys`, 200 for
a non-root uid by default) until it exits.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import functools
import os
from collections.abc import Callable

from turnrl.sandboxes.base import SandboxError

DENIED: tuple[str, ...] = (
    # Kernel-exploit primitives.
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "userfaultfd",
    "perf_event_open",
    "bpf",
    "add_key",
    "keyctl",
    "request_key",
    # Other processes: the worker and pid 1 hold the host's channel.
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "process_madvise",
    "kcmp",
    # Mounts and namespaces.
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    # The kernel and the machine.
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "syslog",
    "iopl",
    "ioperm",
    "quotactl",
    "quotactl_fd",
    "lookup_dcookie",
    "nfsservctl",
    "uselib",
    "sysfs",
    "_sysctl",
    "ustat",
    "vm86",
    "vm86old",
    "vhangup",
    "sethostname",
    "setdomainname",
    # Clocks.
    "settimeofday",
    "stime",
    "clock_settime",
    "clock_settime64",
    "adjtimex",
    "clock_adjtime",
    "clock_adjtime64",
    # Files by handle (bypasses the mount tree), filesystem-wide watches.
    "open_by_handle_at",
    "name_to_handle_at",
    "fanotify_init",
    # NUMA placement, which can also move other processes' pages.
    "mbind",
    "set_mempolicy",
    "set_mempolicy_home_node",
    "get_mempolicy",
    "move_pages",
    "migrate_pages",
)
"""Syscalls that fail with EPERM under `deny_filter()` (those this architecture has)."""

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_FLTATR_ACT_BADARCH = 2
KEYCTL_JOIN_SESSION_KEYRING = 1


def scmp_act_errno(err: int) -> int:
    """libseccomp's `SCMP_ACT_ERRNO(err)`: fail the syscall with `err`."""
    return 0x00050000 | (err & 0xFFFF)


@functools.cache
def libseccomp() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError as e:
        raise SandboxError(
            "the sandbox's seccomp filter needs libseccomp, which is not installed: install "
            "libseccomp2 (Debian/Ubuntu: apt-get install libseccomp2; Fedora: dnf install "
            "libseccomp)"
        ) from e
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    # Variadic in C (the argument comparisons); with none, these four are the whole call.
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    return lib


def syscall_number(name: str) -> int | None:
    """The native architecture's number of syscall `name`; None where this architecture lacks
    it (libseccomp answers a negative pseudo-number) or libseccomp does not know the name."""
    nr: int = libseccomp().seccomp_syscall_resolve_name(name.encode())
    return nr if nr >= 0 else None


def denied_numbers() -> dict[str, int]:
    """`DENIED` as this architecture numbers it, without the names it lacks."""
    numbers = {name: syscall_number(name) for name in DENIED}
    return {name: nr for name, nr in numbers.items() if nr is not None}


def _check(rc: int, what: str) -> None:
    if rc < 0:  # libseccomp returns -errno
        raise SandboxError(f"libseccomp {what} failed: {os.strerror(-rc)}")


def build_filter(err: int = errno.EPERM) -> bytes:
    """A BPF program (8-byte `struct sock_filter` entries) that fails the `DENIED` syscalls and
    every foreign-ABI syscall with `err` and allows the rest. The verdict never depends on a
    syscall's arguments, so the kernel caches "allow" per syscall number (5.11+) and the
    syscalls ordinary code makes never run the program at all."""
    lib = libseccomp()
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise SandboxError("libseccomp seccomp_init failed")
    try:
        _check(lib.seccomp_attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, scmp_act_errno(err)), "attr")
        for name, nr in denied_numbers().items():
            _check(lib.seccomp_rule_add(ctx, scmp_act_errno(err), nr, 0), f"rule for {name}")
        # libseccomp writes the program to an fd only (export to memory is 2.6+).
        fd = os.memfd_create("turnrl-seccomp", os.MFD_CLOEXEC)
        try:
            _check(lib.seccomp_export_bpf(ctx, fd), "export")
            size = os.lseek(fd, 0, os.SEEK_CUR)
            program = os.pread(fd, size, 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)
    if not program or len(program) % 8 or len(program) != size:
        raise SandboxError(f"libseccomp exported a malformed program ({len(program)} bytes)")
    return program


@functools.cache
def deny_filter() -> bytes:
    """`build_filter()` with EPERM, the answer docker's profile gives for what it denies."""
    return build_filter(errno.EPERM)


def worker_argument() -> str:
    """The worker's `--seccomp=<base64>` argument: it loads `deny_filter()` on itself before
    serving (`worker.install_seccomp`), whatever launched it."""
    return "--seccomp=" + base64.b64encode(deny_filter()).decode()


@functools.cache
def keyctl_nr() -> int:
    """The native number of `keyctl`."""
    nr = syscall_number("keyctl")
    if nr is None:
        raise SandboxError("libseccomp does not know the keyctl syscall on this architecture")
    return nr


@functools.cache
def _libc_syscall() -> Callable[..., int]:
    syscall = ctypes.CDLL(None, use_errno=True).syscall
    syscall.restype = ctypes.c_long
    return syscall


def join_new_session_keyring() -> None:
    """Replace this process's session keyring by a new anonymous one, which its children
    inherit. Meant for `preexec_fn` (it runs in the forked child before exec): the syscall
    number and libc were resolved when this module was imported, so the child only makes the
    syscall."""
    syscall, nr = _libc_syscall(), ctypes.c_long(keyctl_nr())
    if syscall(nr, ctypes.c_long(KEYCTL_JOIN_SESSION_KEYRING), None) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"keyctl(KEYCTL_JOIN_SESSION_KEYRING): {os.strerror(err)}")


# Resolved now, in the parent: loading a library in a forked child (preexec_fn) is not
# async-signal-safe. Where libseccomp is missing, the launcher's own call raises.
try:
    keyctl_nr()
    _libc_syscall()
except SandboxError:
    pass
