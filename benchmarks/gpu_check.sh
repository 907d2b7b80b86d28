#!/usr/bin/env bash
# One-command GPU check (a few minutes on an H100/H200), from the repository root:
#   bash benchmarks/gpu_check.sh
# Needs jax with CUDA in $PY's environment, plus torch for the parity tests (skipped without).
# 1. correctness on the GPU: model parity vs transformers, HF round trips, sampler tests
#    (f32 matmuls at highest precision, so TF32 does not blur the 1e-4 parity bound);
# 2. train-step MFU vs a measured bf16 matmul peak at the Qwen3-0.6B shape;
# 3. decode throughput at the same shape;
# 4. the slot engine against the step-synchronous one, and asynchronous training, on the demo
#    (issue 13: on an accelerator a decode row costs little, unlike on the 2-core CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
"$PY" -c "import jax; assert jax.default_backend() == 'gpu', jax.devices(); print(jax.devices())"
JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" -m pytest -q -x \
  tests/test_models.py tests/test_hf_parity.py tests/test_sampling.py
"$PY" benchmarks/train_step.py --preset qwen3_0_6b --dtype bfloat16 --batch 8 --seq 1024 --no-torch
"$PY" benchmarks/gpu_check.py
"$PY" benchmarks/rollout.py --out benchmarks/out/rollout_gpu.json
"$PY" benchmarks/rollout.py --out benchmarks/out/rollout_gpu.json --end-to-end --skip-rollout --seeds 0 --iterations 6
