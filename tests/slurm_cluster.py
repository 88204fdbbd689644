"""A throwaway single-node Slurm for tests: installed from Debian's packages, configured in a
temporary folder, started as plain daemons (no systemd) and shut down afterwards.

Used by tests/test_slurm.py; also runnable by hand to poke at the scripts:

    python tests/slurm_cluster.py /tmp/slurm      # starts, prints `export SLURM_CONF=...`, waits
    # in another shell: export SLURM_CONF=/tmp/slurm/slurm.conf; sbatch ...
    # Ctrl-C (or kill) stops the daemons again
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
DAEMONS = ["slurmctld", "slurmd", "munged", "sbatch"]
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
MUNGE_KEY = Path("/etc/munge/munge.key")
# Job states after which a job will not run again on its own (a requeued job passes through
# REQUEUED/PENDING, which are not final).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}

SLURM_CONF_TEMPLATE = """\
# Written by tests/slurm_cluster.py: one node, no accounting, everything under {root}
ClusterName=littest
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
# Short credential lifetime and scheduler intervals: a requeued job starts again in ~15 s
# instead of ~150 s.
AuthInfo=cred_expire=10
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
InactiveLimit=0
KillWait=30
MinJobAge=600
SlurmctldTimeout=60
SlurmdTimeout=60
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def unavailable_reason() -> str | None:
    """Why this machine cannot run a throwaway Slurm (None when it can)."""
    if sys.platform != "linux":
        return f"a real Slurm needs Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root (CI runs the suite as root)"
    if all(shutil.which(d) or Path("/usr/sbin", d).exists() for d in DAEMONS):
        return None
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    return None


def _which(name: str) -> str:
    """Full path of a Slurm/munge program (daemons live in /usr/sbin, often off PATH)."""
    found = shutil.which(name) or (f"/usr/sbin/{name}" if Path("/usr/sbin", name).exists() else None)
    if not found:
        raise RuntimeError(f"{name} not found after installing {' '.join(PACKAGES)}")
    return found


def ensure_installed() -> None:
    """Install Slurm and munge from the distribution's packages unless already there."""
    if all(shutil.which(d) or Path("/usr/sbin", d).exists() for d in DAEMONS):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def _free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _munge_works() -> bool:
    """True when a munged answers on the default socket."""
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        back = subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10)
        return back.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _node_memory_mb() -> int:
    """Memory to declare for the node: a bit under what slurmd itself detects."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"RealMemory=(\d+)", out)
    detected = int(match.group(1)) if match else 2048
    return max(512, int(detected * 0.9))


@dataclass
class JobState:
    """What `scontrol show job` says about one job."""

    job_id: str
    state: str
    exit_code: str
    restarts: int

    @property
    def final(self) -> bool:
        """The job is over and will not start again without being requeued by someone."""
        return self.state in FINAL_STATES


class SlurmCluster:
    """One slurmctld + one slurmd (and munged if none is running) on this machine."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root = Path(root)
        self.cpus = cpus
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self._procs: list[subprocess.Popen] = []  # slurmctld, slurmd
        self._munged: subprocess.Popen | None = None  # only when we started it

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm clients (sbatch, squeue, scontrol) talking to this cluster."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, timeout: float = 60.0) -> None:
        """Write the configuration, start the daemons and wait until the node is idle."""
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(SLURM_CONF_TEMPLATE.format(
            root=self.root, node=self.node, cpus=self.cpus, memory_mb=_node_memory_mb(),
            ctld_port=_free_port(), slurmd_port=_free_port()))
        self._start_munge()
        # -D keeps them in the foreground as our children, so stop() knows exactly what to end.
        for daemon in ("slurmctld", "slurmd"):
            log = open(self.root / f"{daemon}.out", "ab")
            self._procs.append(subprocess.Popen(
                [_which(daemon), "-D", "-f", str(self.conf)], stdout=log, stderr=log,
                env=self.env, start_new_session=True))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}; see {self.root}")
            state = self.run(["sinfo", "-h", "-n", self.node, "-o", "%t"], check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"node {self.node} not idle after {timeout:.0f} s (last state {state!r}); "
                           f"see {self.root}/slurmctld.log and slurmd.log")

    def _start_munge(self) -> None:
        """Start munged as the munge user unless one already answers."""
        if _munge_works():
            return
        run_dir = MUNGE_SOCKET.parent
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        if not MUNGE_KEY.exists():
            subprocess.run([_which("mungekey"), "--create", "--keyfile", str(MUNGE_KEY)], check=True)
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o400)
        log = open(self.root / "munged.out", "ab")
        self._munged = subprocess.Popen(
            [_which("munged"), "--foreground", "--force"], stdout=log, stderr=log,
            user="munge", group="munge", start_new_session=True)
        deadline = time.monotonic() + 15
        while not _munge_works():
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not come up; see {self.root}/munged.out")
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel every job of this cluster, shut the daemons down and end munged if we started it."""
        self.run(["scancel", "--user", "root", "--full"], check=False)
        time.sleep(1)
        self.run(["scontrol", "shutdown"], check=False)
        for proc in self._procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.terminate()
        if self._munged is not None:
            self._munged.terminate()
        for proc in [*self._procs, *([self._munged] if self._munged else [])]:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        self._munged = None

    def run(self, cmd: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        kwargs.setdefault("env", self.env)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kwargs)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
        return done

    def sbatch(self, args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        """Submit a batch job and return its id."""
        merged = dict(self.env, **(env or {}))
        done = self.run(["sbatch", "--parsable", *args], env=merged, cwd=cwd)
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> JobState:
        """The current state of a job (kept by slurmctld for MinJobAge seconds after it ends)."""
        out = self.run(["scontrol", "-o", "show", "job", job_id]).stdout
        fields = dict(re.findall(r"(\w+)=(\S*)", out))
        return JobState(job_id, fields.get("JobState", "UNKNOWN"), fields.get("ExitCode", ""),
                        int(fields.get("Restarts", "0") or 0))

    def wait(self, job_id: str, timeout: float, until=lambda job: job.final) -> JobState:
        """Poll a job until `until(job)` holds; TimeoutError (with the state) after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if until(job):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout:.0f} s")
            time.sleep(0.5)


def main() -> None:
    """Start a cluster in the folder given on the command line and keep it up until Ctrl-C."""
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/lit-slurm").resolve()
    reason = unavailable_reason()
    if reason:
        sys.exit(reason)
    ensure_installed()
    # Stop cleanly on Ctrl-C and on `kill` (a background job of a script ignores SIGINT).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
