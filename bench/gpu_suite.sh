#!/usr/bin/env bash
# The GPU issue's table through the user commands (bench/gpu_user.py), and the earlier benchmarks on request.
#
#   bash bench/gpu_suite.sh                    # from the repository root, on a machine with a CUDA GPU:
#                                              # the table, about 6 minutes on one H200
#   bash bench/gpu_suite.sh --device cpu       # dry run on a CPU: tiny models, a few steps; every entry
#                                              # name comes out, in $OUT/gpu-YYYY-MM-DD.json only
#   OUT=/tmp/gpu bash bench/gpu_suite.sh
#   bash bench/gpu_suite.sh user cuda_checks   # only these steps (the day's results file keeps the rest)
#
# Steps: user (the default: train/run.py and lit-sample as users run them, see bench/gpu_user.py), and
# the earlier benchmarks cuda_checks sample train precision loader attention (loader reads precision's data).
# SAMPLE_ARGS replaces the sample step's batch and method options; LIT_CIFAR_BATCH and LIT_SAMPLE_ARGS
# change the user step's CIFAR-10 training batch and lit-sample's options.
#
# Packages: the project (or PYTHONPATH=repo root), webdataset and, for the fla backend,
# flash-linear-attention must be importable. A machine without network gets them as wheels: every
# *.whl in $WHEELS (default .whl) is installed into /tmp/site first, e.g. prepared where pip works with
#   echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: \
#       --python-version 3.12 -d .whl webdataset==1.0.2 braceexpand==0.1.7 fla-core==0.6.0
# (the H200 image has einops, numpy and pyyaml, which they require), and `.whl` carried to the machine.
# Each step has a time limit, so one hang cannot eat the rest; a failed step is reported and the
# others still run. Writes:
#   bench/results/gpu-YYYY-MM-DD.json  every figure (name, value, unit, config) + device and versions,
#                                      merged into the newest earlier file's (a later run wins by name)
#   $OUT/summary.md                    the goals table and every step's table
#   $OUT/logs.tar.gz                   each step's full log and raw JSON
set -uo pipefail
cd "$(dirname "$0")/.."
device=${SUITE_DEVICE:-cuda}
if [ "${1:-}" = "--device" ]; then device=${2:?--device needs cuda or cpu}; shift 2; fi
case $device in cuda|cpu) ;; *) echo "gpu_suite: --device $device: choose cuda or cpu" >&2; exit 2 ;; esac
out=${OUT:-bench/out}
work=$(mktemp -d /tmp/gpu_suite.XXXXXX)
mkdir -p "$out" bench/results
export PYTHONUNBUFFERED=1
day=$(date -u +%Y-%m-%d)
began_suite=$SECONDS
wheels=${WHEELS:-.whl}
if ls "$wheels"/*.whl >/dev/null 2>&1; then
  echo "== installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into /tmp/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheels"/*.whl || { echo "gpu_suite: installing the wheels in $wheels failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

python3 - "$work/device.json" "$day" "$device" <<'PY'
import json, sys, torch
info = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device",
        "torch": torch.__version__, "cuda": torch.version.cuda, "date": sys.argv[2]}
if sys.argv[3] == "cpu":
    info["device"] = "CPU dry run (tiny models: the entries come out, the values are no speed figures)"
for name in ("triton", "fla", "accelerate", "webdataset"):
    try:
        info[name] = __import__(name).__version__
    except Exception as error:  # not installed, or broken: say which
        info[name] = f"unavailable ({type(error).__name__})"
print(json.dumps(info))
json.dump(info, open(sys.argv[1], "w"))
PY

steps=${*:-user}
if [ "$device" = cuda ] && ! python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "gpu_suite: no CUDA device here; GPU figures come only from a GPU machine (--device cpu: a dry run)" >&2
  exit 2
fi
status=0
step() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  case " $steps " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name (limit ${limit}s): $*"
  local began=$SECONDS
  timeout "$limit" "$@" > "$work/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$work/$name.log"
  echo "== $name: exit $rc after $((SECONDS - began)) s"
  [ $rc = 0 ] || status=1
}

step user $([ "$device" = cuda ] && echo 420 || echo 1500) python3 bench/gpu_user.py --work "$work/user" --device "$device"
[ -f "$work/user/user.json" ] && cp "$work/user/user.json" "$work/user.json"
step cuda_checks 240 env LIT_GPU_RECORD="$work/cuda_checks.jsonl" \
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
# shellcheck disable=SC2086  # SAMPLE_ARGS is a list of options
step sample 140 python3 bench/sample_speed.py --device cuda --full --shapes mnist,cifar10 \
  ${SAMPLE_ARGS:---batch-sizes 256,1024,4096 --methods recurrent-linear,recurrent-compiled,recurrent-eager,softmax-kv-cache --compile-batches 4096 --max-softmax-batch 256 --max-eager-batch 256} \
  --json "$work/sample.json"
step train 110 python3 bench/train_speed.py --device cuda --batch-size 64 --steps 10 --warmup 3 \
  --backends torch fla --json "$work/train.json"
step precision 120 python3 bench/precision_check.py --out "$work/precision"
step loader 30 python3 bench/loader_speed.py --data "$work/precision/digits256" --batch-size 64 \
  --workers 0,4,8 --batches 200 --json "$work/loader.json"
step attention 50 python3 bench/attention.py --device cuda --dtype bf16 --lengths 3072

# the day's file starts from the newest earlier one, so its goals table covers every step measured;
# a dry run's file goes to $OUT alone, never among the GPU results
if [ "$device" = cuda ]; then
  results=bench/results/gpu-$day.json
  newest=$(ls bench/results/gpu-*.json 2>/dev/null | sort | tail -n 1)
  if [ ! -e "$results" ] && [ -n "$newest" ]; then cp "$newest" "$results"; fi
  python3 bench/gpu_results.py "$work" "$results" | tee "$work/goals.md"
else
  results=$work/gpu-$day.json
  python3 bench/gpu_results.py --dry-run "$work" "$results" | tee "$work/goals.md"
fi
{
  echo "# GPU suite, $day"; cat "$work/goals.md"
  for name in $steps; do
    echo; echo "## $name"; grep -E '^\||passed|failed|PASS|FAIL|best|resume|second half|test bits|equal|images/s' "$work/$name.log"
  done
} > "$out/summary.md"
cp "$results" "$out/"
(cd "$work" && find . -path ./user/data -prune -o -path ./user/src -prune -o -path ./user/runs -prune -o \
  \( -name '*.log' -o -name '*.json' -o -name '*.jsonl' \) -print | tar -czf "$out/logs.tar.gz" -T -)
echo "gpu_suite: $((SECONDS - began_suite)) s in all; $out/summary.md, $(basename "$results")"
exit $status
