"""Every shell command in README.md's ```bash blocks, run as written at a tiny size.

The commands run in README order in one scratch folder that mirrors the repository (so relative
paths such as configs/digits.yaml and train/run.py work and nothing is written into the checkout);
later commands use what earlier ones made (data/digits, runs/digits, demo/run), as a reader would.
This test only appends size flags (TINY), prepares what the README assumes the reader has
(`my_photos`, a 32x32 RGB image folder; `runs/captions`, a caption-conditioned run; for lit-demo,
which takes no model flags, `tiny-digits.yaml`: configs/digits.yaml with a tiny model), and skips the
commands in SKIPPED, each for the reason given there. Run the whole file: the cases depend on order.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent

TINY_TRAIN = [f"--set={value}" for value in (
    "train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2", "train.n_samples=2", "train.batch_size=4",
    "train.eval_batch_size=50", "model.n_layers=1", "model.n_heads=2", "model.d_query=4", "model.d_ff=16",
    "log.progress_bar=false", "train.eval_at_start=false")]
# command pattern -> flags appended to make it tiny (the first pattern that matches applies)
TINY = {
    r"data_prep\.prepare --dataset digits": ["--train-size", "100", "--test-size", "20"],
    r"^lit-demo": ["--max-steps", "2", "--train-size", "100", "--test-size", "20", "--config", "tiny-digits.yaml"],
    r"train/run\.py": TINY_TRAIN,
    r"sample/run\.py": ["--n", "1", "--no-progress"],
    r"^lit-eval": ["--n-per-class", "1", "--classifier-steps", "2", "--no-progress"],
    r"bench/prep_speed\.py": ["--train", "100", "--test", "20"],
    r"bench/attention\.py": ["--lengths", "32", "--repeats", "1", "--heads", "2", "--d-query", "4"],
    r"bench/train_speed\.py": ["--configs", "configs/mnist.yaml", "--attention", "causal-linear", "--backends", "torch",
                               "--steps", "1", "--warmup", "0", "--layers", "1", "--batch-size", "1"],
    r"bench/sample_speed\.py": ["--shapes", "mnist", "--batch-sizes", "1", "--positions", "1", "--bytes", "1",
                                "--methods", "recurrent-linear,softmax-kv-cache,parallel-rerun"],
}
DOWNLOAD, GPU = "needs a download", "needs a GPU"
# command pattern -> why it is not run here
SKIPPED = {
    r"bench/loader_speed\.py": f"{DOWNLOAD} (it reads data/mnist, which the MNIST download prepares)",
    r"bench/precision_check\.py": f"{GPU} (bf16 against fp32 on the GPU)",
    r"gpu_suite\.sh": f"{GPU} (the GPU suite; its CPU dry run is `bash bench/gpu_suite.sh --device cpu`)",
    r"^pip install": f"{DOWNLOAD} (pip fetches the dependencies; CI installs the project before the tests)",
    r"python3 -m pytest": "runs the whole test suite, this test included",
    r"--dataset (mnist|cifar10) .*--download": f"{DOWNLOAD} (MNIST / CIFAR-10 from the internet)",
    r"data_prep\.verify data/cifar10": f"{DOWNLOAD}: reads the CIFAR-10 folder the download above prepares",
    r"configs/cifar10\.yaml|runs/cifar10|runs/mnist|data/mnist": f"{DOWNLOAD} and {GPU}: a CIFAR-10 / MNIST run",
    r"install_fast_transformers\.sh": f"{DOWNLOAD} (pip fetches pytorch-fast-transformers' source)",
    r"^(\S+=\S+ )*sbatch": f"{DOWNLOAD} and {GPU} (and a Slurm cluster: tests/test_slurm.py runs these scripts)",
    r"--machine_rank '?\$RANK": "needs a second machine (tests/test_multinode.py runs the CPU form on one)",
}


def readme_commands() -> list[str]:
    """Each command of README.md's bash blocks: continuations joined, comments dropped, `a && b` split."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                end = words.index("&&") if "&&" in words else len(words)
                commands.append(shlex.join(words[:end]))
                words = words[end + 1:]
    return commands


COMMANDS = readme_commands()


def first_match(table: dict, command: str):
    """The value of the first pattern of table found in command, or None."""
    return next((value for pattern, value in table.items() if re.search(pattern, command)), None)


def write_photos(folder: Path) -> None:
    """my_photos in ImageFolder layout: two classes of 32x32 RGB images, as a reader might have."""
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / label / f"{i}.png")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A scratch folder that mirrors the repository's files (symlinks) and holds my_photos."""
    root = tmp_path_factory.mktemp("readme")
    for entry in REPO.iterdir():
        if entry.name not in (".git", "data", "runs", "demo"):
            (root / entry.name).symlink_to(entry)
    write_photos(root / "my_photos")
    config = yaml.safe_load((REPO / "configs" / "digits.yaml").read_text(encoding="utf-8"))
    config["model"].update(n_layers=1, n_heads=2, d_query=4, d_ff=16)
    (root / "tiny-digits.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return root


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a shell command with this checkout's packages and this Python first on PATH."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_every_skip_pattern_matches_a_readme_command_and_some_commands_run():
    for pattern, reason in SKIPPED.items():
        assert any(re.search(pattern, command) for command in COMMANDS), f"stale skip: {pattern}"
    assert any(first_match(SKIPPED, command) is None for command in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command(command, workspace):
    reason = first_match(SKIPPED, command)
    if reason:
        pytest.skip(f"{command}: {reason}")
    if "runs/captions" in command:  # the README's caption example assumes a caption-conditioned run
        made = run("python train/run.py --config configs/digits.yaml --set model.condition=caption "
                   "--set train.run_dir=runs/captions " + shlex.join(TINY_TRAIN), workspace)
        assert made.returncode == 0, made.stderr[-2000:]
    result = run(shlex.join(shlex.split(command) + (first_match(TINY, command) or [])), workspace)
    assert result.returncode == 0, f"{command}\n{result.stdout[-1500:]}\n{result.stderr[-3000:]}"
