"""Benchmarks of the SeqPE encoder: every provider side by side in one process (KERNEL_GUIDE §6).

Providers
  eager     the reference ``SeqPE`` (the baseline; always measured)
  compile   ``torch.compile`` of the reference (compile time excluded by warm-up; a failure is recorded
            with its reason and the run goes on)
  compile-cg  ``torch.compile(mode="reduce-overhead")``: compiled and replayed as CUDA graphs (CUDA only), the
            fair baseline for the graph providers
  triton, cuda, cpu
            ``FusedSeqPE`` with that backend, only where ``available_backends`` says it is usable
            (Triton is never timed under the interpreter)
  triton-graph, cuda-graph
            the same, wrapped in ``GraphedSeqPE`` (forward and backward replayed as CUDA graphs; CUDA only)
  The three CUDA-graph providers run by default on CUDA and are skipped with the reason on CPU; to leave them
  out, name the providers to run (``--provider eager compile triton cuda ...``; Python:
  ``run_bench(..., cuda_graphs=False)``).
  dedup, prefix, cache
            ``dedup_forward`` / ``prefix_shared_forward`` (seqpe_kernels.savings.dedup) and ``SeqPECache``
            (seqpe_kernels.savings.cache), when those modules exist, in ``nograd`` mode only (the only mode in which
            they are exact) and only after their output matched the reference

Modes
  forward   train mode (dropout on), grad enabled: the forward of a training step
  backward  backward only, through a retained graph (``retain_graph=True``); where that is not supported
            it is derived as full - forward and the row says so. The CUDA-graph providers are always derived:
            a captured backward reads the activations its own forward replay left in the graph's pool and
            overwrites them while it runs, so it cannot be replayed on its own (GraphedSeqPE refuses it;
            repeating it is the likely cause of the illegal memory access in the first H100 run with graph
            providers)
  full      forward + backward
  nograd    eval mode under ``torch.inference_mode``

Workloads are SEQPE_SPEC §6: the positions of one training step, drawn with the training stack's own samplers
(seqpe_kernels.training.samplers, §4.5 / §5.1 / §5.3, seeded) and merged in the order main ; pivots ; candidates ;
transfer (§5.7) exactly as ``seqpe-kernels train`` merges them (bench/workloads.py). Text runs under bf16 autocast on CUDA (as accelerate does) and in fp32 on CPU; the
ViT configs are fp32.

Metrics per row: median / p20 / p80 ms (``triton.testing.do_bench`` on CUDA; ``time.perf_counter`` on CPU),
peak memory of one call, host time per call (CUDA only), achieved TFLOP/s counting the reference's GEMM
FLOPs, and ``floor_ratio`` = (minimal exact GEMM FLOPs / GEMM rate measured in this run) / measured time,
i.e. the fraction of the speed of light that the provider reaches (1.0 = at the floor; the minimal work
uses the CLS-only last layer of SEQPE_SPEC §2.8; deduplicating providers can exceed 1).

Package layout: configs.py (sizes, providers, modes, FLOPs), workloads.py (positions from the samplers),
timing.py (timing, memory, provenance), providers.py (what is compared, one measurement), report.py (CSV,
table, plot), run.py (``run_bench``: the grid).
"""
from .configs import (ALGO_PROVIDERS, CONFIGS, CSV_COLUMNS, CUDA_GRAPH_PROVIDERS, DEFAULT_PROVIDERS,  # noqa: F401
                      FUSED_PROVIDERS, GRAPH_BACKWARD_NOTE, GRAPH_PROVIDERS, MODE_FLOP_FACTOR, MODES, PROVIDERS,
                      QUICK_CONFIGS, QUICK_FWD_FLOPS, QUICK_MODES, TRAIN_MODES, BenchConfig, floor_fwd_flops,
                      get_config, quick_M, ref_fwd_flops)
from .providers import (Provider, build_provider, check_exact, fused_from_reference, measure,  # noqa: F401
                        mode_callables)
from .report import format_table, markdown_tables, plot, read_csv, write_csv  # noqa: F401
from .run import default_csv_path, run_bench  # noqa: F401
from .timing import TimingPolicy, device_name, device_slug, measure_gemm_rate, provenance  # noqa: F401
from .workloads import StepSampler, make_positions, training_step  # noqa: F401
