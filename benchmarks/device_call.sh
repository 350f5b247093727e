#!/usr/bin/env bash
# One leased-GPU call with a hard deadline (the device tool allows 10 minutes per command): runs the steps of
# PHASE in priority order, each under the time still left, logs under $OUT, bundled into $OUT/logs.tgz.
#   bash benchmarks/device_call.sh PHASE OUTDIR [DEADLINE_S]
# PHASE f (current; the one call of a 15-minute lease, <= 9.5 min with DEADLINE_S=560; issue 11 items 1, 2, 4,
#          5 and issue 12's GPU tests), in priority order: while the CUDA extension builds, direct Triton launches
#          vs JITFunction.run (off for the rest of the run if that fails), `check --backend
#          triton` and the triton-graph provider alone under CUDA_LAUNCH_BLOCKING=1 (the config that crashed);
#          then the GPU tier (pytest -m gpu, -n 4) and `check --backend cuda`; text-default and vits-default with
#          every provider side by side (CSV + PNG named with the device); the text step's GPU kernel time
#          (profile_step.py); the TF32 opt-in row for ViT-S and the README's tables with the target verdicts
#          (readme_tables_<device>.md); cuda-graph and compile-cg alone; the
#          host-time script; the whole-encoder, layout, bias-gradient and layer-0 table suites on CUDA (the
#          CUDA table_rows / table_grad kernels and indexed attention run there first). Later steps are skipped
#          when time runs out (logs/summary.txt says which).
#     bash benchmarks/device_call.sh f "$OUT" 560
# PHASE e (issue 11 item 2, CUDA graphs; <= 9 min with DEADLINE_S=540, extension built in the
#          background): (i) tests/test_graphs.py with -x (Triton cases; the C++/CUDA-extension case once the build
#          is done), (ii) each CUDA-graph provider alone under CUDA_LAUNCH_BLOCKING=1 on the text config that
#          crashed (bf16 autocast + dropout, real M; the extension-free ones while the extension builds),
#          (iii) text-default and vits-default with every provider side by side (real M, --quick timing), CSV +
#          PNG named with the device. Later steps are skipped when time runs out (logs/summary.txt says which).
#     bash benchmarks/device_call.sh e "$OUT" 540
# Historical (kept as they ran; do not use for new leases): PHASE a: env, CUDA extension build, GPU-marked tests,
#          `check`, profile, cache/gather bench, bench of the two default configs.   PHASE b/c: graph tests, bench
#          with graph providers, attention tuning, the whole parity suite.   PHASE d: isolate run c's illegal
#          memory access per provider, then the graph benches (superseded by e: the access was traced by reading
#          to bench's retained-graph backward replaying a captured backward without its forward).
# On your own GPU, with no time limit, use benchmarks/gpu_run.sh instead.
set -uo pipefail
PHASE="$1"; OUT="$2"; LIMIT="${3:-570}"
START=$(date +%s)
mkdir -p "$OUT/logs"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR="$PWD/build/ext"
DEV=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))" 2>/dev/null || echo unknown)
step() {  # step NAME MAX_S CMD...: run CMD with the smaller of MAX_S and the time left; log to logs/NAME.txt
  local name="$1" max="$2"; shift 2
  local left=$(( LIMIT - ($(date +%s) - START) - 15 ))
  local t=$(( max < left ? max : left ))
  if (( t < 10 )); then echo "## $name: skipped, out of time" | tee -a "$OUT/logs/summary.txt"; return; fi
  local t0=$(date +%s)
  timeout "$t" "$@" > "$OUT/logs/$name.txt" 2>&1
  local rc=$?
  echo "## $name: rc=$rc in $(( $(date +%s) - t0 )) s (limit $t s)" | tee -a "$OUT/logs/summary.txt"
  tail -n "${TAILN:-6}" "$OUT/logs/$name.txt" | grep -v "^\s*$" | cut -c1-220
}
build_ext_bg() {  # the C++/CUDA extension's JIT build in the background, while GPU-only steps run; sets BUILD
  ( timeout 300 python3 -c "from seqpe_kernels import _ext; _ext.load(); print(_ext.status('cuda'))" \
      > "$OUT/logs/ext_build.txt" 2>&1; echo "ext build rc=$?" >> "$OUT/logs/ext_build.txt" ) &
  BUILD=$!
}
if [[ "$PHASE" == a ]]; then
  step nvidia_smi 20 nvidia-smi
  build_ext_bg
  TAILN=4 step pytest_gpu_marked 150 python3 -m pytest -q -p no:cacheprovider -rs -m gpu \
      tests/test_gather.py tests/test_fused.py tests/test_cache.py tests/test_dedup.py
  wait $BUILD; tail -3 "$OUT/logs/ext_build.txt"
  step env 60 python3 -m seqpe_kernels.cli env
  TAILN=4 step pytest_ext_gpu_marked 90 python3 -m pytest -q -p no:cacheprovider -rs -m gpu tests/test_ext.py
  TAILN=25 step check 150 python3 -m seqpe_kernels.cli check
  TAILN=3 step profile 90 python3 benchmarks/profile_step.py
  TAILN=14 step bench_cache 100 python3 benchmarks/bench_cache.py --device cuda --csv "$OUT/cache_$DEV.csv"
  for c in text-default vits-default; do
    TAILN=40 step "bench_$c" 240 python3 -m seqpe_kernels.cli bench --no-progress --config "$c" \
        --csv "$OUT/bench_${c}_$DEV.csv" --png "$OUT/bench_${c}_$DEV.png"
  done
elif [[ "$PHASE" == b ]]; then
  build_ext_bg
  TAILN=6 step pytest_graphs 120 python3 -m pytest -q -p no:cacheprovider -rs tests/test_graphs.py \
      tests/test_prefix_attention.py tests/test_gather.py
  wait $BUILD
  for c in text-default vits-default; do
    TAILN=40 step "bench_$c" 200 python3 -m seqpe_kernels.cli bench --no-progress --config "$c" \
        --csv "$OUT/bench_${c}_$DEV.csv" --png "$OUT/bench_${c}_$DEV.png"
  done
  TAILN=14 step bench_cache 80 python3 benchmarks/bench_cache.py --device cuda --csv "$OUT/cache_$DEV.csv"
  TAILN=8 step pytest_gpu_all 240 python3 -m pytest -q -p no:cacheprovider -rs -n 8 tests
elif [[ "$PHASE" == c ]]; then
  build_ext_bg
  TAILN=25 step tune_attention 70 python3 benchmarks/tune_attention.py
  wait $BUILD
  TAILN=30 step ext_bad_digits 60 python3 -X faulthandler -m pytest -q -p no:cacheprovider tests/test_ext.py -k bad_digits
  TAILN=6 step pytest_new 120 python3 -m pytest -q -p no:cacheprovider -rs tests/test_graphs.py \
      tests/test_prefix_attention.py tests/test_gather.py
  for c in text-default vits-default; do
    TAILN=40 step "bench_$c" 150 python3 -m seqpe_kernels.cli bench --no-progress --config "$c" \
        --csv "$OUT/bench_${c}_$DEV.csv" --png "$OUT/bench_${c}_$DEV.png"
  done
  TAILN=8 step pytest_gpu_all 240 python3 -X faulthandler -m pytest -q -p no:cacheprovider -rs -n 6 \
      tests/test_fused.py tests/test_ext.py tests/test_cache.py tests/test_dedup.py tests/test_reference.py
elif [[ "$PHASE" == d ]]; then  # next lease: isolate the illegal access of run c, then measure graphs + fast path
  build_ext_bg
  TAILN=6 step pytest_new 120 python3 -m pytest -q -p no:cacheprovider -rs tests/test_graphs.py tests/test_gather.py
  wait $BUILD
  TAILN=12 step ext_bad_digits 60 python3 -X faulthandler -m pytest -q -p no:cacheprovider tests/test_ext.py -k bad_digits
  for p in prefix triton-graph cuda-graph compile-cg; do
    TAILN=12 step "isolate_$p" 90 env CUDA_LAUNCH_BLOCKING=1 python3 -m seqpe_kernels.cli bench --config vits-default \
        --provider "$p" --csv none --png none
  done
  for c in text-default vits-default; do
    TAILN=40 step "bench_$c" 150 python3 -m seqpe_kernels.cli bench --config "$c" --provider eager compile \
        compile-cg triton cuda triton-graph cuda-graph --csv "$OUT/bench_${c}_$DEV.csv" --png "$OUT/bench_${c}_$DEV.png"
  done
elif [[ "$PHASE" == e ]]; then
  build_ext_bg
  TAILN=3 step env 20 python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, \
      torch.cuda.get_device_name(0))"
  # (i) the graph tests, Triton cases (no extension needed; the extension builds meanwhile)
  TAILN=12 step pytest_graphs 170 python3 -X faulthandler -m pytest -x -q -p no:cacheprovider -rs \
      tests/test_graphs.py -k "not cudaext"
  # (ii) each CUDA-graph provider alone, synchronous launches: a fault is attributed to the provider/mode named
  # last on stderr ("[bench] ..."); text-default at its real M (bf16 autocast, dropout) is the configuration of
  # the first crash. The extension-free ones first, while the extension may still be building
  isolate() {  # isolate PROVIDER LIMIT_S MODE...
    local p="$1" lim="$2"; shift 2
    TAILN=14 step "isolate_$p" "$lim" env CUDA_LAUNCH_BLOCKING=1 python3 -X faulthandler -m seqpe_kernels.cli \
        bench --no-progress --config text-default --quick --M 1552 --provider "$p" --mode "$@" \
        --csv "$OUT/isolate_${p}_$DEV.csv" --png none
  }
  isolate triton-graph 50 forward backward full nograd
  isolate compile-cg 70 full
  wait $BUILD; tail -3 "$OUT/logs/ext_build.txt"
  TAILN=8 step pytest_graphs_ext 60 python3 -X faulthandler -m pytest -x -q -p no:cacheprovider -rs \
      tests/test_graphs.py -k cudaext
  isolate cuda-graph 50 forward backward full nograd
  # (iii) every provider side by side (the default provider list includes the CUDA-graph ones); real M, the
  # short --quick timing policy so that both configs fit
  for cm in text-default:1552 vits-default:4324; do
    c=${cm%%:*}; m=${cm##*:}
    TAILN=48 step "bench_$c" 150 python3 -X faulthandler -m seqpe_kernels.cli bench --no-progress --config "$c" \
        --quick --M "$m" --mode forward backward full nograd \
        --csv "$OUT/bench_${c}_$DEV.csv" --png "$OUT/bench_${c}_$DEV.png"
  done
elif [[ "$PHASE" == f ]]; then
  build_ext_bg
  TAILN=3 step env 20 python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, \
      torch.cuda.get_device_name(0))"
  # direct Triton launches (seqpe_kernels/ops/launch.py) against JITFunction.run, bit for bit, first: if they
  # fail, everything after runs with SEQPE_KERNELS_TRITON_LAUNCH=jit (logs/summary.txt says so)
  TAILN=8 step launch_direct 60 env CUDA_LAUNCH_BLOCKING=1 python3 -X faulthandler -m pytest -q -p no:cacheprovider \
      -rfs tests/test_launch.py
  if ! grep -q "## launch_direct: rc=0 " "$OUT/logs/summary.txt"; then
    export SEQPE_KERNELS_TRITON_LAUNCH=jit; echo "## direct Triton launches OFF for this run" >> "$OUT/logs/summary.txt"
  else
    TAILN=6 step launch_overhead 30 python3 benchmarks/launch_overhead.py --gpu --iters 2000 --reps 5
  fi
  # while the extension builds: the Triton backend's check and its CUDA-graph provider alone (synchronous launches:
  # a fault is attributed to the provider/mode named last on stderr)
  TAILN=30 step check_triton 60 python3 -X faulthandler -m seqpe_kernels.cli check --backend triton
  isolate() {  # isolate PROVIDER LIMIT_S
    TAILN=12 step "isolate_$1" "$2" env CUDA_LAUNCH_BLOCKING=1 python3 -X faulthandler -m seqpe_kernels.cli bench \
        --no-progress --config text-default --quick --M 1552 --provider "$1" --mode forward full nograd \
        --csv "$OUT/isolate_${1}_$DEV.csv" --png none
  }
  isolate triton-graph 45
  wait $BUILD; tail -3 "$OUT/logs/ext_build.txt"
  # the GPU tier (issue 11 item 5: <= 5 min with check), then the extension's check
  TAILN=16 step tier 170 python3 -X faulthandler -m pytest -q -p no:cacheprovider -rfs -n 4 --timeout 120 -m gpu tests
  TAILN=30 step check_cuda 45 python3 -X faulthandler -m seqpe_kernels.cli check --backend cuda
  # every provider side by side at the paper's sizes (graphs on; the short --quick timing policy so both fit)
  for cm in text-default:1552 vits-default:4324; do
    c=${cm%%:*}; m=${cm##*:}
    TAILN=48 step "bench_$c" 110 python3 -X faulthandler -m seqpe_kernels.cli bench --no-progress --config "$c" \
        --quick --M "$m" --mode forward full nograd \
        --csv "$OUT/bench_${c}_$DEV.csv" --png "$OUT/bench_${c}_$DEV.png"
  done
  # item 3's figure: the text step's GPU kernel time per backend (target <= 1.6 ms), and where it goes
  TAILN=60 step profile_text 60 python3 benchmarks/profile_step.py --config text-default --rows 14 --steps 5
  # item 4's TF32 opt-in row (cuBLAS GEMMs in TF32) with its error against the IEEE-fp32 reference
  TAILN=16 step bench_vits-tf32 50 python3 -X faulthandler -m seqpe_kernels.cli bench --no-progress \
      --config vits-default-tf32 --quick --M 4324 --provider eager cuda cuda-graph triton triton-graph \
      --mode full nograd --csv "$OUT/bench_vits-default-tf32_$DEV.csv" --png none
  # the README's results tables and the target verdicts from the CSVs above (paste into README.md)
  TAILN=30 step readme_table 20 python3 benchmarks/readme_table.py "$OUT"/bench_*_"$DEV".csv \
      --out "$OUT/readme_tables_$DEV.md"
  isolate cuda-graph 40
  isolate compile-cg 40
  TAILN=12 step host_time 30 python3 benchmarks/host_time.py --reps 5 --iters 100
  TAILN=8 step encoder_layouts 60 python3 -X faulthandler -m pytest -q -p no:cacheprovider -rfs -n 4 \
      tests/test_encoder.py tests/test_layouts.py tests/test_bias_grads.py
  # new since the last lease: layer 0's table rows / gradient (Triton, CUDA kernels), indexed attention, grouped casts
  TAILN=8 step table_cast 90 python3 -X faulthandler -m pytest -q -p no:cacheprovider -rfs -n 4 \
      tests/test_table_grad.py tests/test_cast.py
fi
tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
echo "phase $PHASE done in $(( $(date +%s) - START )) s on $DEV"
