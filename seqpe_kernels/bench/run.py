"""``run_bench``: the grid of (config, provider, mode) measured side by side, derived rows, metrics, outputs."""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import replace
from typing import Iterable, List, Optional, Sequence, Union

import torch

from ..backend import BackendUnavailable
from ..precision import fp32_matmul
from ..reference import SeqPE
from .configs import (ALGO_PROVIDERS, CONFIGS, CSV_COLUMNS, CUDA_GRAPH_PROVIDERS, DEFAULT_PROVIDERS, MODE_FLOP_FACTOR,
                      MODES, PROVIDERS, QUICK_CONFIGS, QUICK_MODES, SWEEP_M_CPU, SWEEP_M_CPU_QUICK, SWEEP_M_CUDA,
                      BenchConfig, floor_fwd_flops, get_config, quick_M, ref_fwd_flops)
from .providers import Provider, build_provider, check_exact, measure, reference_output
from .report import format_table, plot, write_csv
from .timing import TimingPolicy, device_slug, measure_gemm_rate, provenance
from .workloads import make_positions

def _nan():
    return float("nan")


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but torch.cuda.is_available() is False "
                           f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    return d


def default_csv_path(device: torch.device, kind: str = "csv") -> str:
    return os.path.join("out", f"bench-{device_slug(device)}.{kind}")


def run_bench(configs: Optional[Iterable[Union[str, BenchConfig, dict]]] = None,
              providers: Optional[Iterable[str]] = None, modes: Optional[Iterable[str]] = None,
              quick: bool = False, sweep: bool = False, csv_path: Optional[str] = "default",
              png_path: Optional[str] = "default", progress: bool = True, device=None,
              M: Optional[int] = None, sweep_ms: Optional[Sequence[int]] = None, seed: int = 0,
              policy: Optional[TimingPolicy] = None, print_table: bool = True, file=None,
              threads: Optional[int] = None, cuda_graphs: bool = True) -> List[dict]:
    """Run the benchmark grid and return its rows (dicts with the CSV columns).

    configs   names from CONFIGS, "all", BenchConfig objects or dicts of BenchConfig fields
              (default: all; quick: text-default and vits-default, whose shifted / ViT-B twins differ only
              in M / out_dim, which quick mode scales away anyway)
    providers subset of PROVIDERS (default DEFAULT_PROVIDERS: all; the CUDA-graph ones are skipped with the
              reason off CUDA; "eager" is always measured: it is the baseline)
    cuda_graphs False: leave the CUDA-graph providers (compile-cg, triton-graph, cuda-graph) out of the default
              provider list (an explicit ``providers`` list is taken as given)
    modes     subset of MODES (default all; quick: forward, full, nograd)
    quick     small M (one forward ~ QUICK_FWD_FLOPS), short timing budget: for a 2-core CPU in minutes
    sweep     every config at each M of ``sweep_ms`` (default depends on device / quick)
    M         override the number of sequences of every config (tests; custom sizes)
    threads   CPU threads for torch (default: torch's own; quick mode on CPU: 1, because on a shared
              machine OpenMP's spinning threads make multi-threaded timings collapse by up to 10x)
    csv_path / png_path  "default" -> out/bench-<device>.{csv,png}; None -> not written
    """
    device = _resolve_device(device)
    file = file or sys.stdout
    if threads is None and quick and device.type == "cpu":
        threads = 1
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        if providers is None and not cuda_graphs:
            providers = [p for p in DEFAULT_PROVIDERS if p not in CUDA_GRAPH_PROVIDERS]
        return _run_bench(configs, providers, modes, quick, sweep, csv_path, png_path, progress, device, M,
                          sweep_ms, seed, policy, print_table, file)
    finally:
        torch.set_num_threads(old_threads)


def _run_bench(configs, providers, modes, quick, sweep, csv_path, png_path, progress, device, M, sweep_ms, seed,
               policy, print_table, file) -> List[dict]:
    if isinstance(configs, (str, BenchConfig, dict)):
        configs = [configs]
    configs = list(configs) if configs is not None else []
    if not configs or configs == ["all"]:
        # TF32 is a CUDA GEMM mode: off CUDA its config would only repeat the fp32 one
        cfgs = [CONFIGS[n] for n in (QUICK_CONFIGS if quick else CONFIGS)
                if device.type == "cuda" or not CONFIGS[n].tf32]
    else:
        cfgs = [get_config(c) for c in configs]
        bad = [c.name for c in cfgs if c.tf32 and device.type != "cuda"]
        if bad:
            raise ValueError(f"bench config(s) {', '.join(bad)}: TF32 is a CUDA GEMM mode (device {device})")
    providers = list(providers) if providers else list(DEFAULT_PROVIDERS)
    for p in providers:
        if p not in PROVIDERS:
            raise ValueError(f"unknown provider {p!r}; choose from {', '.join(PROVIDERS)}")
    if "eager" not in providers:
        providers.insert(0, "eager")
    providers.sort(key=PROVIDERS.index)
    modes = list(modes) if modes else list(QUICK_MODES if quick else MODES)
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    if policy is None:
        policy = TimingPolicy(warmup=1, min_reps=3, max_reps=10, budget_s=1.0, cuda_warmup_ms=10,
                              cuda_rep_ms=40) if quick else TimingPolicy()

    # the list of (config, M) points
    points: List[BenchConfig] = []
    for cfg in cfgs:
        if sweep:
            ms = sweep_ms or (SWEEP_M_CUDA if device.type == "cuda" else
                              (SWEEP_M_CPU_QUICK if quick else SWEEP_M_CPU))
            points += [cfg.with_M(m) for m in ms]
        elif M is not None:
            points.append(cfg.with_M(M))
        elif quick:
            points.append(cfg.with_M(quick_M(cfg)))
        else:
            points.append(cfg)

    prov_info = provenance(device)
    rows: List[dict] = []
    tasks = [(c, p, m) for c in points for p in providers for m in modes]
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(tasks), desc="seqpe bench", unit="run", file=sys.stderr, dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            bar = None
    try:
        import torch._dynamo as dynamo
    except Exception:  # pragma: no cover
        dynamo = None
    if csv_path == "default":
        csv_path = default_csv_path(device, "csv")
    if png_path == "default":
        png_path = default_csv_path(device, "png")

    def checkpoint():  # rows so far, derived metrics not yet filled in: the final write replaces this
        if csv_path:
            write_csv(rows, csv_path)

    ref, ref_key = None, None
    for cfg in points:
        # every row of a point under the config's fp32 GEMM precision (IEEE unless it is a TF32 config), set
        # here so that a script's global TF32 switch cannot turn an 'fp32' row into a TF32 one
        with fp32_matmul(tf32=cfg.tf32):
            ref, ref_key = _run_point(cfg, ref, ref_key, providers, modes, rows, bar, device, dynamo, policy,
                                      seed, prov_info, quick, checkpoint)
    if bar is not None:
        bar.close()
    for r in rows:
        for c in CSV_COLUMNS:
            r.setdefault(c, _nan() if c.endswith(("_ms", "_mb", "tflops", "ratio", "eager", "_s")) else "")
    if print_table:
        print(format_table(rows, quick=quick, device=device), file=file)
    if csv_path:
        write_csv(rows, csv_path)
        print(f"wrote {csv_path}", file=file)
    if png_path:
        try:
            plot(rows, png_path)
            print(f"wrote {png_path}", file=file)
        except Exception as e:  # plotting must never lose the measurements
            print(f"could not draw {png_path}: {type(e).__name__}: {e}", file=file)
    return rows


def _run_point(cfg, ref, ref_key, providers, modes, rows, bar, device, dynamo, policy, seed, prov_info, quick,
               checkpoint=None):
    """Every (provider, mode) row of one (config, M) point; returns the (reference module, its key) for the next.
    ``checkpoint()`` runs after each row (the CSV so far: a run killed by a time limit keeps what it measured)."""
    key = replace(cfg, M=0)
    if key != ref_key:  # a new configuration (sweep points of one config share module and graphs)
        ref = None
        if dynamo is not None:
            dynamo.reset()  # no stale graphs / recompile-limit carry-over between configs
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch.manual_seed(seed)
        ref = SeqPE(**cfg.module_kwargs()).to(device)
        ref.check_range = False  # positions are generated in range; the check is one host sync per call
        ref_key = key
    positions = make_positions(cfg, seed=seed, device=device)
    want = reference_output(ref, positions) if "nograd" in modes else None  # for the rows' rel_err
    rate = measure_gemm_rate(cfg, device, policy)
    ac = cfg.autocast_dtype(device)
    base = dict(config=cfg.name, M=cfg.M, T=cfg.T, tokens=cfg.tokens, dtype=cfg.dtype_label(device),
                gemm_tflops=rate / 1e12, quick=bool(quick), **prov_info)
    for pname in providers:
        prov = build_provider(pname, cfg, ref, device)
        if not prov.skip_reason and pname in ALGO_PROVIDERS:
            try:
                bad = check_exact(prov, ref, positions, ac, device)
            except Exception as e:
                bad = f"{type(e).__name__}: {e}"
            if bad:
                prov = Provider(pname, None, None, skip_reason=bad)
        for mode in modes:
            if bar is not None:
                bar.set_postfix_str(f"{cfg.name} M={cfg.M} {pname}/{mode}", refresh=False)
            elif device.type == "cuda":
                # without the bar, still name each run: a CUDA fault kills the process without a row
                print(f"[bench] {cfg.name} M={cfg.M} {pname}/{mode}", file=sys.stderr, flush=True)
            row = dict(base, provider=pname, mode=mode)
            ff = MODE_FLOP_FACTOR[mode]
            row["ref_gflop"] = ref_fwd_flops(cfg) * ff / 1e9
            row["floor_gflop"] = floor_fwd_flops(cfg) * ff / 1e9
            if mode not in prov.modes and not (mode == "backward" and prov.backward_derived
                                               and not prov.skip_reason):
                if bar is not None:
                    bar.update(1)
                continue  # not applicable (dedup/prefix/cache are exact only without grad)
            if mode not in prov.modes:  # CUDA-graph providers: backward = full - forward, with the reason
                row.update(status="derived", note=prov.backward_derived)
            elif prov.skip_reason:
                row.update(status="skipped", note=prov.skip_reason)
            else:
                try:
                    with _dynamo_strict():
                        res = measure(prov, mode, positions, cfg, device, policy, want=want)
                    row.update(res, status="ok")
                    row["note"] = "; ".join(x for x in (prov.note, row.get("note", "")) if x)
                except BackendUnavailable as e:
                    row.update(status="skipped", note=str(e))
                except Exception as e:
                    if mode == "backward":
                        row.update(status="derived", note=f"retain_graph backward failed "
                                                          f"({type(e).__name__}: {_short(e)}); full - forward")
                    else:
                        row.update(status="failed", note=f"{type(e).__name__}: {_short(e)}")
                finally:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            rows.append(row)
            if checkpoint is not None:
                checkpoint()
            if bar is not None:
                bar.update(1)
        # drop the provider's module/compiled code before the next provider
        del prov
    _derive_backward(rows, cfg)
    _flag_wrong(rows, cfg)
    _fill_metrics(rows, cfg, rate)
    return ref, ref_key


@contextlib.contextmanager
def _dynamo_strict():
    """Make torch.compile fail loudly instead of silently falling back to eager at the recompile limit."""
    try:
        import torch._dynamo
        patch = torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=64)
    except Exception:
        patch = contextlib.nullcontext()
    with patch:
        yield


def _short(e: BaseException, n: int = 300) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= n else s[:n] + "..."


def _derive_backward(rows: List[dict], cfg: BenchConfig):
    """Rows marked 'derived': backward = full - forward of the same provider (medians; p20/p80 likewise)."""
    mine = [r for r in rows if r["config"] == cfg.name and r["M"] == cfg.M]
    by = {(r["provider"], r["mode"]): r for r in mine}
    for r in mine:
        if r.get("status") != "derived":
            continue
        f, fu = by.get((r["provider"], "forward")), by.get((r["provider"], "full"))
        if f and fu and f.get("status") == "ok" and fu.get("status") == "ok":
            for k in ("median_ms", "p20_ms", "p80_ms"):
                r[k] = max(fu[k] - f[k], 0.0)
        else:
            r["status"] = "failed"
            r["note"] += " (forward and full rows needed to derive it are missing)"


WRONG_FACTOR, WRONG_FLOOR = 3.0, 1e-4  # a provider is wrong past 3x eager's own error + 1e-4 (relative)


def _flag_wrong(rows: List[dict], cfg: BenchConfig):
    """A provider whose eval output (its nograd row's ``rel_err`` against the IEEE-fp32 reference) is not finite,
    or off by more than ``WRONG_FACTOR`` x eager's own error (the same precision's rounding: bf16 ~1e-2, TF32
    ~1e-3, fp32 ~1e-6 on the H200) + ``WRONG_FLOOR``, gets status "wrong" on every mode of this point: a speed-up
    of wrong numbers is no result (it is left out of speed-ups, plots, tables and targets; its times stay)."""
    mine = [r for r in rows if r["config"] == cfg.name and r["M"] == cfg.M]
    eager = next((r.get("rel_err") for r in mine if r["provider"] == "eager" and r["mode"] == "nograd"
                  and r.get("status") == "ok"), None)
    for r in mine:
        err = r.get("rel_err")
        if (r["provider"] == "eager" or r["mode"] != "nograd" or r.get("status") != "ok" or err is None
                or err != err):  # (NaN: not measured)
            continue
        if err == float("inf"):
            why = "its output is not finite (NaN / inf)"
        elif eager is not None and eager == eager and err > WRONG_FACTOR * eager + WRONG_FLOOR:
            why = (f"its output differs from the reference by {err:.2e} (relative), past "
                   f"{WRONG_FACTOR:g}x eager's {eager:.2e} + {WRONG_FLOOR:g}")
        else:
            continue
        for o in mine:
            if o["provider"] == r["provider"] and o.get("status") in ("ok", "derived"):
                o["status"] = "wrong"
                o["note"] = (o.get("note") + "; " if o.get("note") else "") + why


def _fill_metrics(rows: List[dict], cfg: BenchConfig, rate: float):
    mine = [r for r in rows if r["config"] == cfg.name and r["M"] == cfg.M]
    eager = {r["mode"]: r.get("median_ms") for r in mine if r["provider"] == "eager" and r.get("status") in ("ok", "derived")}
    for r in mine:
        med = r.get("median_ms", _nan())
        if r.get("status") not in ("ok", "derived") or not med or med != med:
            r["tflops"] = r["floor_ratio"] = r["speedup_vs_eager"] = _nan()
            continue
        secs = med * 1e-3
        r["tflops"] = r["ref_gflop"] * 1e9 / secs / 1e12
        r["floor_ratio"] = (r["floor_gflop"] * 1e9 / rate) / secs
        e = eager.get(r["mode"])
        r["speedup_vs_eager"] = (e / med) if e and e == e else _nan()
