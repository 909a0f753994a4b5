#!/usr/bin/env bash
# Reproduce pagoda's committed GPU figures: the GPU tests and every `pagoda bench` study behind
# benchmarks/README.md, run from the source tree (PYTHONPATH=$PWD, nothing installed).
#
#   bash benchmarks/gpu.sh STAGE [OUTDIR]       (from the repository root; OUTDIR defaults to $OUT, then ./gpu-out)
#
# Stages (each fits in about 10 minutes on an H100/H200; "all" runs them in turn):
#   tests         pytest -m gpu, the whole GPU test suite                      -> gpu-tests.log
#   attention     pagoda bench attention: prefill grid, every backend          (~5 min)
#   decode        pagoda bench decode: paged decode TB/s vs FlashInfer, cuDNN  (~2 min)
#   paged         pagoda bench paged: paged prefill vs dense kernels, FlashInfer (~2 min)
#   cascade       pagoda bench cascade: shared-prefix decode, crossover grid   (~2 min)
#   serving       decode, paged and cascade
#   sampling      pagoda bench sampling: samplers vs FlashInfer, torch sort    (~9 min; FlashInfer's JIT ~100 s)
#   e2e           HF generate tokens/s per attn_implementation, dynamic/static caches (~8 min, own budget)
#   e2e-compiled  the same with HF's compiled static-cache decode step (Inductor + CUDA graphs)
#   all           tests attention serving sampling e2e
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

stage=${1:?usage: bash benchmarks/gpu.sh tests|attention|decode|paged|cascade|serving|sampling|e2e|e2e-compiled|all [OUTDIR]}
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

tests() {
  mkdir -p "$out"
  timeout -k 10 "$limit" python3 -m pytest -m gpu -q -p no:cacheprovider -n 8 "$@" > "$out/gpu-tests.log" 2>&1
  local rc=$?
  tail -5 "$out/gpu-tests.log"
  grep -E "^(FAILED|ERROR)" "$out/gpu-tests.log" | head -30
  return $rc
}

one() {
  case "$1" in
  tests) tests ;;
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
  all) one tests; one attention; one serving; one sampling; one e2e ;;
  *) echo "unknown stage: $1 (see the top of $0)" >&2; return 2 ;;
  esac
}

one "$stage"
