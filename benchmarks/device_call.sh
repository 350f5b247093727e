#!/usr/bin/env bash
# A leased-GPU call with a hard deadline (the device tool allows 10 minutes per command, 15 minutes of device time
# per session, machine start included): runs the steps of PHASE in priority order, each under the time still left.
# Logs go to a scratch folder, re-bundled into OUTDIR/logs.tgz after every step (a call cut off at its limit still
# brings back what finished, and OUTDIR holds at most 8 files: the device tool returns no more).
#   bash benchmarks/device_call.sh PHASE OUTDIR [DEADLINE_S]
# PHASE f1 (the figures first; ~9 min): while the C++/CUDA extension builds, direct Triton launches vs
#          JITFunction.run bit for bit (off for the rest of the call if that fails) and `check --backend triton`;
#          then text-default and vits-default with every item-4 provider side by side (eager, torch.compile,
#          reduce-overhead, Triton / C++-CUDA with graphs off and on; CSV + PNG named with the device, written
#          after every row), the text step's GPU kernel time (profile_step.py), `check --backend cuda`, the TF32
#          opt-in row.
#     bash benchmarks/device_call.sh f1 "$OUT" 540
# PHASE f2 (the rest, on the still-warm machine, so the extension and Triton's cache are built): the GPU tier
#          (`pytest -m gpu`, issue 11 item 5), the TF32 row if f1 ran out of time, launch overhead, host time, the
#          layer-0 table / cast / encoder / layout suites on CUDA, each CUDA-graph provider alone under
#          CUDA_LAUNCH_BLOCKING=1.
#     bash benchmarks/device_call.sh f2 "$OUT" <what is left of the lease, less 30 s>
# PHASE g  (one call of a 15-minute lease, ~9 min) the GPU tier while the extension builds, text-default with
#          every item-4 provider, its kernel-time profile, the README tables, the extension's error path
#          (benchmarks/ext_error_path.py), the table / cast / bias-gradient suites on CUDA, `check --backend cuda`,
#          the attention variant's timing (benchmarks/tune_attention.py), vits-default and its attention warps if
#          time is left. A machine idle for 30 s goes back, so a second call usually pays a fresh start: one long
#          call fits more.
#     bash benchmarks/device_call.sh g "$OUT" 540      (device tool: timeout_s 560)
# PHASE f  both, in one call (a longer lease, or your own GPU with a deadline).
# The phases of earlier leases (a-e) are in git history (before this file's f1/f2 split); benchmarks/results/NOTES.md
# says what they found. On your own GPU, with no time limit, use benchmarks/gpu_run.sh instead.
set -uo pipefail
PHASE="$1"; OUT="$2"; LIMIT="${3:-570}"
START=$(date +%s)
LOGS=$(mktemp -d)/logs; mkdir -p "$LOGS" "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR="$PWD/build/ext"
DEV=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))" 2>/dev/null || echo unknown)
bundle() { tar -czf "$OUT/logs.tgz" -C "$(dirname "$LOGS")" logs; }
step() {  # step NAME MAX_S CMD...: run CMD with the smaller of MAX_S and the time left; log to logs/NAME.txt
  local name="$1" max="$2"; shift 2
  local left=$(( LIMIT - ($(date +%s) - START) - 15 ))
  local t=$(( max < left ? max : left ))
  if (( t < 10 )); then echo "## $name: skipped, out of time" | tee -a "$LOGS/summary.txt"; return; fi
  local t0=$(date +%s)
  timeout "$t" "$@" > "$LOGS/$name.txt" 2>&1
  local rc=$?
  echo "## $name: rc=$rc in $(( $(date +%s) - t0 )) s (limit $t s)" | tee -a "$LOGS/summary.txt"
  tail -n "${TAILN:-6}" "$LOGS/$name.txt" | grep -v "^\s*$" | cut -c1-220
  bundle
}
build_ext_bg() {  # the C++/CUDA extension's JIT build in the background, while GPU-only steps run; sets BUILD
  ( timeout 300 python3 -c "from seqpe_kernels import _ext; _ext.load(); print(_ext.status('cuda'))" \
      > "$LOGS/ext_build.txt" 2>&1; echo "ext build rc=$?" >> "$LOGS/ext_build.txt" ) &
  BUILD=$!
}
isolate() {  # isolate PROVIDER LIMIT_S: one CUDA-graph provider alone, synchronous launches (a fault is attributed
  # to the provider/mode named last on stderr); text-default at its real M, bf16 autocast + dropout
  TAILN=12 step "isolate_$1" "$2" env CUDA_LAUNCH_BLOCKING=1 python3 -X faulthandler -m seqpe_kernels.cli bench \
      --no-progress --config text-default --quick --M 1552 --provider "$1" --mode forward full nograd \
      --csv "$LOGS/isolate_${1}_$DEV.csv" --png none
}
# item 4's providers: eager, torch.compile, reduce-overhead, each fused backend with graphs off and on (the
# algorithmic providers dedup / prefix / cache are left out of the lease: they cost compile time, not item 4)
BENCH_PROVIDERS="eager compile compile-cg triton cuda triton-graph cuda-graph"
tf32_row() {
  TAILN=16 step bench_vits-tf32 "$1" python3 -X faulthandler -m seqpe_kernels.cli bench --no-progress \
      --config vits-default-tf32 --quick --M 4324 --provider eager cuda cuda-graph triton triton-graph \
      --mode full nograd --csv "$OUT/bench_vits-default-tf32_$DEV.csv" --png none
}
readme_tables() {  # the README's results tables and the target verdicts from the bench CSVs so far
  TAILN=30 step readme_table 20 python3 benchmarks/readme_table.py "$OUT"/bench_*_"$DEV".csv \
      --out "$OUT/readme_tables_$DEV.md"
}
phase_f1() {
  build_ext_bg
  TAILN=3 step env 20 python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, \
      torch.cuda.get_device_name(0))"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv \
      > "$LOGS/nvidia_smi.txt" 2>&1
  # direct Triton launches (seqpe_kernels/ops/launch.py) against JITFunction.run, bit for bit, first: if they
  # fail, everything after runs with SEQPE_KERNELS_TRITON_LAUNCH=jit (logs/summary.txt says so)
  TAILN=8 step launch_direct 60 env CUDA_LAUNCH_BLOCKING=1 python3 -X faulthandler -m pytest -q -p no:cacheprovider \
      -rfs tests/test_launch.py
  if ! grep -q "## launch_direct: rc=0 " "$LOGS/summary.txt"; then
    export SEQPE_KERNELS_TRITON_LAUNCH=jit; echo "## direct Triton launches OFF for this run" >> "$LOGS/summary.txt"
  fi
  # while the extension builds: the Triton backend's parity check (outputs and every gradient)
  TAILN=30 step check_triton 60 python3 -X faulthandler -m seqpe_kernels.cli check --backend triton
  wait $BUILD; tail -3 "$LOGS/ext_build.txt"
  # every provider side by side at the paper's sizes (the short --quick timing policy so both fit)
  for cm in text-default:1552 vits-default:4324; do
    c=${cm%%:*}; m=${cm##*:}
    TAILN=40 step "bench_$c" 170 python3 -X faulthandler -m seqpe_kernels.cli bench --no-progress --config "$c" \
        --quick --M "$m" --provider $BENCH_PROVIDERS --mode forward full nograd \
        --csv "$OUT/bench_${c}_$DEV.csv" --png "$OUT/bench_${c}_$DEV.png"
  done
  # item 3's figure: the text step's GPU kernel time per backend (target <= 1.6 ms), and where it goes
  TAILN=60 step profile_text 60 python3 benchmarks/profile_step.py --config text-default --rows 14 --steps 5
  TAILN=30 step check_cuda 45 python3 -X faulthandler -m seqpe_kernels.cli check --backend cuda
  # item 4's TF32 opt-in row (cuBLAS GEMMs in TF32) with its error against the IEEE-fp32 reference
  tf32_row 50
  [[ -s "$OUT/bench_vits-default-tf32_$DEV.csv" ]] && mkdir -p build && touch build/.tf32_row_done
  readme_tables
}
phase_f2() {
  build_ext_bg; wait $BUILD; tail -2 "$LOGS/ext_build.txt"
  # the GPU tier (issue 11 item 5: <= 5 min with check)
  TAILN=20 step tier 200 python3 -X faulthandler -m pytest -q -p no:cacheprovider -rfs -n 8 --timeout 120 -m gpu tests
  [[ -e build/.tf32_row_done ]] || tf32_row 50  # (build/ is ignored: a warm machine keeps it between calls)
  TAILN=6 step launch_overhead 25 python3 benchmarks/launch_overhead.py --gpu --iters 2000 --reps 5
  TAILN=12 step host_time 30 python3 benchmarks/host_time.py --reps 5 --iters 100
  # layer 0's table rows / gradient (Triton, CUDA kernels), indexed attention, grouped casts, on CUDA
  TAILN=8 step table_cast 60 python3 -X faulthandler -m pytest -q -p no:cacheprovider -rfs -n 8 \
      tests/test_table_grad.py tests/test_cast.py
  TAILN=8 step encoder_layouts 60 python3 -X faulthandler -m pytest -q -p no:cacheprovider -rfs -n 8 \
      tests/test_encoder.py tests/test_layouts.py tests/test_bias_grads.py
  isolate triton-graph 40
  isolate cuda-graph 40
  isolate compile-cg 40
}
phase_g() {  # a short verification call (~5 min): the fixes of the first H200 lease and the text step again
  build_ext_bg
  TAILN=3 step env 10 python3 -c "import torch, triton; print(torch.__version__, triton.__version__, \
      torch.cuda.get_device_name(0))"
  # the GPU tier while the extension builds (its ~15 extension tests wait for the build's lock: the JIT build
  # with ops_cuda.cu for sm_90 took 107 s on the 2-core dev machine, so the per-test timeout leaves room for it
  # and the step's for the tests after it; a step killed by its limit loses pytest's summary)
  TAILN=24 step tier 200 python3 -X faulthandler -m pytest -q -p no:cacheprovider -rfs -n 8 --timeout 180 -m gpu tests
  if grep -q "FAILED tests/test_launch.py::test_gpu_direct" "$LOGS/tier.txt"; then
    export SEQPE_KERNELS_TRITON_LAUNCH=jit; echo "## direct Triton launches OFF for this run" >> "$LOGS/summary.txt"
  fi
  wait $BUILD; tail -2 "$LOGS/ext_build.txt"
  # (f1's two benches and more took 257 s; the compile providers' compilation is most of a bench's time)
  TAILN=40 step bench_text-default 150 python3 -X faulthandler -m seqpe_kernels.cli bench --no-progress \
      --config text-default --quick --M 1552 --provider $BENCH_PROVIDERS --mode forward full nograd \
      --csv "$OUT/bench_text-default_$DEV.csv" --png "$OUT/bench_text-default_$DEV.png"
  # (--host-rows: where each provider's host time goes; f1's Triton call took 6.8 ms of host for 2.1 ms of GPU)
  TAILN=60 step profile_text 45 python3 benchmarks/profile_step.py --config text-default --rows 40 --steps 5 \
      --host-rows 30
  # per Triton launch: JITFunction.run, direct (tensors as addresses), direct passing tensors (driver queries)
  TAILN=6 step launch_overhead 20 python3 benchmarks/launch_overhead.py --gpu --iters 2000 --reps 5
  readme_tables
  TAILN=50 step ext_error_path 90 python3 benchmarks/ext_error_path.py
  TAILN=8 step table_cast 60 python3 -X faulthandler -m pytest -q -p no:cacheprovider -rfs -n 8 \
      tests/test_table_grad.py tests/test_cast.py tests/test_bias_grads.py
  TAILN=24 step check_cuda 30 python3 -X faulthandler -m seqpe_kernels.cli check --backend cuda
  # dedup="auto"'s unique on the GPU: the row-wise torch.unique it used against one int64 key per row
  TAILN=5 step dedup_unique 15 python3 benchmarks/bench_dedup_unique.py
  # the head-dimension-chunked attention variant against the package's kernels (fwd / bwd us per setting)
  TAILN=30 step tune_attention 60 python3 benchmarks/tune_attention.py --shapes text-default
  TAILN=40 step bench_vits-default 90 python3 -X faulthandler -m seqpe_kernels.cli bench --no-progress \
      --config vits-default --quick --M 4324 --provider $BENCH_PROVIDERS --mode forward full nograd \
      --csv "$OUT/bench_vits-default_$DEV.csv" --png none
  [[ -s "$OUT/bench_vits-default_$DEV.csv" ]] && readme_tables
  # triton 3.6 spills the fp32 full-block attention backward at one warp at this shape (kernel_resources_sm90_
  # triton3.6.md): one warp vs two, the package's kernels only
  TAILN=16 step tune_attention_vits 40 python3 benchmarks/tune_attention.py --shapes vits-default --chunks
}
case "$PHASE" in
  g) phase_g ;;
  f1) phase_f1 ;;
  f2) phase_f2 ;;
  f) phase_f1; phase_f2 ;;
  *) echo "unknown phase $PHASE (f1, f2, f or g)" >&2; exit 2 ;;
esac
bundle
echo "phase $PHASE done in $(( $(date +%s) - START )) s on $DEV"
