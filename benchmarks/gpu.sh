#!/usr/bin/env bash
# The device check (issue 20), one script on one GPU, < 8 minutes: the CUDA tests, then the CUDA
# figures (bench JSON to $OUT or ./gpu-bench.json). Installs nothing beyond the project itself:
#   bash benchmarks/gpu.sh            # in the repository root, torch with CUDA already installed
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-.}"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true
python -m pip install -q --no-deps -e . >/dev/null
python -m pytest -m cuda -q -p no:cacheprovider 2>&1 | tee "$OUT_DIR/gpu-tests.log"
python -m benchmarks.cli --json "$OUT_DIR/gpu-bench.json" --only \
  probe_pass_cost_cuda,probe_pass_cost_cuda_224,stats_memory_cuda_224,vectorized_speedup_cuda,ensemble_training_cuda,alexnet224_monitor_overhead_cuda \
  2>&1 | tee "$OUT_DIR/gpu-bench.log"
