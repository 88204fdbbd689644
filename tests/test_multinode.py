"""Multi-node training without Slurm: two `accelerate launch` processes on 127.0.0.1 act as two
machines of one CPU process each (gloo); then the same through slurm/common.sh's per-node
function, stopped the way Slurm stops a job step."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model import ImageTransformer
from train.trainer import parameter_digest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 12
TINY_SETS = [
    "model.n_layers=1", "model.n_heads=2", "model.d_query=8", "model.d_ff=32", "train.batch_size=8",
    f"train.max_steps={MAX_STEPS}", "train.checkpoint_every=6", "train.eval_at_start=false",
    "train.eval_every=100000", "train.eval_batch_size=64", "train.n_samples=0", "data.num_workers=1",
    "data.shuffle_buffer=64", "log.every=3", "log.progress_bar=false",
]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def digits(small_digits) -> Path:
    """The session's small prepared digits (tests/conftest.py)."""
    return small_digits


def launch_machine(rank: int, port: int, data: Path, run_dir: Path, log: Path) -> subprocess.Popen:
    """Start machine `rank` of 2: its own accelerate launch with one CPU process."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_machines", "2", "--machine_rank", str(rank),
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
           "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
           "train/run.py", "--config", "configs/digits.yaml",
           "--set", f"data.dir={data}", "--set", f"train.run_dir={run_dir}"]
    for item in TINY_SETS:
        cmd += ["--set", item]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


@contextlib.contextmanager
def killed_on_exit(processes: list):
    """Yield processes; kill whichever still runs when the block ends (a failed assertion included)."""
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()


def read_logs(logs: list) -> list:
    """The text of each log file."""
    return [log.read_text(errors="replace") for log in logs]


def test_two_machines_end_with_identical_parameters(digits, tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    logs = [tmp_path / f"machine{rank}.log" for rank in (0, 1)]
    with killed_on_exit([launch_machine(rank, port, digits, run_dir, logs[rank]) for rank in (0, 1)]) as machines:
        codes = [machine.wait(timeout=240) for machine in machines]
    texts = read_logs(logs)
    assert codes == [0, 0], "\n\n".join(texts)

    # Each machine ran one process, with the global rank of its machine, and reports its digest.
    digests = []
    for rank, text in enumerate(texts):
        found = re.findall(r"rank (\d+)/(\d+): stopped at step (\d+), parameter digest ([0-9a-f]+)", text)
        assert found == [(str(rank), "2", str(MAX_STEPS), found[0][3])], text
        digests.append(found[0][3])
    assert digests[0] == digests[1]

    # What rank 0 exported is what both machines hold in memory.
    net = ImageTransformer.from_pretrained(run_dir / "export")
    assert net.trained_steps == MAX_STEPS
    assert parameter_digest(net).startswith(digests[0])
    # Only the main process writes TensorBoard events; both ranks' checkpoint parts are there.
    assert len(list((run_dir / "logs").rglob("events.out.tfevents.*"))) == 1
    final = run_dir / "checkpoints" / f"step_{MAX_STEPS:07d}"
    assert (final / "meta.json").is_file()
    assert sorted(p.name for p in final.glob("random_states_*.pkl")) == ["random_states_0.pkl",
                                                                        "random_states_1.pkl"]


def descendants(pid: int) -> list[int]:
    """pid and every process below it (what Slurm's linuxproc tracking signals for a step)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def start_script_node(node_id: int, port: int, data: Path, run_dir: Path, log: Path) -> subprocess.Popen:
    """Run slurm/common.sh's lit_node_train as node `node_id` of a 2-node, 1-process-per-node job."""
    env = dict(os.environ, LIT_REPO=str(REPO), SLURM_NODEID=str(node_id), LIT_NNODES="2",
               LIT_NUM_PROCESSES="2", LIT_GPUS_PER_NODE="0", LIT_MAIN_IP="127.0.0.1",
               LIT_MAIN_PORT=str(port), LIT_TRAIN_SCRIPT="train/run.py", OMP_NUM_THREADS="1")
    args = ["--config", "configs/digits.yaml", "--set", f"data.dir={data}", "--set", f"train.run_dir={run_dir}"]
    for item in TINY_SETS:
        args += ["--set", item]
    args += ["--set", "train.max_steps=100000", "--set", "train.checkpoint_every=5", "--resume", "auto"]
    with open(log, "wb") as out:
        return subprocess.Popen(["bash", "-c", 'source slurm/common.sh && lit_node_train "$@"', "lit-node", *args],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def test_script_nodes_stop_on_usr1_with_exit_75(digits, tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    with killed_on_exit([start_script_node(rank, port, digits, run_dir, logs[rank]) for rank in (0, 1)]) as nodes:
        deadline = time.monotonic() + 180
        while not list(run_dir.glob("checkpoints/step_*/meta.json")):
            assert all(node.poll() is None for node in nodes), [log.read_text() for log in logs]
            assert time.monotonic() < deadline, "no checkpoint after 180 s"
            time.sleep(0.5)
        # Like `scancel --signal=USR1 JOB.STEP`: every process of each node's task gets USR1.
        for node in nodes:
            for pid in descendants(node.pid):
                try:
                    os.kill(pid, signal.SIGUSR1)
                except ProcessLookupError:
                    pass
        codes = [node.wait(timeout=120) for node in nodes]
    texts = read_logs(logs)
    assert codes == [75, 75], "\n\n".join(texts)
    stopped = re.search(r"stopped by SIGUSR1 at step (\d+)", texts[0])
    assert stopped, texts[0]
    step = int(stopped.group(1))
    assert (run_dir / "checkpoints" / f"step_{step:07d}" / "meta.json").is_file()
    digests = [re.findall(rf"rank {rank}/2: stopped at step {step}, parameter digest ([0-9a-f]+)", text)
               for rank, text in enumerate(texts)]
    assert len(digests[0]) == 1 and digests[0] == digests[1], texts
    assert all("processes stopped after saving a checkpoint" in text for text in texts)
