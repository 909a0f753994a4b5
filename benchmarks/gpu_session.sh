#!/usr/bin/env bash
# One call on the lent GPU machine: environment, GPU tests, then the full `pagoda bench` in the
# background (it can outlast one call); `collect` fetches the bench results in a later call.
# Usage (from the repo root, on the GPU machine): bash benchmarks/gpu_session.sh tests|start|wait SECONDS
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d .peer ]; then
  mkdir -p /tmp/site && tar -xJf .peer/fi_pkg.tar.xz -C /tmp/site && python3 -m pip install -q --no-index \
    --no-deps --no-compile --target /tmp/site .peer/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site MAX_JOBS=16
fi
case "${1:-start}" in
start)
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.version.cuda, torch.backends.cudnn.version())"
  mkdir -p /tmp/bench
  setsid nohup bash -c "TRITON_PRINT_AUTOTUNING=1 python3 -m pagoda bench --out /tmp/bench/out > /tmp/bench/log 2>&1; echo done > /tmp/bench/finished" >/dev/null 2>&1 &
  echo "bench started in background"
  ;;
tests)
  python3 -m pytest -m gpu -q -p no:cacheprovider -n 8 "${@:2}" 2>&1 | tee $OUT/gpu-tests.log | tail -30
  ;;
wait)
  for _ in $(seq 1 "${2:-500}"); do [ -f /tmp/bench/finished ] && break; sleep 1; done
  tail -3 /tmp/bench/log
  ls /tmp/bench; tail -c 20000 /tmp/bench/log > $OUT/bench-log.txt; cp /tmp/bench/out/* $OUT/ 2>/dev/null
  cat /tmp/bench/out/attention.md 2>/dev/null | head -80 || tail -30 /tmp/bench/log
  ;;
esac
