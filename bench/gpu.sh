#!/usr/bin/env bash
# The extractor's GPU figures in one go (for a lent H100/H200-class machine whose python3 already has
# jax[cuda], torch, transformers and safetensors): parity tests with JAX on the GPU, then extract_vs_hf in
# bfloat16 on two workloads, capturing one layer and every layer, for two model shapes.
# Usage: bash bench/gpu.sh [logfile]
set -u
log=${1:-/dev/stdout}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=3
py=${PYTHON:-python3}
{
  nvidia-smi -L; $py -c 'import jax, torch, transformers; print("jax", jax.__version__, jax.devices(), "torch", torch.__version__, "transformers", transformers.__version__)'
  echo "== parity tests, JAX on the GPU"
  JAX_PLATFORMS=cuda timeout 100 $py -m pytest -q -p no:cacheprovider tests/test_model_parity.py 2>&1 | tail -4
  common="--device gpu --dtype bfloat16 --rows 1024 --max-len 1024 --batch-tokens 32768 --hf-batch 32 --repeat 2"
  echo "== device-to-host copy"; timeout 60 $py bench/d2h.py
  echo "== 0.5b, every layer"; timeout 180 $py bench/extract_vs_hf.py $common --shape 0.5b --sites all 2>&1 | grep -v "Loading weights"
  echo "== 0.5b, last layer";  timeout 130 $py bench/extract_vs_hf.py $common --shape 0.5b --sites last 2>&1 | grep -v "Loading weights"
  echo "== 1.5b, last layer";  timeout 170 $py bench/extract_vs_hf.py $common --shape 1.5b --sites last 2>&1 | grep -v "Loading weights"
  echo "== 0.5b, last layer, dense attention (diagnostic)"
  timeout 90 $py bench/extract_vs_hf.py $common --shape 0.5b --sites last --attention dense --workloads equal 2>&1 | grep -v "Loading weights"
} 2>&1 | tee "$log"
