"""The bubblewrap sandbox every graded notebook runs in.

One run = one ``bwrap`` sandbox (Debian package ``bubblewrap``, installed by
``.ci/install-bubblewrap``):

* a read-only view of the system (``/usr``, ``/etc``), the virtual environment and the
  course package, and nothing else of the host: no other submission, no gradebook, no
  ``solutions/``;
* one writable directory, ``/grading``, holding only the copy of this submission (the
  grader reads what is left there after the run), and a private size-limited ``/tmp``;
* no network, its own PID, IPC and UTS namespaces, a new session; the sandbox dies with
  the grader, and every process in it dies when the run ends (PID namespace);
* ``prlimit`` limits on CPU time, address space, processes, file size (which bounds any
  output) and core dumps;
* when the grader runs as root, bwrap sets the sandbox up as root and ``setpriv`` then
  gives the run a user id of its own, without any capability, so that files only root
  may read stay unreadable and the process limit counts only this run's processes;
  otherwise bwrap uses an unprivileged user namespace.
"""

from __future__ import annotations

import functools
import secrets
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

#: The writable working directory inside the sandbox.
SANDBOX_WORKDIR = "/grading"
_FIRST_UID = 1_000_000  # user ids for sandboxed runs when the grader runs as root (one per run)


class SandboxUnavailable(RuntimeError):
    """bwrap is missing or cannot create its namespaces here; the message says what to do."""


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int = 900  # per process (the kernel); the wall-clock timeout is the grader's
    memory_bytes: int = 8 * 2**30  # address space per process
    processes: int = 256  # per run (only enforceable with a user id of its own, i.e. as root)
    file_bytes: int = 64 * 2**20  # largest file a run may write, its captured output included
    tmp_bytes: int = 512 * 2**20  # size of the private /tmp


def readonly_paths() -> list[Path]:
    """What a run needs to see besides the system: the venv, the Python it was made from, the course package."""
    import attribution_course

    package_root = Path(attribution_course.__file__).resolve().parent.parent  # src/ (editable) or site-packages
    venv, base_python = Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()
    return sorted({venv, base_python, package_root})


def _system_binds() -> list[str]:
    args = ["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / name
        if path.is_symlink():  # merged /usr (Debian 12)
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    return args


def run_as_uid() -> int | None:
    """A fresh user id for one run when the grader is root (else None: the grader's own).

    Drawn at random from a large range, so that runs of graders started side by side do
    not share a user id (and its process limit)."""
    if os.geteuid() != 0:
        return None
    return _FIRST_UID + secrets.randbelow(2**30)


def sandboxed_command(
    command: list[str], *, workdir: Path, env: dict[str, str], limits: Limits, uid: int | None
) -> list[str]:
    """``command`` wrapped in bwrap + prlimit; ``workdir`` appears as ``/grading``."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable("bwrap not found; install it with `bash .ci/install-bubblewrap` (Debian package bubblewrap)")
    if uid is None:  # not root: bwrap makes an unprivileged user namespace
        wrapped = [bwrap, "--unshare-user", "--disable-userns"]
    else:  # root: bwrap sets the sandbox up, then setpriv drops to the run's own user id, without capabilities
        wrapped = [bwrap, "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
    wrapped += [
        "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--die-with-parent", "--new-session",
        *_system_binds(),
    ]
    # The private /tmp comes first, so that a checkout or venv that lives under /tmp (a CI clone, say)
    # is bound on top of it instead of being hidden by it.
    wrapped += ["--perms", "1777", "--size", str(limits.tmp_bytes), "--tmpfs", "/tmp"]
    paths = readonly_paths()
    # the folders above each bind (bwrap would create them readable by root only)
    parents = {p for path in paths for p in path.parents if p not in (Path("/"), Path("/tmp"))}
    for parent in sorted(parents, key=lambda p: len(p.parts)):
        wrapped += ["--perms", "0755", "--dir", str(parent)]
    for path in paths:
        wrapped += ["--ro-bind", str(path), str(path)]
    wrapped += [
        "--proc", "/proc", "--dev", "/dev",
        "--bind", str(workdir), SANDBOX_WORKDIR, "--chdir", SANDBOX_WORKDIR,
        "--clearenv",
    ]
    for key, value in env.items():
        wrapped += ["--setenv", key, value]
    wrapped.append("--")
    if uid is not None:
        wrapped += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
                    "--bounding-set=-all", "--no-new-privs"]
    wrapped += ["prlimit", f"--cpu={limits.cpu_seconds}", f"--as={limits.memory_bytes}",
                f"--fsize={limits.file_bytes}", "--core=0"]
    if uid is not None:
        wrapped.append(f"--nproc={limits.processes}")
    return wrapped + ["--", *command]


def sandbox_env(extra: dict[str, str]) -> dict[str, str]:
    """The whole environment inside the sandbox (the host's is cleared)."""
    return {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": "/tmp", "LANG": "C.UTF-8", "TMPDIR": "/tmp", "PYTHONDONTWRITEBYTECODE": "1",
        "MPLCONFIGDIR": "/tmp/matplotlib", **extra,
    }


def prepare_workdir(workdir: Path, uid: int | None) -> None:
    """Make ``workdir`` (and what is in it) writable by the run's user id."""
    if uid is None:
        return
    for path in [workdir, *workdir.rglob("*")]:
        os.chown(path, uid, uid)
    workdir.chmod(0o711)  # bwrap (root without capabilities) must be able to enter it


@functools.lru_cache(maxsize=1)
def check_available() -> None:
    """Raise SandboxUnavailable with the reason if a sandbox cannot be started here."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sandbox-probe-") as folder:
        uid = run_as_uid()
        prepare_workdir(Path(folder), uid)
        command = sandboxed_command(["true"], workdir=Path(folder), env=sandbox_env({}), limits=Limits(), uid=uid)
        try:
            probe = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise SandboxUnavailable(f"bwrap could not be started: {err}") from err
    if probe.returncode != 0:
        raise SandboxUnavailable(
            "bwrap cannot create a sandbox here: " + probe.stderr.strip()
            + " (bubblewrap needs unprivileged user namespaces: sysctl kernel.unprivileged_userns_clone=1 "
            "and user.max_user_namespaces > 0; in a container, allow them or run with --unsafe-no-sandbox "
            "for your own notebook)"
        )
