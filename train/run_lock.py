"""RUN/lock: one trainer per run folder, for the life of the job.

The main process takes an exclusive `fcntl.flock` on RUN/lock and writes who holds it (host, pid,
Slurm job id, start time) into the file. The kernel drops a flock when its holder dies, however it
dies (kill -9 included), so a lock left by a dead process never blocks a restart: the file stays, the
lock does not. A second trainer finds the lock taken and stops at once, naming the holder.

On a shared file system (NFS v4, Lustre mounted with `flock`) the lock works across nodes; the
server may hold a crashed node's lock until its lease ends (about 90 s on NFS), so a requeued job
that finds its own Slurm job id in the file waits for the lock instead of giving up.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from typing import Callable, Optional

LOCK_NAME = "lock"
SAME_JOB_WAIT_S = 180.0  # a requeued job waits this long for its own previous incarnation's lock
# errno values meaning "this file system does not do flock" (Lustre without -o flock, some FUSE mounts)
_NO_LOCKING = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL}


class RunLockError(RuntimeError):
    """The run folder is held by another trainer; str() is one line naming the holder."""


def read_holder(text: str) -> dict:
    """What a lock file's content records of its holder ({} when it names none)."""
    with contextlib.suppress(ValueError):
        info = json.loads(text)
        if isinstance(info, dict):
            return info
    return {}


def describe_holder(text: str) -> str:
    """One readable phrase from a lock file's content."""
    info = read_holder(text)
    if not {"host", "pid", "started"} <= info.keys():
        return "an unknown process (the lock file names no holder)"
    job = f", Slurm job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    return f"host {info['host']}, pid {info['pid']}{job}, since {info['started']}"


class RunLock:
    """An exclusive flock on RUN/lock; acquire() once, release() (or process exit) frees it."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self, warn: Callable[[str], None] = print) -> None:
        """Take the lock or raise RunLockError naming the holder; warn() says when the file system cannot lock."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        # No O_TRUNC: a process that fails to get the lock must not wipe the holder's record.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno in _NO_LOCKING:
                    warn(f"warning: {self.path}: this file system does not support file locks "
                         f"({os.strerror(err.errno)}); nothing stops a second trainer on this folder")
                    break
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            if deadline is None:  # a requeue of this Slurm job waits for its old node to let go
                job = os.environ.get("SLURM_JOB_ID")
                same_job = bool(job) and read_holder(holder).get("slurm_job_id") == job
                deadline = time.monotonic() + (SAME_JOB_WAIT_S if same_job else 0.0)
            if time.monotonic() >= deadline:
                os.close(fd)
                raise RunLockError(f"{self.path}: run folder in use by {describe_holder(holder)}; "
                                   "wait for that job to end, stop it, or choose another train.run_dir")
            time.sleep(1.0)
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record + b"\n", 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays: its content names the last holder)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
