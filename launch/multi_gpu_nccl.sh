#!/usr/bin/env bash
# NCCL on one machine, one GPU per rank (rank r uses cuda:LOCAL_RANK).
# Usage: launch/multi_gpu_nccl.sh [sp_rope.check options...]   (NPROC defaults to the GPU count)
# Fewer GPUs than ranks is refused by the check itself with exit 2 (two NCCL ranks on one GPU
# would otherwise die inside NCCL with a bare exit 1).
set -euo pipefail
NPROC="${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count())')}"
if [ "$NPROC" -lt 1 ]; then
  echo "multi_gpu_nccl.sh: no CUDA device visible; use launch/cpu_gloo.sh" >&2
  exit 2
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec torchrun --standalone --nproc-per-node "$NPROC" -m sp_rope.check --backend nccl "$@"
