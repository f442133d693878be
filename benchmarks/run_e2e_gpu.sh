#!/usr/bin/env bash
# On the GPU machine: install, run the GPU tests of the hybrid engine, write a real-shape
# checkpoint and benchmark it end to end. Usage: bash benchmarks/run_e2e_gpu.sh OUT_DIR [PRESET] [GPU_MEM] [DTYPE]
set -euo pipefail
out=${1:-/tmp/hetero-out}; preset=${2:-deepseek-v2-lite}; gpu_mem=${3:-6GiB}; dtype=${4:-fp8}
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -1 || true
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -m pytest -q -m gpu -x --tb=short tests/test_hybrid.py 2>&1 | tail -30 || true
ckpt=/tmp/ckpt-$preset-$dtype
if [ ! -f "$ckpt/config.json" ]; then
  /usr/bin/time -f "make-model %e s" python3 -m hetero.cli make-model "$preset" "$ckpt" --dtype "$dtype" 2>&1 | tail -2
fi
python3 benchmarks/e2e.py "$ckpt" --gpu-mem "$gpu_mem" --experts ${EXPERTS:-int4 int8} --tag "$dtype" 2>&1 | grep -v "^loading" | tail -20
cp benchmarks/results/e2e-* "$out"/ 2>/dev/null || true
