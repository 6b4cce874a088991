#!/usr/bin/env bash
# One short session on a GPU machine: everything issue 6 needs a GPU for, results under $OUT.
#   1. figure 6 (device-resident cache vs CPU memo + .to(device), per step and 50 x 2 loop)
#   2. the check on NCCL at the largest rank count the machine has (one GPU per rank)
#   3. one rank more than GPUs: must be refused with exit 2 before NCCL starts
# Usage: OUT=/some/dir benchmarks/gpu_session.sh     (about 2 minutes on one H100/H200)
set -uo pipefail
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
GPUS="$(python -c 'import torch; print(torch.cuda.device_count())')"
{ nvidia-smi -L; python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; } \
  > "$OUT/machine.txt" 2>&1
echo "GPUs: $GPUS" | tee -a "$OUT/machine.txt"

python -m benchmarks.run --only 6 --json "$OUT/figure6.json" 2>&1 | tee "$OUT/figure6.txt"
echo "figure 6 exit: ${PIPESTATUS[0]}" | tee -a "$OUT/figure6.txt"

timeout 300 python -m sp_rope.check --nproc "$GPUS" --backend nccl --report "$OUT/nccl.json" 2>&1 \
  | tail -20 | tee "$OUT/nccl.txt"
echo "nccl check on $GPUS rank(s) exit: ${PIPESTATUS[0]} (want 0)" | tee -a "$OUT/nccl.txt"

timeout 120 python -m sp_rope.check --nproc "$((GPUS + 1))" --backend nccl 2>&1 | tail -3 | tee "$OUT/refusal.txt"
echo "nccl check on $((GPUS + 1)) ranks exit: ${PIPESTATUS[0]} (want 2)" | tee -a "$OUT/refusal.txt"
