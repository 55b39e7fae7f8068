#!/bin/sh
# run_on_gpu.sh - the CUDA path's checks on a machine with an NVIDIA GPU, results under $OUT.
#   OUT=/some/dir sh tests/cuda/run_on_gpu.sh
# 1. builds the CUDA programs (make cuda, for this GPU's architecture when nvidia-smi says it)
# 2. build/cuda/test_cuda in the deterministic and in the fast mode: every kernel, the store,
#    AdamW, clipping and the layer against the CPU path; 20 training steps of a tiny LM on the
#    device against the CPU; two deterministic device runs bit-identical
# 3. determinism end to end: build/cuda/train_lm --device cuda twice (20 steps, the same seed),
#    the two logs must be identical (when data/brown is there)
# 4. benchmarks: bench/moe_layer on the CPU and --device cuda (deterministic and fast, with the
#    cuBLAS-only GEMM time), PyTorch CUDA on the same shapes when torch sees the GPU
# Each step's output goes to $OUT/<step>.txt; $OUT/summary.txt lists ok/FAILED per step.
# Nothing here has run yet: the session that wrote it had no GPU.
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: > "$summary"
step() { # name, command...
    name=$1
    shift
    echo "== $name: $*"
    if "$@" > "$OUT/$name.txt" 2>&1; then echo "ok     $name" >> "$summary"; else echo "FAILED $name (status $?)" >> "$summary"; fi
    tail -n 3 "$OUT/$name.txt"
}

{ nvidia-smi || true; nvcc --version || /usr/local/cuda/bin/nvcc --version; } > "$OUT/device.txt" 2>&1
cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
arch=""
[ -n "$cc" ] && arch="-arch=sm_$cc"
step build make -j 4 cuda NVCC_ARCH="$arch" build/bench/moe_layer
step test_cuda_deterministic ./build/cuda/test_cuda
step test_cuda_fast ./build/cuda/test_cuda --fast

if [ -f data/brown/train/news.txt ]; then
    lm="--steps 20 --batch 8 --seq 64 --d 128 --layers 2 --heads 4 --balance none --eval-every 0 --sample 0 --seed 3"
    step train_lm_cuda_run1 ./build/cuda/train_lm --device cuda $lm --out "$OUT/lm1"
    step train_lm_cuda_run2 ./build/cuda/train_lm --device cuda $lm --out "$OUT/lm2"
    step train_lm_cpu ./build/cuda/train_lm $lm --out "$OUT/lm_cpu"
    step train_lm_cuda_identical cmp "$OUT/lm1/lm.csv" "$OUT/lm2/lm.csv"
    step train_lm_cuda_checkpoints_identical cmp "$OUT/lm1/lm.ckpt" "$OUT/lm2/lm.ckpt"
    # the device's losses beside the CPU's, step by step (they differ by rounding only)
    paste -d, "$OUT/lm1/lm.csv" "$OUT/lm_cpu/lm.csv" > "$OUT/train_lm_cuda_vs_cpu.csv" 2>/dev/null
else
    echo "SKIP   train_lm (data/brown is absent: make data)" >> "$summary"
fi

step bench_layer_cpu ./build/bench/moe_layer
step bench_layer_cuda ./build/cuda/moe_layer --device cuda
step bench_layer_cuda_fast ./build/cuda/moe_layer --device cuda --fast
if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' > /dev/null 2>&1; then
    step bench_layer_torch_cuda env MOE_TORCH_DEVICE=cuda python3 bench/torch_moe_layer.py
else
    echo "SKIP   bench_layer_torch_cuda (no PyTorch with CUDA here)" >> "$summary"
fi
cat "$summary"
! grep -q FAILED "$summary"
