#!/usr/bin/env bash
# Build and install pytorch-fast-transformers 0.4.0 against the torch that is installed now.
#
# Why a script: the package is source-only (2021) and does not install with a plain `pip install`:
#  - its setup.py imports torch, so it needs --no-build-isolation (else "PyTorch is required");
#  - when `nvcc` is on PATH it compiles CUDA kernels with a hard-coded `compute_50` arch that
#    current toolkits reject, so on a machine without a GPU we hide nvcc and build CPU-only;
#  - on a GPU machine we keep nvcc, point CUDA_HOME at it and set TORCH_CUDA_ARCH_LIST to the GPU's.
# The wheel is cached (keyed by torch version and CPU/CUDA) so a second run installs in seconds.
# Cost: about 5.5 minutes on 2 cores CPU-only; longer with CUDA kernels.
#
# Usage: scripts/install_fast_transformers.sh [--cpu-only]
#   FAST_TRANSFORMERS_CACHE  where built wheels are kept (default ~/.cache/linear-image-transformer)
set -euo pipefail

version=0.4.0
cache=${FAST_TRANSFORMERS_CACHE:-$HOME/.cache/linear-image-transformer}
python=${PYTHON:-python3}

torch_version=$($python -c 'import torch; print(torch.__version__)') || {
  echo "install_fast_transformers: torch is not importable by $python; install the project first" >&2
  exit 1
}
has_gpu=$($python -c 'import torch; print(int(torch.cuda.is_available()))')
if [ "${1:-}" = "--cpu-only" ] || [ "$has_gpu" = 0 ] || ! command -v nvcc >/dev/null; then
  flavour=cpu
  # Hide nvcc (and CUDA_HOME) so its setup.py builds only the CPU extensions.
  nvcc_dir=$(dirname "$(command -v nvcc 2>/dev/null || echo /nonexistent/nvcc)")
  PATH=$(echo "$PATH" | tr ':' '\n' | grep -v -x -F "$nvcc_dir" | paste -sd: -)
  export PATH
  unset CUDA_HOME CUDA_PATH
  export FORCE_CUDA=0
else
  flavour=cuda
  CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
  export CUDA_HOME
  arch=$($python -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}")')
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
fi

wheel_dir="$cache/fast-transformers-$version-torch-$torch_version-$flavour"
if ! ls "$wheel_dir"/pytorch_fast_transformers-*.whl >/dev/null 2>&1; then
  echo "install_fast_transformers: building pytorch-fast-transformers $version ($flavour, torch $torch_version); this takes minutes" >&2
  tmp="$wheel_dir.tmp.$$"
  rm -rf "$tmp"; mkdir -p "$tmp"
  # --no-cache-dir: pip's own wheel cache would hand back a wheel built against another torch.
  MAX_JOBS=${MAX_JOBS:-$(nproc)} $python -m pip wheel --no-cache-dir --no-deps --no-build-isolation \
    --no-binary pytorch-fast-transformers -w "$tmp" "pytorch-fast-transformers==$version"
  rm -rf "$wheel_dir"; mv "$tmp" "$wheel_dir"   # complete or absent
fi
$python -m pip install --no-deps --force-reinstall "$wheel_dir"/pytorch_fast_transformers-*.whl
$python -c 'from fast_transformers.causal_product import causal_dot_product; print("fast-transformers OK")'
