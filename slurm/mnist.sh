#!/bin/bash
# Train the MNIST model on a Slurm cluster.
#
#   sbatch slurm/mnist.sh                                   # from the repository root
#   CONFIG=configs/mnist.yaml RUN_DIR=runs/mnist-big EXTRA_SETS="model.n_layers=12 optim.lr=3e-4" \
#     sbatch --nodes=2 --gpus-per-node=4 slurm/mnist.sh
#
# Environment (relative paths start at the repository root; the job inherits the submitting
# shell's environment, so activate the Python environment before sbatch):
#   CONFIG              training config                          [configs/mnist.yaml]
#   DATA_DIR            prepared data folder (data.dir)          [data/mnist]
#   RUN_DIR             run folder (train.run_dir); submitting again with the same RUN_DIR
#                       continues the run from its newest checkpoint      [runs/mnist]
#   EXTRA_SETS          more overrides, space-separated section.key=value   [none]
#   GPUS_PER_NODE       processes per node = GPUs per node; 0 runs on CPU with gloo
#                       [what Slurm allocated, else what nvidia-smi lists]
#   CPU_PROCS_PER_NODE  processes per node when GPUS_PER_NODE is 0     [1]
#   MAIN_PROCESS_IP     address of the first node       [127.0.0.1 on one node, else its host name]
#   MAIN_PROCESS_PORT   rendezvous port                  [29500 + job id % 5000]
#   LIT_REPO            the repository                   [the folder sbatch was called from]
# The #SBATCH lines below are defaults: options given to sbatch override them, e.g.
#   sbatch --nodes=2 --time=2:00:00 --partition=gpu slurm/mnist.sh
#
# Preemption: 120 s before the time limit (or on `scancel --signal=USR1 --batch JOB`) the trainer
# saves a checkpoint and exits 75, and the job requeues itself and resumes from that checkpoint.
# Any other failure ends the job with the trainer's exit code. See slurm/common.sh.
#SBATCH --job-name=lit-mnist
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --output=slurm-%x-%j.out

set -u -o pipefail
LIT_REPO=${LIT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/common.sh
source "$LIT_REPO/slurm/common.sh" 2>/dev/null ||
  { echo "error: $LIT_REPO/slurm/common.sh not found; submit from the repository root or set LIT_REPO" >&2; exit 2; }
export LIT_JOB_KIND=mnist
lit_enter_repo
lit_train_main configs/mnist.yaml data/mnist runs/mnist
