"""The default sandbox image, built locally from the host's own Python (no registry needed).

`build_image()` tars a root filesystem holding the host's `/usr/bin/python3` (the real binary
it links to), its standard library (minus the parts that cannot work or are only for building:
the static `config-*` folder, `test`, `idlelib`, `tkinter`, `turtledemo`, `ensurepip`), the
shared libraries that the interpreter, its extension modules and a few shell tools need (found
with `ldd`), `/bin/sh` and a handful of coreutils, and an `/etc/passwd` naming `nobody`. Every
symlink on the way to a file is kept as a symlink (merged-`/usr` layouts and the
`/lib64/ld-linux-*` loader path resolve as they do on the host). The image is `FROM scratch`
plus that tar, so it holds nothing the sandbox does not use: no package manager, no compiler,
no setuid binaries. Building takes ~5 s here (half of it tarring); the image is ~50 MB.

The binaries come from the host, so the image runs on daemons of the host's architecture. It
is self-contained: a change to the host's packages does not break it (remove the image to pick
the change up; it is rebuilt on next use).
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DEFAULT_TAG = "turnrl-sandbox:latest"
IMAGE_LABEL = "turnrl.sandbox-image"
"""Set on images built here (`docker image ls --filter label=turnrl.sandbox-image`)."""

TOOLS = (
    "sh",
    "cat",
    "echo",
    "ls",
    "true",
    "false",
    "sleep",
    "env",
    "id",
    "mkdir",
    "rm",
    "cp",
    "mv",
    "head",
    "tail",
    "wc",
)
"""Programs from the host's `/bin` copied into the image (for `session.run([...])`)."""

_SKIP_STDLIB = ("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "site-packages")
_DOCKERFILE = f"""FROM scratch
ADD rootfs.tar /
LABEL {IMAGE_LABEL}=1
USER 65534:65534
WORKDIR /tmp
CMD ["/usr/bin/python3"]
"""
_ETC = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/tmp:/bin/sh\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
}


class _Rootfs:
    """A tar of host paths laid out as they are on the host, owned by root."""

    def __init__(self, tar: tarfile.TarFile) -> None:
        self.tar = tar
        self.seen: set[str] = set()

    def add(self, path: str) -> None:
        """Add `path` as it resolves on the host, and every symlink on the way to it."""
        parts = Path(path).parts[1:]
        cur = "/"
        for i, part in enumerate(parts):
            cur = os.path.join(cur, part)
            if os.path.islink(cur):
                self._entry(cur)
                target = os.readlink(cur)
                base = "/" if os.path.isabs(target) else os.path.dirname(cur)
                resolved = os.path.normpath(os.path.join(base, target))
                self.add(os.path.join(resolved, *parts[i + 1 :]))
                return
            self._entry(cur)

    def add_tree(self, root: str, skip: Iterable[str] = ()) -> None:
        """Add a folder recursively (symlinks inside it are followed to their targets)."""
        skipped = set(skip)
        self.add(root)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in skipped and not d.startswith("config-")]
            for name in [*dirnames, *filenames]:
                self.add(os.path.join(dirpath, name))

    def text(self, arcname: str, content: str, mode: int = 0o644) -> None:
        data = content.encode()
        info = tarfile.TarInfo(arcname)
        info.size, info.mode = len(data), mode
        self.tar.addfile(info, io.BytesIO(data))

    def directory(self, arcname: str, mode: int) -> None:
        info = tarfile.TarInfo(arcname)
        info.type, info.mode = tarfile.DIRTYPE, mode
        self.tar.addfile(info)

    def _entry(self, path: str) -> None:
        if path in self.seen or path == "/" or not os.path.lexists(path):
            return  # a dangling link's target is simply absent in the image
        self.seen.add(path)
        info = self.tar.gettarinfo(path, arcname=path.lstrip("/"))
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        # No setuid/setgid bits in the image, whatever the host has.
        info.mode &= ~(stat.S_ISUID | stat.S_ISGID)
        if info.isreg():
            with open(path, "rb") as f:
                self.tar.addfile(info, f)
        else:
            self.tar.addfile(info)


def _libraries(binaries: Iterable[str]) -> set[str]:
    """The shared libraries (and the loader) that `ldd` resolves for `binaries`."""
    proc = subprocess.run(["ldd", *binaries], capture_output=True, text=True, check=False)
    libs: set[str] = set()
    for line in proc.stdout.splitlines():
        words = line.split()
        if "=>" in words:  # `libz.so.1 => /lib/.../libz.so.1 (0x...)`; "not found" is skipped
            target = words[words.index("=>") + 1]
            if target.startswith("/"):
                libs.add(target)
        elif words and words[0].startswith("/") and not words[0].endswith(":"):
            libs.add(words[0])  # the loader; `/path/of/binary:` lines head each section
    return libs


def rootfs(python: str = "/usr/bin/python3", tools: Iterable[str] = TOOLS) -> bytes:
    """The image's root filesystem as an uncompressed tar."""
    probe = subprocess.run(
        [python, "-I", "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    stdlib = probe.stdout.strip()
    interpreter = os.path.realpath(python)
    programs = [os.path.realpath(f"/bin/{t}") for t in tools if os.path.exists(f"/bin/{t}")]
    extensions = [str(p) for p in Path(stdlib).rglob("*.so")]
    libs = _libraries([interpreter, *programs, *extensions])
    libc = next((lib for lib in libs if os.path.basename(lib).startswith("libc.so")), None)
    if libc is not None:
        # Loaded with dlopen by glibc (thread cancellation), so ldd does not list it.
        gcc_s = os.path.join(os.path.dirname(os.path.realpath(libc)), "libgcc_s.so.1")
        if os.path.exists(gcc_s):
            libs.add(gcc_s)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        fs = _Rootfs(tar)
        for path in dict.fromkeys([python, "/usr/bin/python3"]):
            if os.path.exists(path):
                fs.add(path)
        for t in tools:
            if os.path.exists(f"/bin/{t}"):
                fs.add(f"/bin/{t}")
        for lib in sorted(libs):
            fs.add(lib)
        fs.add_tree(stdlib, skip=_SKIP_STDLIB)
        for name, content in _ETC.items():
            fs.text(name, content)
        fs.directory("tmp", 0o1777)
        for d in ("proc", "dev", "sys"):
            fs.directory(d, 0o755)
    return buf.getvalue()


def build_context(python: str = "/usr/bin/python3") -> bytes:
    """A docker build context (a tar holding the Dockerfile and the root filesystem tar)."""
    layer = rootfs(python)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("Dockerfile", _DOCKERFILE.encode()), ("rootfs.tar", layer)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build_image(
    tag: str = DEFAULT_TAG, python: str = "/usr/bin/python3", client: Any = None
) -> str:
    """Build the sandbox image from the host's Python and tag it; returns the image id.

    `client` is a `docker.DockerClient` (one from the environment when None)."""
    import docker

    own = client is None
    client = client or docker.from_env()
    try:
        image, _ = client.images.build(
            fileobj=io.BytesIO(build_context(python)),
            custom_context=True,
            tag=tag,
            rm=True,
            forcerm=True,
        )
        return str(image.id)
    finally:
        if own:
            client.close()
