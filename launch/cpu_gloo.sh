#!/usr/bin/env bash
# CPU + gloo on one machine: NPROC ranks (default 4), one thread each.
# Usage: launch/cpu_gloo.sh [sp_rope.check options...]   e.g. NPROC=8 launch/cpu_gloo.sh --config quick
set -euo pipefail
NPROC="${NPROC:-4}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# torchrun spells it --nproc-per-node (a bare --nproc is rejected as ambiguous).
exec torchrun --standalone --nproc-per-node "$NPROC" -m sp_rope.check --backend gloo "$@"
