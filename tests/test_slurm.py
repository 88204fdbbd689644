"""The Slurm scripts against a real single-node Slurm (installed from Debian's packages and started
by the fixture): a 2-rank CPU training job completes, a preempted job requeues itself and resumes
from its checkpoint, a failing job is not requeued, and the sampler job writes a grid."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, ensure_installed, unavailable_reason

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
# A tiny model and run: about 0.1-0.3 s a step with 2 gloo ranks on 2 CPU cores.
TINY_SETS = ("model.n_layers=1 model.n_heads=2 model.d_query=8 model.d_ff=32 train.batch_size=8 "
             "train.eval_at_start=false train.eval_every=100000 train.eval_batch_size=64 train.n_samples=0 "
             "train.keep_checkpoints=2 data.num_workers=1 data.shuffle_buffer=64 log.every=5 "
             "log.progress_bar=false")
# Options that replace the scripts' GPU-node #SBATCH defaults on this 2-core machine without GPUs.
# --time stays >= 3 min: the scripts' `--signal=B:USR1@120` fires 2 min before the limit.
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=2", "--time=5"]
JOB_TIMEOUT = 240


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running single-node Slurm whose clients are reached through cluster.env."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"cannot run a real Slurm here: {reason}")
    ensure_installed()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def digits(small_digits) -> Path:
    """The session's small prepared digits (tests/conftest.py)."""
    return small_digits


def submit_training(slurm: SlurmCluster, run_dir: Path, data: Path, log: Path, sets: str,
                    processes: int = 2) -> str:
    """sbatch slurm/mnist.sh as CPU ranks on the digits; returns the job id."""
    env = {"CONFIG": "configs/digits.yaml", "DATA_DIR": str(data), "RUN_DIR": str(run_dir),
           "GPUS_PER_NODE": "0", "CPU_PROCS_PER_NODE": str(processes), "EXTRA_SETS": f"{TINY_SETS} {sets}"}
    return slurm.sbatch([*CPU_JOB, f"--output={log}", "slurm/mnist.sh"], env=env, cwd=REPO)


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints of a run: step_N folders holding meta.json (a folder still being
    written, step_N.tmp-XXXX, gets its meta.json just before it is renamed)."""
    return sorted(int(p.parent.name.split("_")[1]) for p in run_dir.glob("checkpoints/step_*/meta.json")
                  if p.parent.name.split("_")[1].isdigit())


def read_log(log: Path) -> str:
    """The job's output so far ('' before it starts)."""
    return log.read_text(errors="replace") if log.exists() else ""


@pytest.fixture(scope="module")
def trained_run(slurm, digits, tmp_path_factory):
    """One finished 2-rank training job: (run folder, job log, final job state)."""
    root = tmp_path_factory.mktemp("trained")
    run_dir, log = root / "run", root / "job.out"
    job_id = submit_training(slurm, run_dir, digits, log, "train.max_steps=30 train.checkpoint_every=10")
    state = slurm.wait(job_id, JOB_TIMEOUT)
    return run_dir, log, state


def test_training_job_completes_with_two_ranks(trained_run):
    run_dir, log, state = trained_run
    text = read_log(log)
    assert (state.state, state.exit_code, state.restarts) == ("COMPLETED", "0:0", 0), text
    assert "1 node(s) x 2 process(es) (CPU, gloo)" in text
    assert "parameters identical on all 2 rank(s)" in text
    assert checkpoint_steps(run_dir)[-1] == 30
    assert (run_dir / "export" / "config.json").is_file()
    assert len(list((run_dir / "logs").rglob("events.out.tfevents.*"))) == 1


def test_preempted_job_requeues_and_resumes(slurm, digits, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    max_steps = 120
    job_id = submit_training(slurm, run_dir, digits, log,
                             f"train.max_steps={max_steps} train.checkpoint_every=10")
    # Preempt once the run has made progress (its first checkpoint), long before it ends.
    slurm.wait(job_id, JOB_TIMEOUT, until=lambda job: job.final or checkpoint_steps(run_dir))
    slurm.run(["scancel", "--signal=USR1", "--batch", job_id])
    state = slurm.wait(job_id, JOB_TIMEOUT + 120)
    text = read_log(log)
    assert (state.state, state.exit_code, state.restarts) == ("COMPLETED", "0:0", 1), text

    stopped = re.search(r"stopped by SIGUSR1 at step (\d+)", text)
    assert stopped, text
    stop_step = int(stopped.group(1))
    assert 0 < stop_step < max_steps
    assert "requeueing job" in text
    # The second start sees SLURM_RESTART_COUNT=1 and picks up the checkpoint saved on the signal.
    second = text.split(f"job {job_id} restart 1 ", 1)
    assert len(second) == 2, text
    assert f"at step {stop_step}" in second[1] and f"training from step {stop_step}" in second[1]
    assert "training from step 0" not in second[1]
    assert checkpoint_steps(run_dir)[-1] == max_steps
    assert len(list((run_dir / "logs").rglob("events.out.tfevents.*"))) >= 1


def test_failing_job_is_not_requeued(slurm, digits, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    # One process: accelerate runs it without torch's launcher (the default of slurm/mnist.sh on
    # its one GPU).
    job_id = submit_training(slurm, run_dir, digits, log, "train.max_steps=5 train.no_such_key=1",
                             processes=1)
    state = slurm.wait(job_id, JOB_TIMEOUT)
    text = read_log(log)
    assert "1 node(s) x 1 process(es)" in text
    # Exit 2 (bad configuration) from the trainer comes through the launcher unchanged.
    assert (state.state, state.exit_code, state.restarts) == ("FAILED", "2:0", 0), text
    assert "no_such_key" in text
    assert "not requeued" in text
    assert not checkpoint_steps(run_dir)


def test_sample_job_writes_a_grid(slurm, trained_run, tmp_path):
    run_dir, _, _ = trained_run
    out_dir, log = tmp_path / "samples", tmp_path / "sample.out"
    env = {"RUN_DIR": str(run_dir), "OUT_DIR": str(out_dir), "N": "4", "GPUS_PER_NODE": "0", "OMP_NUM_THREADS": "1",
           "TEMPERATURES": "1.0 0.8", "SAMPLE_ARGS": "--batch-size 4 --no-progress --seed 3"}
    job_id = slurm.sbatch([*CPU_JOB, f"--output={log}", "slurm/sample.sh"], env=env, cwd=REPO)
    state = slurm.wait(job_id, JOB_TIMEOUT)
    text = read_log(log)
    assert (state.state, state.exit_code) == ("COMPLETED", "0:0"), text
    grids = sorted(p.name for p in out_dir.glob("*.png"))
    assert grids == [f"grid-{job_id}-t0.8.png", f"grid-{job_id}-t1.0.png"], text
    from PIL import Image

    with Image.open(out_dir / grids[0]) as image:
        # 4 digits of 28 x 28 in a near-square grid: at least two cells across and down.
        assert image.width >= 2 * 28 and image.height >= 2 * 28
