# shellcheck shell=bash
# Shared by slurm/mnist.sh, slurm/cifar.sh and slurm/sample.sh: sourced, never run or submitted.
#
# How a training job runs (one batch shell on the first node of the allocation):
#   batch shell ── srun (one task per node) ── bash: lit_node_train
#                                                └─ accelerate launch (torch elastic agent)
#                                                    └─ bash: lit_rank_run ── python train/run.py  (x processes per node)
# Preemption: `#SBATCH --signal=B:USR1@120` sends USR1 to the batch shell 120 s before the time
# limit (or `scancel --signal=USR1 --batch JOB` does it at once). The batch shell passes it on to
# srun, which signals every process of the step; the launcher and the bash wrappers ignore it,
# the trainer saves a checkpoint and exits 75. Then the batch shell runs `scontrol requeue`, and the
# restarted job (SLURM_RESTART_COUNT > 0) continues with `--resume auto`. Any other non-zero exit
# is a failure: the job ends with that code and is not requeued.
#
# sbatch runs a copy of the batch script from a spool folder, so the scripts find the repository
# through LIT_REPO or the folder sbatch was called from (SLURM_SUBMIT_DIR), never through $0.

# The trainer's exit code for "stopped on a signal after saving a checkpoint" (EX_TEMPFAIL).
LIT_EXIT_STOPPED=75

lit_log() {
  echo "[$(date '+%F %T')] [${LIT_JOB_KIND:-slurm}] $*"
}

lit_die() {
  # Bad usage or configuration: exit 2 like the Python CLIs.
  lit_log "error: $*" >&2
  exit 2
}

lit_require_count() {
  # lit_require_count NAME VALUE: fail unless VALUE is a whole number.
  [[ "$2" =~ ^[0-9]+$ ]] || lit_die "$1=$2 is not a whole number"
}

lit_enter_repo() {
  # Check that LIT_REPO is the repository and make it the working folder, so that relative
  # CONFIG/DATA_DIR/RUN_DIR are taken from the repository root.
  [[ -f "$LIT_REPO/slurm/common.sh" && -d "$LIT_REPO/train" ]] ||
    lit_die "LIT_REPO=$LIT_REPO is not the repository (no slurm/common.sh, train/); submit from the repository root or set LIT_REPO"
  cd "$LIT_REPO" || lit_die "cannot enter $LIT_REPO"
  export LIT_REPO
}

lit_gpus_per_node() {
  # GPUs per node: GPUS_PER_NODE, else what Slurm allocated, else what nvidia-smi lists, else 0.
  local gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}}
  gpus=${gpus##*:}  # SLURM_GPUS_PER_NODE may read "a100:4"
  if [[ -z "$gpus" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    else
      gpus=0
    fi
  fi
  lit_require_count GPUS_PER_NODE "$gpus"
  echo "$gpus"
}

lit_main_process_ip() {
  # Address of the machine of rank 0: MAIN_PROCESS_IP, else the loopback for a one-node job
  # (no name lookup needed), else the first host of the allocation.
  if [[ -n "${MAIN_PROCESS_IP:-}" ]]; then
    echo "$MAIN_PROCESS_IP"
  elif (( ${SLURM_NNODES:-1} == 1 )); then
    echo 127.0.0.1
  else
    scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1
  fi
}

lit_train_main() {
  # lit_train_main DEFAULT_CONFIG DEFAULT_DATA_DIR DEFAULT_RUN_DIR: the body of a training job.
  CONFIG=${CONFIG:-$1}
  DATA_DIR=${DATA_DIR:-$2}
  RUN_DIR=${RUN_DIR:-$3}
  [[ -f "$CONFIG" ]] || lit_die "CONFIG=$CONFIG: no such file (relative paths start at $LIT_REPO)"

  local gpus procs nnodes
  gpus=$(lit_gpus_per_node) || exit 2
  if (( gpus > 0 )); then
    procs=$gpus
  else
    procs=${CPU_PROCS_PER_NODE:-1}
    lit_require_count CPU_PROCS_PER_NODE "$procs"
  fi
  nnodes=${SLURM_NNODES:-1}
  # What lit_node_train needs on every node (srun passes the environment on).
  export LIT_GPUS_PER_NODE=$gpus LIT_PROCS_PER_NODE=$procs LIT_NNODES=$nnodes
  export LIT_NUM_PROCESSES=$(( nnodes * procs ))
  LIT_MAIN_IP=$(lit_main_process_ip) || exit 2
  # A port derived from the job id, so that two jobs sharing a node do not collide.
  export LIT_MAIN_IP LIT_MAIN_PORT=${MAIN_PROCESS_PORT:-$(( 29500 + ${SLURM_JOB_ID:-0} % 5000 ))}
  export LIT_TRAIN_SCRIPT=${LIT_TRAIN_SCRIPT:-train/run.py}
  if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    # torch's launcher would set 1; share the task's CPUs between the processes of a node instead.
    local threads=$(( ${SLURM_CPUS_PER_TASK:-$procs} / procs ))
    export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
  fi

  local args=(--config "$CONFIG" --set "data.dir=$DATA_DIR" --set "train.run_dir=$RUN_DIR")
  local item extra=()
  read -r -a extra <<< "${EXTRA_SETS:-}"
  for item in "${extra[@]}"; do
    [[ "$item" == *=* ]] || lit_die "EXTRA_SETS item '$item' is not section.key=value"
    args+=(--set "$item")
  done
  # Always resume: a fresh run folder starts from step 0, a requeued or resubmitted job continues.
  args+=(--resume auto)

  lit_log "job ${SLURM_JOB_ID:-none} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-$(hostname -s)}:" \
    "$nnodes node(s) x $procs process(es) ($( (( gpus > 0 )) && echo "GPU, nccl" || echo "CPU, gloo")), rank 0 at $LIT_MAIN_IP:$LIT_MAIN_PORT"
  lit_log "python $LIT_TRAIN_SCRIPT ${args[*]}"

  LIT_STOP_SIGNAL=""
  trap 'lit_on_signal USR1' USR1
  trap 'lit_on_signal TERM' TERM
  # srun in the background: bash runs traps only between commands, and `wait` is one it can
  # interrupt. Ask for exactly one task per node (srun cannot exceed what the job asked for).
  # shellcheck disable=SC2016  # single quotes on purpose: expanded by bash on each node
  srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 \
    --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 \
    bash -c 'source "$LIT_REPO/slurm/common.sh" && lit_node_train "$@"' lit-node "${args[@]}" &
  LIT_SRUN_PID=$!
  lit_wait "$LIT_SRUN_PID"
  lit_finish $?
}

lit_wait() {
  # Wait for a child until it has really ended (a trapped signal interrupts `wait`) and return
  # its exit code.
  local pid=$1
  while wait "$pid"; (( $? > 128 )) && kill -0 "$pid" 2>/dev/null; do :; done
  wait "$pid"
}

lit_on_signal() {
  # USR1 is the preemption warning: pass it on to the step (srun forwards it to every process
  # of it). TERM (scancel, time limit) already reached every process of the job from Slurm.
  LIT_STOP_SIGNAL=$1
  lit_log "received SIG$1: the trainer saves a checkpoint and stops"
  if [[ $1 == USR1 && -n "${LIT_SRUN_PID:-}" ]]; then
    kill -USR1 "$LIT_SRUN_PID" 2>/dev/null
    if [[ -z "${LIT_RESEND_PID:-}" ]]; then
      # A trainer still starting up has not installed its handler and ignores USR1: say it
      # again every 30 s until the step ends (the handler only sets a flag).
      ( while sleep 30 && kill -0 "$LIT_SRUN_PID" 2>/dev/null; do
          kill -USR1 "$LIT_SRUN_PID" 2>/dev/null
        done ) &
      LIT_RESEND_PID=$!
    fi
  fi
}

lit_finish() {
  # Act on the exit code of the training step: done, requeue, or fail.
  local rc=$1
  if [[ -n "${LIT_RESEND_PID:-}" ]]; then
    kill "$LIT_RESEND_PID" 2>/dev/null
  fi
  if (( rc == 0 )); then
    lit_log "training finished"
    exit 0
  fi
  if (( rc == LIT_EXIT_STOPPED )); then
    if [[ "$LIT_STOP_SIGNAL" == TERM ]]; then
      # Cancelled or out of time: a requeue would bring a cancelled job back.
      lit_log "stopped by SIGTERM after saving a checkpoint; not requeued (sbatch again with RUN_DIR=$RUN_DIR to continue)"
      exit "$rc"
    fi
    lit_log "stopped after saving a checkpoint; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || { lit_log "error: scontrol requeue failed" >&2; exit 1; }
    exit "$rc"
  fi
  lit_log "error: training failed with exit code $rc; not requeued" >&2
  exit "$rc"
}

lit_node_train() {
  # One per node, inside srun: start accelerate launch for this node's processes and report the
  # trainer's exit code (the launcher itself reports every failed process as 1).
  # Ignored signals stay ignored in the launcher and the rank wrappers; the trainer sets its own
  # handlers. Without this, Slurm's USR1 to the whole step would kill the launcher. torch's
  # launcher catches TERM itself unless told otherwise, and would SIGKILL the processes 30 s later,
  # perhaps in the middle of their checkpoint.
  trap '' USR1 TERM
  export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
  local status_dir rc
  status_dir=$(mktemp -d "${TMPDIR:-/tmp}/lit-ranks.XXXXXX") || return 1
  local launch=(accelerate launch
    --num_machines "$LIT_NNODES" --machine_rank "$SLURM_NODEID"
    --main_process_ip "$LIT_MAIN_IP" --main_process_port "$LIT_MAIN_PORT"
    --num_processes "$LIT_NUM_PROCESSES" --mixed_precision no --dynamo_backend no)
  if (( LIT_NUM_PROCESSES > 1 )); then
    # accelerate refuses --multi_gpu for a single process (and runs that one directly).
    launch+=(--multi_gpu)
  fi
  if (( LIT_GPUS_PER_NODE == 0 )); then
    # `--cpu --num_processes N` starts one process; `--multi_gpu` with this starts N on gloo.
    export ACCELERATE_USE_CPU=1
  fi
  # shellcheck disable=SC2016  # single quotes on purpose: expanded by each rank's bash
  LIT_STATUS_DIR=$status_dir "${launch[@]}" --no_python \
    bash -c 'source "$LIT_REPO/slurm/common.sh" && lit_rank_run "$@"' lit-rank \
    python "$LIT_TRAIN_SCRIPT" "$@"
  rc=$?
  rc=$(lit_node_status "$rc" "$status_dir")
  rm -rf "$status_dir"
  if (( rc == LIT_EXIT_STOPPED )); then
    lit_log "node $SLURM_NODEID: processes stopped after saving a checkpoint (exit 75; the launcher reports that as FAILED above)"
  fi
  return "$rc"
}

lit_rank_run() {
  # One per training process, under accelerate launch: run it and write down its exit code.
  "$@"
  local rc=$?
  echo "$rc" > "$LIT_STATUS_DIR/rank-${RANK:-0}"
  return "$rc"
}

lit_node_status() {
  # lit_node_status LAUNCHER_RC STATUS_DIR: the node's exit code from its processes' codes.
  # 75 when some process stopped after saving and none failed (the launcher may have killed the
  # rest once the first one exited); else the first failure's code; else the launcher's.
  local launcher_rc=$1 file code stopped=0 failed=""
  if (( launcher_rc == 0 )); then
    echo 0
    return
  fi
  for file in "$2"/rank-*; do
    [[ -f "$file" ]] || continue
    code=$(<"$file")
    if (( code == LIT_EXIT_STOPPED )); then
      stopped=1
    elif (( code != 0 && code < 128 )) && [[ -z "$failed" ]]; then
      failed=$code
    fi
  done
  if [[ -n "$failed" ]]; then
    echo "$failed"
  elif (( stopped )); then
    echo "$LIT_EXIT_STOPPED"
  else
    echo "$launcher_rc"
  fi
}
