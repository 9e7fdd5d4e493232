"""Podman from Debian's packages, for building and running deploy/container/Containerfile.

No container registry is reachable here, so ``FROM python:3.11-slim`` cannot be pulled. When
that image is not in the local store, :meth:`Podman.ensure_base_image` makes a stand-in from
Debian's packages (debootstrap, then python3, pip and venv from the same mirror, pip allowed
to install into the system interpreter as in the official image) and imports it under the
official name. The stand-in is Debian's Python 3.11 in /usr/bin where the official image has
its own build in /usr/local: the test checks the Containerfile's steps, not that base.

What this sandbox needs, found by trying (all passed as flags, nothing in /etc is changed):

- ``--runtime runc``: Debian's default crun refuses a host with cgroup v1 and v2 mixed
  ("cgroups in hybrid mode not supported");
- ``--ulimit nofile=H:H --ulimit nproc=32768:32768``: podman asks root containers for more
  than the hard limits, and without CAP_SYS_RESOURCE setrlimit fails;
- ``--cgroup-manager cgroupfs --events-backend file``: there is no systemd running;
- the host's CA bundle lent read-only to the build's RUN steps: PyPI is reached through a
  TLS-intercepting proxy whose CA only the host trusts (it is not stored in the image).

The store (images, the debootstrap tree) is kept under ~/.cache/smtpguard-tests, so a second
run does not build the base again.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from peers import PeerError, find_program

BASE_IMAGE = "docker.io/library/python:3.11-slim"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "smtpguard-tests"


def _debian_mirror() -> str:
    """The mirror apt uses here (the one reachable), else deb.debian.org."""
    if "SMTPGUARD_TEST_DEBIAN_MIRROR" in os.environ:
        return os.environ["SMTPGUARD_TEST_DEBIAN_MIRROR"]
    sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    for path in sources:
        if not path.is_file() or not path.name.endswith((".list", ".sources")):
            continue
        for line in path.read_text(errors="replace").splitlines():
            kind, *rest = line.split() or [""]
            for url in rest if kind in ("URIs:", "deb") else []:
                if url.startswith("http") and url.rstrip("/").endswith("/debian"):
                    return url
    return "http://deb.debian.org/debian"


def _codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "VERSION_CODENAME" and value:
            return value.strip('"')
    return "bookworm"


def ulimit_flags() -> list[str]:
    """No more than this process may have (podman would ask root containers for more)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    if nofile == resource.RLIM_INFINITY:
        nofile = 1048576
    if nproc == resource.RLIM_INFINITY or nproc > 32768:
        nproc = 32768  # podman lowers its own limit to this before starting the runtime
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


class Podman:
    """``podman`` with this project's own store and the flags this sandbox needs."""

    def __init__(self, store: Path = CACHE / "podman") -> None:
        self.program = find_program("podman")
        find_program("runc")
        self.store = store
        (store / "root").mkdir(parents=True, exist_ok=True)
        (store / "run").mkdir(parents=True, exist_ok=True)

    def argv(self, *args: str) -> list[str]:
        return [
            self.program,
            "--root",
            str(self.store / "root"),
            "--runroot",
            str(self.store / "run"),
            "--runtime",
            "runc",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
            *args,
        ]

    def run(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise PeerError(
                f"podman {' '.join(args[:3])} ... exited {done.returncode}:\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done

    def image_exists(self, name: str) -> bool:
        return self.run("image", "exists", name, check=False).returncode == 0

    # -- the base image
    def ensure_base_image(self) -> None:
        if self.image_exists(BASE_IMAGE):
            return
        rootfs = _debian_python_rootfs(CACHE / f"rootfs-{_codename()}-python")
        tar = subprocess.Popen(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE
        )
        try:
            imported = subprocess.run(
                self.argv(
                    "import",
                    "--change",
                    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "--change",
                    "ENV LANG=C.UTF-8",
                    "--change",
                    'CMD ["python3"]',
                    "-",
                    BASE_IMAGE,
                ),
                stdin=tar.stdout,
                capture_output=True,
                text=True,
                timeout=300,
            )
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait(60)
        if imported.returncode != 0 or tar.returncode != 0:
            raise PeerError(f"podman import failed: {imported.stderr[-3000:]}")

    def build(self, context: Path, containerfile: Path, tag: str) -> None:
        lend = ["-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"] if CA_BUNDLE.exists() else []
        self.run(
            "build",
            "--pull=never",
            "--format",
            "docker",  # the OCI format has no HEALTHCHECK
            *ulimit_flags(),
            *lend,
            "-f",
            str(containerfile),
            "-t",
            tag,
            str(context),
            timeout=600,
        )

    def inspect(self, what: str, name: str, template: str) -> str:
        return self.run(what, "inspect", name, "--format", template).stdout.strip()

    def logs(self, name: str) -> str:
        done = self.run("logs", name, check=False)
        return done.stdout + done.stderr


def _debian_python_rootfs(rootfs: Path) -> Path:
    """A Debian tree with python3, pip and venv, like python:*-slim (made once, then reused)."""
    complete = rootfs.parent / f"{rootfs.name}.complete"
    if (rootfs / "usr" / "bin" / "pip3").exists() and complete.exists():
        return rootfs
    if os.geteuid() != 0:
        raise PeerError("making the stand-in base image needs root (debootstrap, chroot)")
    debootstrap = find_program("debootstrap")
    complete.unlink(missing_ok=True)
    shutil.rmtree(rootfs, ignore_errors=True)
    rootfs.parent.mkdir(parents=True, exist_ok=True)
    _check_run(
        [debootstrap, "--variant=minbase", _codename(), str(rootfs), _debian_mirror()], timeout=900
    )
    shutil.copy("/etc/resolv.conf", rootfs / "etc" / "resolv.conf")
    # /proc for the maintainer scripts that want it (apt works without, if need be).
    mounted = subprocess.run(["mount", "-t", "proc", "proc", str(rootfs / "proc")]).returncode == 0
    try:
        _check_run(
            [
                "chroot",
                str(rootfs),
                "/usr/bin/env",
                "DEBIAN_FRONTEND=noninteractive",
                "sh",
                "-c",
                "apt-get update -q && apt-get install -y -q --no-install-recommends "
                "python3 python3-pip python3-venv ca-certificates && apt-get clean && "
                "rm -rf /var/lib/apt/lists/*",
            ],
            timeout=900,
        )
    finally:
        if mounted:
            subprocess.run(["umount", str(rootfs / "proc")], check=False)
    # As in the official image: pip installs into the system interpreter; `python`, `pip`.
    for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        marker.unlink()
    for link, target in (("python", "python3"), ("pip", "pip3")):
        path = rootfs / "usr" / "bin" / link
        if not path.exists():
            path.symlink_to(target)
    (rootfs / "etc" / "resolv.conf").write_text("")
    complete.write_text("")
    return rootfs


def _check_run(argv: Sequence[str], timeout: float = 120) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise PeerError(
            f"{argv[0]} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
