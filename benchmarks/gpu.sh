#!/usr/bin/env bash
# Reproduce pagoda's committed GPU figures: the GPU tests and every `pagoda bench` study behind
# benchmarks/README.md, run from the source tree (PYTHONPATH=$PWD, nothing installed).
#
#   bash benchmarks/gpu.sh STAGE [OUTDIR]       (from the repository root; OUTDIR defaults to $OUT, then ./gpu-out)
#
# Stages (each fits in about 10 minutes on an H100/H200; "all" runs them in turn):
#   tests         pytest -m gpu, the whole GPU test suite: tests-kernels, then tests-engine
#   tests-kernels the kernels', ops', integrations' and models' GPU tests       (~6 min) -> gpu-tests.log
#   tests-engine  the engine's GPU tests, alone on the GPU                      (~5 min) -> gpu-tests-engine.log
#   attention     pagoda bench attention: prefill grid, every backend          (~7 min with FlashInfer's first JIT builds)
#   decode        pagoda bench decode: paged decode TB/s vs FlashInfer, cuDNN  (~2 min)
#   paged         pagoda bench paged: paged prefill vs dense kernels, FlashInfer (~2 min)
#   cascade       pagoda bench cascade: shared-prefix decode, crossover grid   (~2 min)
#   serving       decode, paged and cascade
#   sampling      pagoda bench sampling: samplers vs FlashInfer, torch sort    (~9 min; FlashInfer's JIT ~100 s)
#   e2e           HF generate tokens/s per attn_implementation, dynamic/static caches (~8 min, own budget)
#   e2e-compiled  the same with HF's compiled static-cache decode step (Inductor + CUDA graphs)
#   e2e-sampling  HF generate with do_sample: HF's warpers vs pagoda's, batch 1/16/128, SDPA and pagoda (~8 min)
#   mask          pagoda bench mask: custom-mask prefill vs the unmasked kernel  (~2 min)
#   layers        pagoda bench layers: fused norm / activation kernels vs eager and torch.compile (~2 min)
#   engine        pagoda bench engine: throughput (nano-vLLM workload), batch-1 decode, a decode-step
#                 profile at full batch                                            (~5 min)
#   engine-processors  pagoda bench engine --processors (needs xgrammar)      (~5 min with HF's compiled runs)
#   engine-cascade     pagoda bench engine --cascade: bf16 and float32         (~3 min)
#   engine-extra  engine-processors, then engine-cascade (each under its own stage limit)
#   serve         pagoda serve (Qwen3-0.6B dummy) under pagoda bench serve, 64 and 256 clients after an untimed
#                 load, and the offline engine on the same requests (needs pagoda's `serve` extra: FastAPI, uvicorn,
#                 prometheus-client, httpx; offline, put their wheels in a folder and set PEER_DIR to it) (~4 min)
#   conformance   flash-attn's and FlashInfer's own tests against pagoda (benchmarks/conformance; fetch the
#                 suites first: python3 benchmarks/conformance/fetch_suites.py, carry .conformance/; collect on
#                 the CPU with run.py --dry-run and pass that folder as CONFORMANCE_RESUME to skip collecting)
#   all           tests attention serving sampling e2e mask layers engine engine-extra serve
#
# Each study writes OUTDIR/<date>-<gpu>-<study>/ (e.g. 2026-12-02-h200-attention/): its JSON, CSV, Markdown
# and plots, the console log, and COMMAND, the exact command that made it. A folder that backs a figure in
# benchmarks/README.md is copied as is under benchmarks/results/.
#
# Peers: SDPA's backends and FlexAttention come with torch; flash-attn and xformers are used when importable.
# FlashInfer, on a machine without network: stage it beforehand with /work/shared/peers/stage-flashinfer.sh
# (or any folder of wheels: `pip download flashinfer-python apache-tvm-ffi -d .peer`) and carry .peer/;
# this script installs what .peer/ holds (PEER_DIR overrides) into a scratch site-packages.
#
# Environment: STAGE_TIMEOUT (seconds per stage, default 580: a hung study still leaves its partial files),
# SAMPLING_BUDGET_S (default 460: no sampling case starts later). pagoda's own switches (PAGODA_*) pass through
# and are recorded in COMMAND.
set -uo pipefail

stage=${1:?usage: bash benchmarks/gpu.sh tests|tests-kernels|tests-engine|attention|decode|paged|cascade|serving|sampling|e2e|e2e-compiled|e2e-sampling|mask|layers|engine|engine-processors|engine-cascade|engine-extra|serve|conformance|all [OUTDIR]}
out=${2:-${OUT:-gpu-out}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
limit=${STAGE_TIMEOUT:-580}

peer=${PEER_DIR:-.peer}
if [ -d "$peer" ]; then
  site=/tmp/pagoda-peers
  mkdir -p "$site"
  for t in "$peer"/*.tar.xz; do [ -e "$t" ] && tar -xJf "$t" -C "$site"; done
  if ls "$peer"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$peer"/*.whl
  fi
  export PYTHONPATH=$PYTHONPATH:$site MAX_JOBS=${MAX_JOBS:-16}
fi

gpu=$(python3 -c "import torch; n = torch.cuda.get_device_name().lower().split(); \
print(next((w.split('-')[0] for w in n if w[:1] in 'abhlv' and any(c.isdigit() for c in w)), n[-1]))" 2>/dev/null || echo gpu)

# run STUDY COMMAND...: COMMAND... under the stage timeout, in OUTDIR/<date>-<gpu>-STUDY, with its log and COMMAND.
run() {
  local name=$1; shift
  local dir
  dir="$out/$(date -u +%F)-$gpu-$name"
  mkdir -p "$dir"
  local envs
  envs=$(env | grep '^PAGODA_' | sort | tr '\n' ' ')
  printf 'bash benchmarks/gpu.sh %s\n# which ran, from the repository root:\n%sPYTHONPATH=$PWD %s --out <this folder>\n' \
    "$stage" "$envs" "$*" > "$dir/COMMAND"
  echo "== $name -> $dir"
  timeout -k 10 "$limit" "$@" --out "$dir" 2>&1 | tee "$dir/log.txt" | grep -v "^$name \[" | tail -80
}

# tests-kernels: kernels, ops, integrations and models in 8 workers (~6 min on an H100).
# tests-engine: the engine's tests one at a time (each engine takes a fraction of the whole GPU's memory; run
# nothing else on the GPU meanwhile) (~5 min). -v and --print-failures-now: every outcome and failure is in the
# log even if the stage times out.
gpu_tests() {
  local name=$1; shift
  mkdir -p "$out"
  timeout -k 10 "$limit" python3 -m pytest -m gpu -v -rfE -p no:cacheprovider --print-failures-now "$@" \
    > "$out/$name.log" 2>&1
  local rc=$?
  tail -3 "$out/$name.log"
  grep -E "^(FAILED|ERROR)|^=== FAILURE" "$out/$name.log" | head -30
  return $rc
}

# pagoda serve on a dummy Qwen3-0.6B, loaded by pagoda bench serve at 64 and 256 concurrent clients, then the
# offline engine on the same requests (--offline). The server's log lands beside the results.
serve() {
  local dir model port=${SERVE_PORT:-8123}
  dir="$out/$(date -u +%F)-$gpu-serve"
  model=$dir/qwen3-0.6b-dummy
  mkdir -p "$dir"
  python3 -c "import sys; from pathlib import Path; from pagoda.bench.engine import QWEN3_0_6B, dummy_model_dir; \
dummy_model_dir(QWEN3_0_6B, 'qwen3', Path(sys.argv[1]))" "$model" || return 1
  python3 -m pagoda serve "$model" --load-format dummy --port "$port" --max-model-len 4096 \
    > "$dir/server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 180); do
    python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
      "http://127.0.0.1:$port/health" 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || { tail -20 "$dir/server.log"; return 1; }
    sleep 1
  done
  # An untimed load first: the server's first requests would otherwise pay the kernels' first builds
  # (Triton compiles a kernel variant on its first launch; seconds each on a machine that never built it).
  timeout -k 10 "$limit" python3 -m pagoda bench serve --base-url "http://127.0.0.1:$port" --num-prompts 256 \
    --input-len 1024 --output-len 32 --vocab-size 10000 --max-concurrency 64 --warmup 1 --seed 1000 \
    > "$dir/warmup-load.log" 2>&1 || { tail -20 "$dir/warmup-load.log"; kill "$pid"; return 1; }
  local c
  # Each load its own prompts (--seed), so no run finds another's prompts in the prefix cache; the 256-client
  # run and the offline one share theirs (seed 0).
  for c in 64 256; do
    run "serve-c$c" python3 -m pagoda bench serve --base-url "http://127.0.0.1:$port" --num-prompts $((c * 4)) \
      --input-len 1024 --output-len 128 --vocab-size 10000 --max-concurrency "$c" --warmup 4 --seed $((c == 256 ? 0 : c))
  done
  kill "$pid"; wait "$pid" 2>/dev/null
  run serve-offline python3 -m pagoda bench serve --offline "$model" --load-format dummy --num-prompts 1024 \
    --input-len 1024 --output-len 128 --vocab-size 10000 --max-model-len 4096
  rm -rf "$model"
}

one() {
  case "$1" in
  tests-kernels) gpu_tests gpu-tests -n 8 --ignore=tests/engine ;;
  tests-engine) gpu_tests gpu-tests-engine -p no:xdist tests/engine ;;
  tests) one tests-kernels; one tests-engine ;;
  attention) run attention python3 -m pagoda bench attention ;;
  decode) run decode python3 -m pagoda bench decode ;;
  paged) run paged python3 -m pagoda bench paged ;;
  cascade) run cascade python3 -m pagoda bench cascade ;;
  serving) one decode; one paged; one cascade ;;
  sampling) run sampling python3 -m pagoda bench sampling --budget-s "${SAMPLING_BUDGET_S:-460}" ;;
  e2e) run e2e python3 -m pagoda.bench.e2e --grid gpu ;;
  e2e-compiled)
    # One compile per implementation x batch (a minute or more each) plus the agreement check's two.
    run e2e-compiled python3 -m pagoda.bench.e2e --caches compiled \
      --processors none --batch-sizes 64,128 --backends pagoda,sdpa,eager --new-tokens 64 --budget-s 520 \
      --case-limit-s 240 --no-max-batch-search ;;
  e2e-sampling)
    run e2e-sampling python3 -m pagoda.bench.e2e --grid sampling --backends sdpa,pagoda --caches dynamic \
      --budget-s 450 ;;
  mask) run mask python3 -m pagoda bench mask ;;
  layers) run layers python3 -m pagoda bench layers ;;
  engine)
    run engine python3 -m pagoda bench engine --hf-impls pagoda --budget-s 60
    run engine-batch-1 python3 -m pagoda bench engine --batch-1
    run engine-profile python3 -m pagoda bench engine --profile ;;
  engine-processors) run engine-processors python3 -m pagoda bench engine --processors --budget-s 40 ;;
  engine-cascade) run engine-cascade python3 -m pagoda bench engine --cascade ;;
  engine-extra) one engine-processors; one engine-cascade ;;
  serve) serve ;;
  conformance)
    # The harness's own budget ends before the stage's limit, so that it writes its report. CONFORMANCE_RESUME:
    # an earlier run's --out folder (or one holding only raw/*-collect.json from a CPU --dry-run), whose
    # collection and recorded cases are reused, so the GPU's minutes go to cases not yet run.
    run conformance python3 benchmarks/conformance/run.py --suites "${SUITES:-.conformance}" \
      --budget-s "$(( limit > 100 ? limit - 40 : 60 ))" --workers "${CONFORMANCE_WORKERS:-6}" \
      ${CONFORMANCE_RESUME:+--resume "$CONFORMANCE_RESUME"} ;;
  all) one tests; one attention; one serving; one sampling; one e2e; one mask; one layers; one engine
       one engine-extra; one serve ;;
  *) echo "unknown stage: $1 (see the top of $0)" >&2; return 2 ;;
  esac
}

one "$stage"
