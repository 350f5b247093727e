"""``seqpe-kernels`` command line: ``env``, ``bench``, ``check``, ``train``, ``study`` (table ``SUBCOMMANDS``).

Adding a subcommand is one entry in the ``SUBCOMMANDS`` table: ``name: (help, add_arguments, run)`` where
``add_arguments(parser)`` declares its flags and ``run(args) -> int`` returns the exit code. Heavy imports
belong inside ``run`` so that ``seqpe-kernels env`` stays fast.

Exit codes: 0 success; 1 a run that failed (a parity failure, a check that compared nothing, a requested bench
provider that never ran); 2 a usage mistake, before any work: one line on stderr (after argparse's usage for a
bad flag value), never a traceback. Flag values are validated by the ``type=`` functions below; a ``run`` raises
:class:`UsageError` for mistakes that involve several flags. Internal errors keep their traceback.
"""
from __future__ import annotations

import argparse
import platform
import sys
from typing import Callable, Dict, List, Optional, Tuple


class UsageError(Exception):
    """A mistake in what the user asked for: ``main`` prints ``seqpe-kernels <command>: <message>`` on stderr
    and exits 2 (no traceback). Raise it only for user errors, never to hide an internal one."""


# ------------------------------------------------------------------------------------------- flag validators
# argparse ``type=`` functions: a bad value ends in argparse's usage line + one error line and exit code 2.
def int_at_least(lo: int, hi: Optional[int] = None) -> Callable[[str], int]:
    """An integer flag with ``lo <= value`` (and ``value <= hi`` when given)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be {rng}, got {v}")
        return v
    parse.__name__ = "int"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)
SEED_MAX = 2 ** 32 - 1
seed_int = int_at_least(0, SEED_MAX)


def minus_one_or_positive(text: str) -> int:
    """An integer that is -1 (meaning 'the default') or >= 1."""
    v = int_at_least(-1)(text)
    if v == 0:
        raise argparse.ArgumentTypeError("must be -1 or >= 1, got 0")
    return v


def float_in(lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
             hi_open: bool = False) -> Callable[[str], float]:
    """A finite float flag within [lo, hi] (``lo_open`` / ``hi_open``: the bound itself excluded)."""
    import math

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if ((lo is not None and (v < lo or (lo_open and v == lo)))
                or (hi is not None and (v > hi or (hi_open and v == hi)))):
            left = "-inf" if lo is None else f"{lo:g}"
            right = "inf" if hi is None else f"{hi:g}"
            raise argparse.ArgumentTypeError(f"must be in {'(' if lo_open or lo is None else '['}{left}, "
                                              f"{right}{')' if hi_open or hi is None else ']'}, got {text}")
        return v
    parse.__name__ = "float"
    return parse


def device_name(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (syntax only: the device need not exist here)."""
    import torch

    try:
        d = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        d = None
    if d is None or d.type not in ("cpu", "cuda") or (d.type == "cpu" and d.index not in (None, 0)):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def usable_device(text: str) -> str:
    """``device_name`` that also exists in this process (CUDA available, index in range)."""
    import torch

    from .backend import cuda_device_problem

    why = cuda_device_problem(torch.device(device_name(text)))
    if why:
        raise argparse.ArgumentTypeError(f"{text}: {why}")
    return text


def output_path_problem(path: str) -> Optional[str]:
    """Why a file cannot be written at ``path`` (missing parent folders are fine: they are created), or None."""
    import os

    full = os.path.abspath(path)
    if os.path.isdir(full):
        return f"{path} is a directory"
    parent = os.path.dirname(full)
    while not os.path.exists(parent):
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    if not os.path.isdir(parent):
        return f"cannot create {path}: {parent} is not a directory"
    import tempfile

    try:  # os.access says yes to root everywhere (read-only mounts, /proc): create and drop a probe file
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".seqpe-kernels-probe-"):
            pass
    except OSError as e:
        return f"cannot create {path}: cannot write in {parent} ({e.strerror or e})"
    return None


def output_path(*passthrough: str) -> Callable[[str], str]:
    """A file to be written (``passthrough`` values such as 'none' / 'default' / '' are kept as they are)."""
    keep = {p.lower() for p in passthrough}

    def parse(text: str) -> str:
        if text.lower() in keep:
            return text
        why = output_path_problem(text)
        if why:
            raise argparse.ArgumentTypeError(why)
        return text
    parse.__name__ = "path"
    return parse


def existing_path(text: str) -> str:
    import os

    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"no such file or directory: {text}")
    return text


# ------------------------------------------------------------------------------------------- env
def _env_args(p: argparse.ArgumentParser):
    p.add_argument("--device", default=None, type=device_name,
                   help="cpu or cuda[:i]: device of the backend table (default: cuda if present, else cpu; a CUDA "
                        "device that is not available here is listed with every backend unusable and the reason)")


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
    from .backend import auto_choice, available_backends, interpret_mode

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
        print(f"  backend='auto' runs: {auto_choice(dev)}")
    return 0


# ------------------------------------------------------------------------------------------- bench
def _bench_args(p: argparse.ArgumentParser):
    from .bench import CONFIGS, MODES, PROVIDERS
    p.add_argument("--config", nargs="+", default=["all"], choices=list(CONFIGS) + ["all"], metavar="NAME",
                   help=f"configs ({', '.join(CONFIGS)}) or 'all' (default; quick: text-default vits-default)")
    p.add_argument("--provider", nargs="+", default=None, choices=PROVIDERS, metavar="NAME",
                   help=f"providers ({', '.join(PROVIDERS)}; default all: the CUDA-graph ones (triton-graph, "
                        "cuda-graph, compile-cg) are skipped with the reason off CUDA, and naming the providers "
                        "leaves them out; eager always runs as the baseline). A provider named "
                        "here that never runs (unusable on this device, or no requested mode) makes the exit "
                        "code 1")
    p.add_argument("--mode", nargs="+", default=None, choices=MODES, metavar="MODE",
                   help=f"modes ({', '.join(MODES)}; default all, quick: forward full nograd)")
    p.add_argument("--quick", action="store_true", help="small M and short timing (minutes on a 2-core CPU)")
    p.add_argument("--sweep", action="store_true", help="sweep every config over M")
    p.add_argument("--sweep-m", type=positive_int, nargs="+", default=None, metavar="M",
                   help="M values of --sweep (needs --sweep)")
    p.add_argument("--M", type=positive_int, default=None,
                   help="override the number of sequences of every config (not with --sweep)")
    p.add_argument("--csv", default="default", type=output_path("default", "none"),
                   help="CSV path (default out/bench-<device>.csv; 'none' to skip)")
    p.add_argument("--png", default="default", type=output_path("default", "none"),
                   help="PNG path (default out/bench-<device>.png; 'none' to skip)")
    p.add_argument("--device", default=None, type=usable_device, help="cpu or cuda[:i] (default: cuda if present)")
    p.add_argument("--seed", type=seed_int, default=0, help=f"seed of the positions and weights (0..{SEED_MAX})")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: torch's; --quick on CPU: 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _bench_check_outputs(args) -> None:
    """What would otherwise fail after minutes of timing: a TF32 config off CUDA, a default output path that
    cannot be written, one file for both outputs, a plot format matplotlib cannot write."""
    import os

    from .bench import CONFIGS
    from .bench.run import _resolve_device, default_csv_path

    dev = _resolve_device(args.device)
    tf32 = [c for c in args.config if c in CONFIGS and CONFIGS[c].tf32]
    if tf32 and dev.type != "cuda":
        raise UsageError(f"--config {' '.join(tf32)}: TF32 is a CUDA GEMM mode (device {dev}); off CUDA it would "
                         "repeat the fp32 config")
    paths = {}
    for kind in ("csv", "png"):
        v = getattr(args, kind)
        if v.lower() == "none":
            continue
        if v.lower() == "default":
            v = default_csv_path(dev, kind)
            why = output_path_problem(v)
            if why:
                raise UsageError(f"the default --{kind} path: {why} (pass --{kind} PATH or --{kind} none)")
        paths[kind] = os.path.abspath(v)
    if len(paths) == 2 and paths["csv"] == paths["png"]:
        raise UsageError(f"--csv and --png name the same file ({paths['csv']}): the plot would overwrite the table")
    if "png" in paths:
        ext = os.path.splitext(paths["png"])[1].lower().lstrip(".")
        try:
            from matplotlib.figure import Figure

            formats = set(Figure().canvas.get_supported_filetypes())
        except Exception:  # no matplotlib: the run says it cannot plot
            formats = None
        if formats is not None and ext not in formats:
            raise UsageError(f"--png {args.png}: matplotlib cannot write '.{ext}' files; use one of "
                             f"{', '.join(sorted(formats))}")


def _bench_run(args) -> int:
    from .bench import run_bench

    none = lambda v: None if v is not None and v.lower() == "none" else v  # noqa: E731
    if "all" in args.config and len(args.config) > 1:
        raise UsageError("--config all cannot be combined with named configs")
    if args.sweep_m is not None and not args.sweep:
        raise UsageError("--sweep-m needs --sweep")
    if args.M is not None and args.sweep:
        raise UsageError("--M and --sweep exclude each other (the sweep sets M; use --sweep-m)")
    _bench_check_outputs(args)
    rows = run_bench(args.config, providers=args.provider, modes=args.mode, quick=args.quick, sweep=args.sweep,
                     csv_path=none(args.csv), png_path=none(args.png), progress=not args.no_progress,
                     device=args.device, M=args.M, sweep_ms=args.sweep_m, seed=args.seed,
                     threads=args.threads)
    rc = 0 if any(r["status"] == "ok" for r in rows) else 1
    bad = dict.fromkeys(f"{r['provider']} ({r['status']})" for r in rows if r["status"] in ("failed", "wrong"))
    if bad:  # a provider that ran and failed, or computed wrong numbers, fails the run (unusable ones are skipped)
        print(f"seqpe-kernels bench: {', '.join(bad)}: see the table's notes", file=sys.stderr)
        rc = 1
    for name in dict.fromkeys(args.provider or ()):  # explicitly requested providers must have run
        mine = [r for r in rows if r["provider"] == name]
        if not any(r["status"] == "ok" for r in mine):
            why = next((f"{r['status']}: {r['note']}" for r in mine if r.get("note")), None) \
                or "none of the requested modes applies to it"
            print(f"seqpe-kernels bench: provider {name} has no successful run ({why})", file=sys.stderr)
            rc = 1
    return rc


# ------------------------------------------------------------------------------------------- check
def _check_args(p: argparse.ArgumentParser):
    from .backend import BACKENDS
    p.add_argument("--device", default=None, type=usable_device, help="cpu or cuda[:i] (default: cuda if present)")
    p.add_argument("--dtype", nargs="+", default=None, choices=["fp32", "bf16", "fp16"],
                   help="dtypes (default fp32, plus bf16 and fp16 on CUDA; bf16 / fp16 only on CUDA)")
    p.add_argument("--backend", nargs="+", default=None, choices=BACKENDS, metavar="NAME",
                   help=f"backends to check ({', '.join(BACKENDS)}; default: every usable one). A backend named "
                        "here must be usable on the device (exit 2 otherwise) and must run at least one comparison "
                        "(exit 1 otherwise)")
    p.add_argument("--seed", type=seed_int, default=None, help=f"seed (0..{SEED_MAX}; default fresh, printed)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default 1 on CPU; more also checks the C++ CPU backend's parallel loops)")


def _check_run(args) -> int:
    from .check import CheckRequestError, run_check

    try:
        ok = run_check(device=args.device, dtypes=args.dtype, backends=args.backend, seed=args.seed,
                       threads=args.threads)
    except CheckRequestError as e:  # raised before any work: the request cannot be checked here
        raise UsageError(str(e)) from None
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------- registration
Subcommand = Tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

def _train_args(p: argparse.ArgumentParser):
    from .training.train import add_arguments

    add_arguments(p)


def _train_run(args) -> int:
    from .training.train import run

    return run(args)


def _study_args(p: argparse.ArgumentParser):
    from .training.study import add_arguments

    add_arguments(p)


def _study_run(args) -> int:
    from .training.study import run

    return run(args)


SUBCOMMANDS: Dict[str, Subcommand] = {
    "env": ("versions, CUDA devices and the backend table with reasons", _env_args, _env_run),
    "bench": ("benchmark providers side by side (CSV + PNG)", _bench_args, _bench_run),
    "check": ("parity of every usable backend against the reference (exit 1 on failure)", _check_args, _check_run),
    "train": ("train a tiny SeqPE LM / ViT (DDP under torchrun) and evaluate extrapolation", _train_args, _train_run),
    "study": ("SeqPE against the baseline position encodings: train each, evaluate extrapolation, table + plot",
              _study_args, _study_run),
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
    """Run one subcommand; returns the exit code (0 ok, 1 a failed run, 2 a usage mistake: one line on stderr)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2, usage + one error line already printed)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UsageError as e:
        print(f"seqpe-kernels {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
