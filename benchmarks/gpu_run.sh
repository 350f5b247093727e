#!/usr/bin/env bash
# One call on a GPU machine produces every GPU figure and parity result this project owes:
#   bash benchmarks/gpu_run.sh OUTDIR
# 1. environment, 2. the GPU tier (`pytest -m gpu tests`: parity at large M, bf16/fp16 two-error rule, CUDA
# graphs, int64 offsets, direct launches) and the extension's error path (benchmarks/ext_error_path.py),
# 3. `seqpe-kernels check`, 4. `seqpe-kernels bench` on the paper configs for every provider (CSV + PNG),
# 5. the README's tables and target verdicts from that CSV (readme_tables_<device>.md).
# Results land in OUTDIR (default benchmarks/results); commit them with the device name in the file name.
set -uo pipefail
OUT="${1:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DEV=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))" 2>/dev/null || echo unknown)
python3 -m seqpe_kernels.cli env 2>&1 | tee "$OUT/env_$DEV.txt"
python3 -m pytest -q -m gpu tests -p no:cacheprovider -rfs 2>&1 \
  | grep -v DEBUG | tail -40 | tee "$OUT/pytest_gpu_$DEV.txt"
python3 benchmarks/ext_error_path.py 2>&1 | tee "$OUT/ext_error_path_$DEV.txt"
python3 -m seqpe_kernels.cli check 2>&1 | tee "$OUT/check_$DEV.txt"
python3 -m seqpe_kernels.cli bench --csv "$OUT/bench_$DEV.csv" --png "$OUT/bench_$DEV.png" 2>&1 \
  | tee "$OUT/bench_$DEV.txt"
python3 benchmarks/readme_table.py "$OUT/bench_$DEV.csv" --out "$OUT/readme_tables_$DEV.md"
