#!/bin/bash
# Sample image grids from the newest checkpoint (or export) of a training run on a Slurm cluster.
#
#   RUN_DIR=runs/mnist sbatch slurm/sample.sh           # from the repository root
#   RUN_DIR=runs/cifar10 TEMPERATURES="1.0 0.9 0.8" SAMPLE_ARGS="--n 100 --top-p 0.95" sbatch slurm/sample.sh
#
# Environment (relative paths start at the repository root; the job inherits the submitting
# shell's environment, so activate the Python environment before sbatch):
#   RUN_DIR        the run to sample from; sample/run.py takes its export/ if that is
#                  newer, else its newest complete checkpoint            [runs/mnist]
#   OUT_DIR        where the grids go                                    [RUN_DIR/samples]
#   TEMPERATURES   one grid per temperature, space-separated: OUT_DIR/grid-JOBID-tT.png   [1.0]
#   N              images per grid; per row with --classes/--caption      [64]
#   SAMPLE_ARGS    more sample/run.py options, e.g. "--classes 0-9 --top-k 50 --seed 1"   [none]
#   GPUS_PER_NODE  0 samples on the CPU        [what Slurm allocated, else what nvidia-smi lists]
#   LIT_REPO       the repository              [the folder sbatch was called from]
# The #SBATCH lines below are defaults: options given to sbatch override them
# (e.g. `sbatch --gpus-per-node=0 --cpus-per-task=16 slurm/sample.sh` for a CPU node).
#SBATCH --job-name=lit-sample
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=01:00:00
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -u -o pipefail
LIT_REPO=${LIT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
# shellcheck source=slurm/common.sh
source "$LIT_REPO/slurm/common.sh" 2>/dev/null ||
  { echo "error: $LIT_REPO/slurm/common.sh not found; submit from the repository root or set LIT_REPO" >&2; exit 2; }
export LIT_JOB_KIND=sample
lit_enter_repo

RUN_DIR=${RUN_DIR:-runs/mnist}
OUT_DIR=${OUT_DIR:-$RUN_DIR/samples}
N=${N:-64}
lit_require_count N "$N"
[[ -d "$RUN_DIR" ]] || lit_die "RUN_DIR=$RUN_DIR: no such run folder"
gpus=$(lit_gpus_per_node) || exit 2
device=$( (( gpus > 0 )) && echo cuda || echo cpu )
read -r -a extra <<< "${SAMPLE_ARGS:-}"
read -r -a temperatures <<< "${TEMPERATURES:-1.0}"
mkdir -p "$OUT_DIR" || lit_die "cannot create OUT_DIR=$OUT_DIR"
# torch would start a thread per core of the node; use the CPUs the job was given.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

for temperature in "${temperatures[@]}"; do
  out="$OUT_DIR/grid-${SLURM_JOB_ID:-local}-t$temperature.png"
  lit_log "sampling $N images from $RUN_DIR at temperature $temperature on $device -> $out"
  srun --ntasks=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    python sample/run.py --checkpoint "$RUN_DIR" --out "$out" --n "$N" \
    --temperature "$temperature" --device "$device" "${extra[@]}"
  rc=$?
  (( rc == 0 )) || { lit_log "error: sampling failed with exit code $rc" >&2; exit "$rc"; }
done
lit_log "done: ${#temperatures[@]} grid(s) in $OUT_DIR"
