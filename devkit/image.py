"""Container images without a Docker engine: build the repository's Dockerfile and run the image
the way a pod runs it, or run a command in a clean Debian root file system with networking off.

Needs root, ``buildah``, ``debootstrap`` and util-linux's ``unshare`` (``apt-get install buildah
debootstrap``); ``missing()`` says what is absent.

- ``base_rootfs``: ``debootstrap --variant=minbase`` of Debian bookworm (whose python3 is 3.11,
  the Dockerfile's default) with python3, venv and the CA certificates, cached as a tar under
  ``.cache/image/`` (about 45 s once, then reused).
- ``base_image``: that tar as a local buildah image, the stand-in for ``python:3.11-slim``
  (passed as the Dockerfile's ``BASE_IMAGE``; a real ``python`` image in the store is left alone).
- ``build_image``: ``buildah bud --isolation chroot --layers`` of the Dockerfile; pip in the
  build trusts what the host trusts (its CA folder mounted, the ``PIP_CERT`` build argument).
- ``Container``: the image's root file system (``buildah from`` + ``buildah mount``) run with
  its entrypoint, environment and working directory in fresh mount and PID namespaces (the
  host's network), as a pod's container runs it: the root file system read-only, each volume
  bind-mounted at its path (read-only where asked), ``/tmp`` a tmpfs, a minimal ``/dev``, the
  given uid, gid and supplementary groups, no capabilities and ``no_new_privs``.
  (``podman run`` would do this, but the crun and runc here cannot set the container's rlimits.)
- ``run_in_rootfs``: one command in an unpacked root file system (``unpack_rootfs``), as root,
  without any network (a fresh network namespace: only a loopback that is down).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "image"
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
# A device as shipped: python3, without venv/ensurepip (install.sh makes its venv --without-pip).
DEVICE_PURGE = ("python3-venv", "python3.11-venv", "python-is-python3", "python3-pip-whl", "python3-setuptools-whl")
TOOLS = {"buildah": "buildah", "debootstrap": "debootstrap", "unshare": "util-linux", "chroot": "coreutils"}
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def missing() -> str | None:
    """Why images cannot be built and run here, or None."""
    if os.geteuid() != 0:
        return "building and running images without a Docker engine needs root (mount and PID namespaces, chroot)"
    absent = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if absent:
        return f"missing tools: apt-get install {' '.join(absent)} (.ci/run installs them)"
    return None


def debian_mirror() -> str:
    """The Debian mirror apt uses here ($DEBIAN_MIRROR overrides), else deb.debian.org."""
    if os.environ.get("DEBIAN_MIRROR"):
        return os.environ["DEBIAN_MIRROR"]
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        for url in re.findall(r"(https?://\S+/debian)/?(?:\s|$)", text):
            return url
    return "http://deb.debian.org/debian"


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:12]


def base_rootfs(cache: Path = CACHE, log: Path | None = None) -> Path:
    """The debootstrapped Debian root file system as a tar, made once into ``cache``."""
    tar = cache / f"debian-{SUITE}-{_key(SUITE, 'minbase', BASE_PACKAGES)}.tar"
    if tar.is_file():
        return tar
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix="debootstrap-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, str(rootfs)]
        _run([*cmd, debian_mirror()], log, "debootstrap")
        part = tar.with_suffix(f".{os.getpid()}.part")
        _run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(part), "."], log, "tar")
        os.replace(part, tar)  # atomic: a parallel run sees the whole tar or none
    return tar


def base_image(cache: Path = CACHE, log: Path | None = None) -> str:
    """The base root file system as a local image (imported once; the name carries its key)."""
    tar = base_rootfs(cache, log)
    name = f"localhost/fedlora-debian-base:{tar.stem.removeprefix('debian-')}"
    if subprocess.run(["buildah", "inspect", "--type", "image", name], capture_output=True).returncode == 0:
        return name
    ctr = _out(["buildah", "from", "scratch"])
    try:
        _run(["buildah", "add", "--quiet", ctr, str(tar), "/"], log, "buildah add")
        _run(["buildah", "config", "--env", f"PATH={DEFAULT_PATH}", "--env", "LANG=C.UTF-8", ctr], log, "config")
        _run(["buildah", "commit", "--quiet", "--rm", ctr, name], log, "buildah commit")
    except BaseException:
        subprocess.run(["buildah", "rm", ctr], capture_output=True)
        raise
    return name


def build_image(
    tag: str,
    build_args: Mapping[str, str] = {},  # noqa: B006 (read only)
    context: Path = ROOT,
    dockerfile: Path | None = None,
    log: Path | None = None,
    cache: bool = True,
) -> subprocess.CompletedProcess:
    """``buildah bud`` of ``dockerfile`` (default: the context's Dockerfile); returns the finished
    process (the output goes to ``log``), whether it succeeded or not. ``cache=False`` builds
    every layer afresh (the base image is still the cached one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # buildah's default is above what may be set here
    cmd = ["buildah", "bud", "--isolation", "chroot", "--layers", "--force-rm", "-t", tag]
    cmd += ["--ulimit", f"nofile={soft}:{hard}"]
    if dockerfile is not None:
        cmd += ["-f", str(dockerfile)]
    if not cache:
        cmd.append("--no-cache")
    for k, v in build_args.items():
        cmd += ["--build-arg", f"{k}={v}"]
    if HOST_CA_BUNDLE.is_file() and "PIP_CERT" not in build_args:  # a proxy's CA included
        cmd += [
            "-v",
            f"{HOST_CA_BUNDLE.parent}:{HOST_CA_BUNDLE.parent}:ro",
            "--build-arg",
            f"PIP_CERT={HOST_CA_BUNDLE}",
        ]
    with _sink(log) as out:
        return subprocess.run([*cmd, str(context)], stdout=out, stderr=subprocess.STDOUT)


def image_config(image: str) -> dict:
    """The image's OCI config: Entrypoint, Cmd, Env, WorkingDir, User, Labels."""
    doc = json.loads(_out(["buildah", "inspect", "--type", "image", image]))
    return doc["OCIv1"]["config"]


def image_layers(image: str) -> list[int]:
    """Bytes of each of the image's layers, uncompressed, base first."""
    doc = json.loads(_out(["buildah", "inspect", "--type", "image", image]))
    return [int(layer["size"]) for layer in json.loads(doc["Manifest"])["layers"]]


def image_size(image: str) -> int:
    """Bytes of the image's layers, uncompressed (what ``docker images`` shows as its size)."""
    return sum(image_layers(image))


def unpack_rootfs(
    dest: Path, cache: Path = CACHE, purge: Sequence[str] = DEVICE_PURGE, log: Path | None = None
) -> Path:
    """A fresh copy of the base root file system in ``dest``, with the ``purge`` packages removed
    (dpkg, offline)."""
    dest.mkdir(parents=True)
    _run(["tar", "-C", str(dest), "--numeric-owner", "-xf", str(base_rootfs(cache, log))], log, "tar")
    if purge:
        _run(["unshare", "--net", "chroot", str(dest), "dpkg", "--purge", *purge], log, "dpkg --purge")
    return dest


@dataclass(frozen=True)
class Mount:
    """A volume: ``source`` (a host file or folder; None for a fresh tmpfs) at ``target``."""

    target: str
    source: Path | None = None
    read_only: bool = False


def run_in_rootfs(
    rootfs: Path,
    argv: Sequence[str],
    env: Mapping[str, str] = {},  # noqa: B006 (read only)
    mounts: Sequence[Mount] = (),
    workdir: str = "/root",
    timeout: float | None = None,
) -> subprocess.CompletedProcess:
    """``argv`` as root in ``rootfs``, with no network; its output comes back as text."""
    spec = _spec(rootfs, argv, {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C.UTF-8", **env}, mounts, workdir)
    return subprocess.run(
        _launcher(spec, network=False), capture_output=True, text=True, timeout=timeout, env=_host_env()
    )


class Container:
    """``image`` run as a pod's container (see the module's docstring); a context manager.

    ``args`` replaces the image's Cmd (as a pod's ``args`` does); ``command`` its Entrypoint;
    ``env`` adds to the image's Env; ``user``/``group``/``groups`` are the pod's runAsUser,
    runAsGroup and fsGroup; ``read_only`` is readOnlyRootFilesystem. Output goes to ``log``.
    """

    def __init__(
        self,
        image: str,
        log: Path,
        args: Sequence[str] | None = None,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] = {},  # noqa: B006 (read only)
        mounts: Sequence[Mount] = (),
        user: int = 0,
        group: int = 0,
        groups: Sequence[int] = (),
        read_only: bool = True,
    ):
        self.image, self.log = image, log
        self.config = image_config(image)
        entrypoint = list(command) if command is not None else list(self.config.get("Entrypoint") or [])
        cmd = list(args) if args is not None else ([] if command is not None else list(self.config.get("Cmd") or []))
        self.argv = entrypoint + cmd
        image_env = dict(e.split("=", 1) for e in self.config.get("Env") or [])
        self.env = {"PATH": DEFAULT_PATH, **image_env, "HOSTNAME": "fedlora-pod", **env}
        self.mounts = list(mounts)
        self.user, self.group, self.groups, self.read_only = user, group, list(groups), read_only
        self.name = f"fedlora-test-{uuid.uuid4().hex[:8]}"
        self.proc: subprocess.Popen | None = None
        self.rootfs: Path | None = None

    def start(self) -> Container:
        _out(["buildah", "from", "--pull-never", "--name", self.name, self.image])
        self.rootfs = Path(_out(["buildah", "mount", self.name]))
        (self.rootfs / (self.config.get("WorkingDir") or "/").lstrip("/")).mkdir(parents=True, exist_ok=True)
        for m in self.mounts:  # mount points, made in the container's writable layer as a runtime does
            target = self.rootfs / m.target.lstrip("/")
            if m.source is not None and m.source.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()
            else:
                target.mkdir(parents=True, exist_ok=True)
        spec = _spec(
            self.rootfs,
            self.argv,
            self.env,
            self.mounts if any(m.target == "/tmp" for m in self.mounts) else [Mount("/tmp"), *self.mounts],
            self.config.get("WorkingDir") or "/",
            self.user,
            self.group,
            self.groups,
            self.read_only,
        )
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                _launcher(spec, network=True), stdout=out, stderr=subprocess.STDOUT, env=_host_env()
            )
        return self

    def payload_pid(self, timeout: float = 10.0) -> int | None:
        """The host pid of the container's process (the launcher's child), once it runs."""
        if self.proc is None:
            return None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            except OSError:
                children = []
            if children:
                return int(children[0])
            time.sleep(0.02)
        return None

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM to the container's process (as the kubelet sends), SIGKILL after ``grace``."""
        code = None
        if self.proc is not None:
            pid = self.payload_pid(timeout=0.5) if self.proc.poll() is None else None
            if pid is not None:
                try:
                    os.kill(pid, 15)
                except ProcessLookupError:
                    pass
            try:
                code = self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # --kill-child takes the container's process with it
                code = self.proc.wait(10)
        subprocess.run(["buildah", "umount", self.name], capture_output=True)
        subprocess.run(["buildah", "rm", self.name], capture_output=True)
        return code

    def __enter__(self) -> Container:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_once(image: str, log: Path, timeout: float = 120.0, **kw) -> tuple[int, str]:
    """A ``Container`` run to its end: (exit status, its output)."""
    container = Container(image, log, **kw).start()
    try:
        assert container.proc is not None
        code = container.proc.wait(timeout)
    finally:
        container.stop()
    return code, log.read_text(errors="replace")


# -- the launcher: runs inside the new namespaces, as root, then becomes the container's process --
def _spec(rootfs, argv, env, mounts, workdir, user=0, group=0, groups=(), read_only=False) -> dict:
    return {
        "rootfs": str(rootfs),
        "argv": list(argv),
        "env": dict(env),
        "mounts": [
            {"target": m.target, "source": str(m.source) if m.source else None, "ro": m.read_only} for m in mounts
        ],
        "workdir": workdir,
        "user": user,
        "group": group,
        "groups": list(groups),
        "read_only": read_only,
    }


def _launcher(spec: dict, network: bool) -> list[str]:
    flags = ["--mount", "--pid", "--fork", "--kill-child", "--propagation", "private"] + ([] if network else ["--net"])
    return ["unshare", *flags, sys.executable, "-I", __file__, "launch", json.dumps(spec)]


def _launch(spec: dict) -> None:
    import ctypes

    root = spec["rootfs"]

    def mount(*args: str) -> None:
        subprocess.run(["mount", *args], check=True)

    mount("--bind", root, root)  # its own mount, so it alone can be made read-only
    mount("-t", "proc", "-o", "nosuid,nodev,noexec", "proc", f"{root}/proc")
    mount("-t", "tmpfs", "-o", "nosuid,mode=755,size=64k", "tmpfs", f"{root}/dev")
    for dev in ("null", "zero", "full", "random", "urandom", "tty"):
        Path(f"{root}/dev/{dev}").touch()
        mount("--bind", f"/dev/{dev}", f"{root}/dev/{dev}")
    os.mkdir(f"{root}/dev/shm")
    mount("-t", "tmpfs", "-o", "nosuid,nodev,mode=1777", "tmpfs", f"{root}/dev/shm")
    for m in spec["mounts"]:
        target = f"{root}{m['target']}"
        if m["source"] is None:
            mount("-t", "tmpfs", "-o", "nosuid,nodev,mode=1777,size=256m", "tmpfs", target)
        else:
            mount("--bind", m["source"], target)
            if m["ro"]:
                mount("-o", "remount,bind,ro", target)
    if spec["read_only"]:
        mount("-o", "remount,bind,ro", root)
    os.chroot(root)
    os.chdir(spec["workdir"])
    if spec["user"] or spec["group"] or spec["groups"]:
        os.setgroups(spec["groups"])
        os.setgid(spec["group"])
        os.setuid(spec["user"])  # a non-zero uid keeps no capabilities
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: allowPrivilegeEscalation false
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    os.execvpe(spec["argv"][0], spec["argv"], spec["env"])


# -- helpers -----------------------------------------------------------------------------------
def _host_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}


class _sink:
    def __init__(self, log: Path | None):
        self.log = log

    def __enter__(self):
        if self.log is None:
            self.fh = None
            return subprocess.DEVNULL
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.log, "ab")
        return self.fh

    def __exit__(self, *exc) -> None:
        if self.fh is not None:
            self.fh.close()


def _run(cmd: Sequence[str], log: Path | None, what: str) -> None:
    with _sink(log) as out:
        if log is not None:
            out.write(f"$ {shlex.join(cmd)}\n".encode())
            out.flush()
        code = subprocess.run(list(cmd), stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:] if log is not None else ""
        raise RuntimeError(f"{what} failed ({code}): {shlex.join(cmd)}\n{tail}")


def _out(cmd: Sequence[str]) -> str:
    done = subprocess.run(list(cmd), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed: {done.stderr[-2000:]}")
    return done.stdout.strip()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "launch":
        _launch(json.loads(sys.argv[2]))
    sys.exit(__doc__)
