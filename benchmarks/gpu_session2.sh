#!/usr/bin/env bash
# GPU machine, session 2's final runs (results under $OUT/res). From the repo root:
#   bash benchmarks/gpu_session2.sh serving   # decode (+FlashInfer), paged prefill, cascade (+FlashInfer)
#   bash benchmarks/gpu_session2.sh sampling  # sampling GPU tests, then the sampling study (+FlashInfer)
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
. benchmarks/stage_peer.sh
mkdir -p $OUT/res
case "$1" in
serving)
  timeout 170 python3 -m pagoda bench decode --out $OUT/res 2>&1 | grep -v "^decode \[" | grep -v INFO | tail -14
  timeout 90 python3 -m pagoda bench paged --backends pagoda_paged,pagoda_dense --out $OUT/res 2>&1 \
    | grep -v "^paged \[" | tail -7
  timeout 230 python3 -m pagoda bench cascade --out $OUT/res 2>&1 | grep -v "^cascade \[" | grep -v INFO | tail -18
  ;;
sampling)
  timeout 80 python3 -m pytest -m gpu -q -p no:cacheprovider -n 8 tests/ops/test_sampling.py \
    tests/kernels/test_sampling_interpret.py tests/kernels/test_launch_gpu.py 2>&1 | tail -3
  timeout 190 python3 -m pagoda bench sampling --out $OUT/res 2>&1 | grep -v "^sampling \[" | grep -v INFO | tail -75
  ;;
esac
