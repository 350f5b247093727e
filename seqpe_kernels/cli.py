"""``seqpe-kernels`` command line: ``env``, ``bench``, ``check`` (and more subcommands via ``SUBCOMMANDS``).

Adding a subcommand is one entry in the ``SUBCOMMANDS`` table: ``name: (help, add_arguments, run)`` where
``add_arguments(parser)`` declares its flags and ``run(args) -> int`` returns the exit code. Heavy imports
belong inside ``run`` so that ``seqpe-kernels env`` stays fast.
"""
from __future__ import annotations

import argparse
import platform
import sys
from typing import Callable, Dict, List, Optional, Tuple


# ------------------------------------------------------------------------------------------- env
def _env_args(p: argparse.ArgumentParser):
    p.add_argument("--device", default=None, help="device for the backend table (default: cuda if present, else cpu)")


def _version(mod: str) -> str:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception as e:
        return f"not importable ({type(e).__name__}: {e})"


def _env_run(args) -> int:
    import os

    import torch

    from . import __version__
    from .backend import available_backends, interpret_mode

    print(f"seqpe-kernels {__version__}")
    print(f"python      {platform.python_version()} ({sys.executable})")
    print(f"platform    {platform.platform()}")
    print(f"torch       {torch.__version__} (built for CUDA {torch.version.cuda or 'none'})")
    print(f"triton      {_version('triton')}")
    print(f"numpy       {_version('numpy')}")
    cuda = torch.cuda.is_available()
    print(f"CUDA        {'available' if cuda else 'not available'}")
    if cuda:
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            print(f"  cuda:{i}    {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    print(f"TRITON_INTERPRET={'1' if interpret_mode() else '0'}  "
          f"SEQPE_KERNELS_BACKEND={os.environ.get('SEQPE_KERNELS_BACKEND', '') or '(unset: auto)'}")
    devices = [args.device] if args.device else (["cpu", "cuda"] if cuda else ["cpu"])
    for dev in devices:
        print(f"\nbackends for device {dev}:")
        for name, (ok, why) in available_backends(dev).items():
            print(f"  {name:<7} {'usable' if ok else 'unusable':<9} {why}")
    return 0


# ------------------------------------------------------------------------------------------- bench
def _bench_args(p: argparse.ArgumentParser):
    from .bench import CONFIGS, MODES, PROVIDERS
    p.add_argument("--config", nargs="+", default=["all"], metavar="NAME",
                   help=f"configs ({', '.join(CONFIGS)}) or 'all' (default; quick: text-default vits-default)")
    p.add_argument("--provider", nargs="+", default=None, choices=PROVIDERS, metavar="NAME",
                   help=f"providers ({', '.join(PROVIDERS)}; default all but the CUDA-graph ones (triton-graph, "
                        "cuda-graph, compile-cg: opt-in); eager always runs as the baseline)")
    p.add_argument("--mode", nargs="+", default=None, choices=MODES, metavar="MODE",
                   help=f"modes ({', '.join(MODES)}; default all, quick: forward full nograd)")
    p.add_argument("--quick", action="store_true", help="small M and short timing (minutes on a 2-core CPU)")
    p.add_argument("--sweep", action="store_true", help="sweep every config over M")
    p.add_argument("--sweep-m", type=int, nargs="+", default=None, metavar="M", help="M values of --sweep")
    p.add_argument("--M", type=int, default=None, help="override the number of sequences of every config")
    p.add_argument("--csv", default="default", help="CSV path (default out/bench-<device>.csv; 'none' to skip)")
    p.add_argument("--png", default="default", help="PNG path (default out/bench-<device>.png; 'none' to skip)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if present)")
    p.add_argument("--seed", type=int, default=0, help="seed of the positions and weights")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's; --quick on CPU: 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _device_problem(device) -> str:
    """Why --device cannot be used here ('' if it can)."""
    if not device:
        return ""
    import torch
    try:
        d = torch.device(device)
    except RuntimeError as e:
        return str(e)
    if d.type == "cuda" and not torch.cuda.is_available():
        return (f"--device {device}: CUDA is not available (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda or 'none'})")
    return ""


def _bench_run(args) -> int:
    from .bench import run_bench

    from .bench import get_config

    none = lambda v: None if v is not None and v.lower() == "none" else v  # noqa: E731
    bad = _device_problem(args.device)
    if bad:
        print(f"seqpe-kernels bench: {bad}", file=sys.stderr)
        return 2
    try:
        for c in args.config:
            if c != "all":
                get_config(c)
    except ValueError as e:
        print(f"seqpe-kernels bench: {e}", file=sys.stderr)
        return 2
    rows = run_bench(args.config, providers=args.provider, modes=args.mode, quick=args.quick, sweep=args.sweep,
                     csv_path=none(args.csv), png_path=none(args.png), progress=not args.no_progress,
                     device=args.device, M=args.M, sweep_ms=args.sweep_m, seed=args.seed,
                     threads=args.threads)
    return 0 if any(r["status"] == "ok" for r in rows) else 1


# ------------------------------------------------------------------------------------------- check
def _check_args(p: argparse.ArgumentParser):
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if present)")
    p.add_argument("--dtype", nargs="+", default=None, choices=["fp32", "bf16", "fp16"],
                   help="dtypes (default fp32, plus bf16 and fp16 on CUDA)")
    p.add_argument("--backend", nargs="+", default=None, help="backends to check (default: every usable one)")
    p.add_argument("--seed", type=int, default=None, help="seed (default fresh; printed)")


def _check_run(args) -> int:
    from .check import run_check

    bad = _device_problem(args.device)
    if bad:
        print(f"seqpe-kernels check: {bad}", file=sys.stderr)
        return 2
    ok = run_check(device=args.device, dtypes=args.dtype, backends=args.backend, seed=args.seed)
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------- registration
Subcommand = Tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

def _train_args(p: argparse.ArgumentParser):
    from .train import add_arguments

    add_arguments(p)


def _train_run(args) -> int:
    from .train import run

    return run(args)


SUBCOMMANDS: Dict[str, Subcommand] = {
    "env": ("versions, CUDA devices and the backend table with reasons", _env_args, _env_run),
    "bench": ("benchmark providers side by side (CSV + PNG)", _bench_args, _bench_run),
    "check": ("parity of every usable backend against the reference (exit 1 on failure)", _check_args, _check_run),
    "train": ("train a tiny SeqPE LM / ViT (DDP under torchrun) and evaluate extrapolation", _train_args, _train_run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seqpe-kernels", description="Fused kernels for the SeqPE position encoder")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add_args, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
