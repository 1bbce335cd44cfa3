"""A sandbox for model-written code: each program in its own confined process, many in a bounded pool.

What is enforced, and where (each result lists what held in `enforced`):
- everywhere: wall-clock timeout (the whole process group is killed), CPU-time, address-space, file-size,
  open-file and core-dump limits; a fresh temporary work directory, removed afterwards; a scrubbed environment;
  stdin closed; stdout/stderr captured up to `output_bytes` (a program printing more is killed);
- Linux as root (our CI and GPU machines): a new network namespace (no network) and mount namespace (private
  tmpfs over /tmp, /var/tmp, /dev/shm), and the program runs as a dedicated unprivileged uid per worker slot,
  so the process limit holds (RLIMIT_NPROC is ignored for root and counted per uid), host files are read-only to
  it, it cannot signal the caller or read the caller's environment, and every process left behind with that
  uid is killed after the run;
- Linux as a user: the network and mount namespaces through a user namespace when the kernel allows it; the
  process limit then counts the caller's own processes too, and the uid is the caller's (weaker isolation).
The untrusted interpreter must be executable by the sandbox uid: `sys.executable` when it is, else the
system's python3.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

LAUNCHER = Path(__file__).with_name("_sandbox_launcher.py")
SANDBOX_UID_BASE = 61000  # uids 61000.. are used for worker slots; none has a passwd entry or files


class SandboxError(RuntimeError):
    """The sandbox itself cannot run (no usable interpreter, ...), as opposed to a program failing."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_bytes: int = 1 << 30
    max_processes: int = 32
    file_bytes: int = 16 << 20
    output_bytes: int = 64 << 10


@dataclass
class SandboxResult:
    status: str  # passed | failed | exited_early | timeout | output_limit
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    enforced: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _executable_by_others(path: str) -> bool:
    """Whether an unprivileged stranger can execute `path` (every directory searchable, file executable)."""
    real = Path(os.path.realpath(path))
    try:
        if not real.stat().st_mode & stat.S_IXOTH:
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in real.parents)
    except OSError:
        return False


def default_interpreter() -> str:
    """The Python that runs untrusted code: ours when the sandbox uid can execute it, else the system's."""
    if os.geteuid() != 0 or _executable_by_others(sys.executable):
        return sys.executable
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3") or ""):
        if candidate and _executable_by_others(candidate):
            return candidate
    raise SandboxError(
        f"no Python interpreter executable by an unprivileged user: {sys.executable} is not (its directories "
        "are private) and no system python3 was found; install python3 system-wide or pass interpreter="
    )


def _scrubbed_env(workdir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


class _Capture(threading.Thread):
    """Reads one pipe up to a byte limit; past the limit it calls `overflow` (which kills the program)."""

    def __init__(self, pipe, limit: int, overflow: Callable[[], None]) -> None:  # noqa: ANN001
        super().__init__(daemon=True)
        self.pipe, self.limit, self.overflow = pipe, limit, overflow
        self.data = bytearray()
        self.exceeded = False

    def run(self) -> None:
        while chunk := self.pipe.read1(65536) if hasattr(self.pipe, "read1") else self.pipe.read(65536):
            room = self.limit - len(self.data)
            self.data += chunk[: max(room, 0)]
            if len(chunk) > room:
                self.exceeded = True
                self.overflow()
                break
        self.pipe.close()


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_uid(uid: int) -> None:
    """Kill every process running as `uid` (fork-bomb children that left the process group included)."""
    code = f"import os, signal\nos.setuid({uid})\nos.kill(-1, signal.SIGKILL)"
    subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, check=False, timeout=30)


def run_program(
    source: str,
    limits: SandboxLimits | None = None,
    interpreter: str | None = None,
    slot: int = 0,
) -> SandboxResult:
    """Run one Python program under the sandbox and report how it ended."""
    limits = limits or SandboxLimits()
    interpreter = interpreter or default_interpreter()
    uid = SANDBOX_UID_BASE + slot
    is_root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="moelm-sandbox-"))
    workdir = base / "work"
    workdir.mkdir()
    (workdir / "main.py").write_text(source)
    if is_root:
        os.chown(workdir, uid, uid)
    report = base / "enforced.json"
    # Passing means the program ran to its last line: the runner prints this nonce after it, and the program
    # never sees it (not in its text, argv or environment), so exiting early with status 0 or printing a fake
    # marker cannot pass.
    nonce = secrets.token_hex(16)
    nonce_read, nonce_write = os.pipe()
    os.write(nonce_write, nonce.encode())
    os.close(nonce_write)
    config = {
        "workdir": str(workdir),
        "program": "main.py",
        "interpreter": interpreter,
        "uid": uid,
        "report": str(report),
        "cpu_s": int(limits.cpu_s),
        "memory_bytes": int(limits.memory_bytes),
        "file_bytes": int(limits.file_bytes),
        "max_processes": int(limits.max_processes),
        "env": _scrubbed_env(str(workdir)),
        "nonce_fd": nonce_read,
    }
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-I", str(LAUNCHER), json.dumps(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_scrubbed_env(str(workdir)),
        start_new_session=True,
        close_fds=True,
        pass_fds=(nonce_read,),
    )
    os.close(nonce_read)
    pipes = (process.stdout, process.stderr)
    captures = [_Capture(pipe, limits.output_bytes, lambda: _kill_group(process)) for pipe in pipes]
    for capture in captures:
        capture.start()
    timed_out = False
    try:
        process.wait(timeout=limits.timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    _kill_group(process)
    process.wait()
    if is_root:
        _kill_uid(uid)
    for capture in captures:
        capture.join(timeout=5)
    wall = time.perf_counter() - start
    try:
        enforced = json.loads(report.read_text())
    except (OSError, ValueError):
        enforced = []
    shutil.rmtree(base, ignore_errors=True)
    stdout, stderr = (c.data.decode("utf-8", "replace") for c in captures)
    finished = stdout.endswith(f"\n{nonce}\n")
    stdout = stdout.removesuffix(f"\n{nonce}\n")
    if timed_out:
        status = "timeout"
    elif any(c.exceeded for c in captures):
        status = "output_limit"
    elif process.returncode != 0:
        status = "failed"
    else:
        status = "passed" if finished else "exited_early"
    return SandboxResult(status, process.returncode, stdout, stderr, wall, enforced)


def run_programs(
    sources: Sequence[str],
    limits: SandboxLimits | None = None,
    workers: int | None = None,
    interpreter: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[SandboxResult]:
    """Run many programs over a bounded pool; each worker slot has its own sandbox uid. Order is kept."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(sources) or 1))
    interpreter = interpreter or default_interpreter()
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(workers):
        slots.put(slot)

    def one(source: str) -> SandboxResult:
        slot = slots.get()
        try:
            return run_program(source, limits, interpreter, slot)
        finally:
            slots.put(slot)
            if progress is not None:
                progress(1)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, sources))
