#!/usr/bin/env bash
# GPU machine: run the GPU tests (stage "tests") or the serving benchmarks (stage "bench"), results
# under $OUT. From the repo root: bash benchmarks/gpu_final.sh tests|bench|e2e
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d .peer ]; then
  mkdir -p /tmp/site && tar -xJf .peer/fi_pkg.tar.xz -C /tmp/site 2>/dev/null && python3 -m pip install -q \
    --no-index --no-deps --no-compile --upgrade --target /tmp/site .peer/*.whl 2>/dev/null \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site MAX_JOBS=16
fi
case "$1" in
tests)
  python3 -m pytest -m gpu -q -p no:cacheprovider -n 8 --timeout 400 "${@:2}" 2>&1 | tee $OUT/gpu-tests.log | tail -40
  ;;
bench)
  mkdir -p $OUT/res
  timeout 150 python3 -m pagoda bench decode --out $OUT/res 2>&1 | grep -v "^decode \[" | tail -20
  timeout 100 python3 -m pagoda bench paged --out $OUT/res 2>&1 | grep -v "^paged \[" | tail -12
  timeout 150 python3 -m pagoda bench cascade --out $OUT/res 2>&1 | grep -v "^cascade \[" | tail -25
  timeout 220 python3 -m pagoda bench sampling --out $OUT/res 2>&1 | grep -v "^sampling \[" | tail -45
  ;;
e2e)
  mkdir -p $OUT/res
  timeout "${2:-500}" python3 -m pagoda bench e2e --model qwen3-0.6b --batch-sizes 1,16,64 \
    --backends eager,sdpa,sdpa_cudnn,flex_attention,pagoda,pagoda_engine --no-max-batch-search \
    --out $OUT/res 2>&1 | grep -v "^e2e \[" | tail -40
  ;;
esac
