"""Run a notebook copy with nbval, in the sandbox, and read back what the run left.

Everything in the run's working directory was writable by the learner's code, so it is
read with care: regular files only (no symlinks), bounded sizes, ``torch.load`` with
``weights_only=True`` (plain tensors and containers, no code).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import nbformat

from . import sandbox
from .checks import RESULTS_ENV
from .nbval_watchdog import CPU_LOG_ENV

_ANSI = re.compile(r"(\x1b|#x1B)\[[0-9;]*m")  # junit xml escapes ESC as "#x1B"
_MAX_READ = 64 * 2**20


@dataclass
class RunOutcome:
    cells: dict[int, tuple[str, str]]  # nbval cell number -> (passed|failure|error|skipped, message)
    records: dict[str, object]  # exercise -> what the recorder saved (unvalidated)
    timed_out: bool
    returncode: int | None
    output: str  # the tail of pytest's output
    cell_cpu_seconds: list[float]  # CPU seconds of each cell run, in order (as the run reported them)


def run_nbval(
    nb: nbformat.NotebookNode, *, timeout: float, cell_timeout: float, threads: int = 1,
    sandboxed: bool = True, limits: sandbox.Limits = sandbox.Limits(), extra_env: dict[str, str] | None = None,
) -> RunOutcome:
    """Run ``nb`` with nbval in a fresh kernel (in its own sandbox unless ``sandboxed=False``)."""
    with run_folder() as workdir:
        (workdir / "results").mkdir()
        nbformat.write(nb, str(workdir / "submission.ipynb"))
        inside = Path(sandbox.SANDBOX_WORKDIR) if sandboxed else workdir
        env = {RESULTS_ENV: str(inside / "results"), CPU_LOG_ENV: str(inside / "cpu.json"), **(extra_env or {})}
        command = [
            sys.executable, "-m", "pytest", "submission.ipynb", "--nbval-lax", "--nbval-current-env",
            f"--nbval-cell-timeout={cell_timeout}", "--nbval-kernel-startup-timeout=600", f"--junitxml={inside / 'junit.xml'}", "-p", "no:cacheprovider",
            "-p", "attribution_course.grading.nbval_watchdog", "-q", "--rootdir", str(inside), "-c", os.devnull,
        ]
        returncode, timed_out, output = run_process(command, workdir, env=env, timeout=timeout, threads=threads,
                                                    sandboxed=sandboxed, limits=limits)
        return RunOutcome(_parse_junit(workdir / "junit.xml"), _read_records(workdir / "results"), timed_out,
                          returncode, output, _read_cpu_log(workdir / "cpu.json"))


@contextlib.contextmanager
def run_folder():
    """A fresh working directory for one run (``/grading`` in the sandbox), removed afterwards."""
    host_dir = Path(tempfile.mkdtemp(prefix="grade-"))
    try:
        workdir = host_dir / "run"  # the only folder the run sees; the log beside it stays outside
        workdir.mkdir()
        yield workdir
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


def run_process(
    command: list[str], workdir: Path, *, env: dict[str, str], timeout: float, threads: int = 1,
    sandboxed: bool = True, limits: sandbox.Limits = sandbox.Limits(),
) -> tuple[int | None, bool, str]:
    """Run ``command`` in ``workdir`` (made by :func:`run_folder`), in its own sandbox unless
    ``sandboxed=False``; returns its exit code, whether it was stopped after ``timeout``
    wall-clock seconds, and the tail of its output."""
    env = {
        "HF_HUB_OFFLINE": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1", "TOKENIZERS_PARALLELISM": "false",
        # the model is tiny: one thread per kernel is faster than several spin-waiting on a busy machine
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **env,
    }
    if sandboxed:
        uid = sandbox.run_as_uid()
        sandbox.prepare_workdir(workdir, uid)
        command = sandbox.sandboxed_command(command, workdir=workdir, env=sandbox.sandbox_env(env), limits=limits, uid=uid)
        env = {}
    log_path = workdir.parent / "output.log"  # outside the sandbox; its size is bounded by the file-size limit
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=workdir, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        timed_out = False
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(process, sandboxed)
            process.wait()
    if not sandboxed:
        _kill(process, sandboxed)  # whatever the run left running
    return process.returncode, timed_out, _read_tail(log_path)


def _kill(process: subprocess.Popen, sandboxed: bool) -> None:
    """Stop a run. In the sandbox, killing bwrap ends its PID namespace and with it every
    process of the run; without it, kill pytest's session and whatever it started."""
    if sandboxed:
        process.kill()
        return
    try:
        import psutil

        children = psutil.Process(process.pid).children(recursive=True)
    except Exception:  # psutil missing or pytest already gone
        children = []
    for child in children:
        try:
            child.kill()
        except Exception:
            pass
    try:
        os.killpg(process.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass


def _open_regular(path: Path):
    """An open binary file if ``path`` is a regular file (not a symlink) of bounded size, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_READ:
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


def _read_tail(path: Path, limit: int = 20000) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
        return f.read().decode("utf-8", "replace")


def _parse_junit(path: Path) -> dict[int, tuple[str, str]]:
    opened = _open_regular(path)
    if opened is None:
        return {}
    try:
        with opened:
            root = ET.parse(opened).getroot()
    except ET.ParseError:
        return {}
    cells = {}
    for case in root.iter("testcase"):
        found = re.search(r"Cell (\d+)", case.get("name", ""))
        if not found:
            continue
        status, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                status = kind
                message = _ANSI.sub("", (node.get("message") or "") + "\n" + (node.text or ""))
                break
        cells[int(found.group(1))] = (status, message)
    return cells


def _read_cpu_log(path: Path) -> list[float]:
    import json

    opened = _open_regular(path)
    if opened is None:
        return []
    with opened:
        try:
            values = json.load(opened)
        except ValueError:
            return []
    if not isinstance(values, list):
        return []
    return [float(v) if type(v) in (int, float) and math.isfinite(v) and v >= 0 else 0.0 for v in values]


def _read_records(folder: Path) -> dict[str, object]:
    import torch

    records = {}
    try:
        entries = list(os.scandir(folder))[:1000]
    except OSError:
        return records
    for entry in entries:
        if not entry.name.endswith(".pt"):
            continue
        opened = _open_regular(Path(entry.path))
        if opened is None:
            continue
        with opened:
            try:
                records[entry.name[: -len(".pt")]] = torch.load(opened, weights_only=True, map_location="cpu")
            except Exception as err:  # noqa: BLE001 - a file the learner's code forged or broke
                records[entry.name[: -len(".pt")]] = UnreadableRecord(f"{type(err).__name__}: {err}")
    return records


@dataclass(frozen=True)
class UnreadableRecord:
    reason: str
