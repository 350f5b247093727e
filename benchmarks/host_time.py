"""Host cost of one SeqPE encoder training step, and kernel launches per step (issue 11, item 1).

    python benchmarks/host_time.py [--reps 7] [--iters 200] [--backends torch cpu triton]

1. **Host time of a tiny training step** (D=16, 2 heads, 2 layers, K=5, M=8, forward + ``backward`` of a fixed
   output gradient, 1 thread), with dropout as the paper trains (residual 0.1, attention 0) and with every
   dropout site on (residual and attention 0.1): at this size the kernels do almost nothing, so the time is what
   Python, the dispatcher and autograd cost per step. Providers and settings are interleaved, ``--reps`` rounds
   of ``--iters`` steps each, and the median per-step time of each is reported with its ratio to eager (target:
   the C++ backend at <= 0.25x eager). ``--backends ... triton`` on CPU (TRITON_INTERPRET=1) times the Triton
   encoder with its launches not run (the interpreter's cost says nothing about a GPU): its Python host cost.
2. **Launches per text-default training step** (M=1552, D=768, 12 heads, K=5, dropout 0.1; counted on a small M
   since the count does not depend on M): ATen operators that reach a CPU kernel (torch profiler, CPU) and
   Triton kernel launches (counted by wrapping the launcher), per backend. On a GPU each is one kernel launch.
   Beside them, the step's host syncs (``seqpe_kernels.launches.host_syncs``: scalar reads, value-sized outputs,
   host copies; each would stall the host behind the GPU's queue): none on every backend.

3. ``--instructions``: the same tiny step counted in CPU instructions under valgrind's callgrind (each backend in
   its own process, counting only the steps: warm-up and imports excluded). Instruction counts do not depend
   on what else the machine is doing, so this ratio is the stable one on a shared CPU (slow: ~1 min).

Run on the 2-core dev CPU; absolute times are only meaningful as ratios measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TINY = dict(embed_dim=16, num_heads=2, max_digits=5, num_layers=2, resid_pdrop=0.1, attn_pdrop=0.0)
DROPOUT = {"paper dropout (resid 0.1, attn 0)": dict(resid_pdrop=0.1, attn_pdrop=0.0),
           "every site (resid 0.1, attn 0.1)": dict(resid_pdrop=0.1, attn_pdrop=0.1)}
TEXT = dict(embed_dim=768, num_heads=12, max_digits=5, num_layers=2, resid_pdrop=0.1, attn_pdrop=0.0)


def make(backend: str, cfg: dict, M: int, seed: int = 0):
    import torch

    import seqpe_kernels as sk

    torch.manual_seed(seed)
    ref = sk.SeqPE(**cfg)
    mod = ref if backend == "torch" else sk.FusedSeqPE.from_reference(ref, backend=backend)
    mod.train()
    mod.check_range = False  # a host sync per call; a training loop with generated positions switches it off
    if hasattr(mod, "dedup"):
        mod.dedup = "off"
    mod.step_params = list(mod.parameters())  # what an optimizer holds (see step)
    pos = torch.randint(0, 10 ** cfg["max_digits"], (M,))
    gout = torch.randn(M, mod.out_dim)
    return mod, pos, gout


def step(mod, pos, gout):
    """One step of the encoder's training work: gradients reset as ``optimizer.zero_grad()`` does (a loop over
    the list of parameters ``make`` keeps; walking ``mod.parameters()`` each step would add ~35 us of module-tree
    traversal to both sides), forward, backward of a fixed output gradient."""
    for p in mod.step_params:
        p.grad = None
    mod(pos).backward(gout)


def host_times(backends, reps: int, iters: int):
    """{(setting, backend): [ms per step, one per round]}, every (setting, backend) interleaved in each round.
    Backend "triton" on CPU (TRITON_INTERPRET=1) is timed with its kernel launches not run: the Python side of
    the Triton encoder (ATen calls, launcher bookkeeping, autograd), i.e. its host cost on a GPU minus the ~21
    launches themselves (launch_overhead.py times one)."""
    mods = {(name, b): make(b, {**TINY, **drop}, 8) for name, drop in DROPOUT.items() for b in backends}
    for k in mods:  # warm-up: the extension load, first-call caches
        for _ in range(20):
            step(*mods[k])
    if "triton" in backends:
        import torch

        from seqpe_kernels.ops import launch

        orig_launch = launch.DirectKernel.launch
        if not torch.cuda.is_available():
            launch.DirectKernel.launch = lambda self, grid, args, kwargs: None
    per = {k: [] for k in mods}
    for _ in range(reps):
        for k in mods:
            t0 = time.perf_counter()
            for _ in range(iters):
                step(*mods[k])
            per[k].append((time.perf_counter() - t0) / iters * 1e3)
    if "triton" in backends:
        launch.DirectKernel.launch = orig_launch
    return per


_CG_C = r"""
#include <valgrind/callgrind.h>
void cg_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void cg_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS; }
"""


def _cg_child(backend: str, setting: str, steps: int):
    """Run under callgrind: warm up, then count ``steps`` steps between the client requests."""
    import ctypes
    import subprocess
    import tempfile

    import torch

    torch.set_num_threads(1)
    d = tempfile.mkdtemp()
    src, lib = os.path.join(d, "cg.c"), os.path.join(d, "libcg.so")
    with open(src, "w") as f:
        f.write(_CG_C)
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", src, "-o", lib], check=True)
    cg = ctypes.CDLL(lib)
    mod, pos, g = make(backend, {**TINY, **DROPOUT[setting]}, 8)
    for _ in range(20):
        step(mod, pos, g)
    cg.cg_start()
    for _ in range(steps):
        step(mod, pos, g)
    cg.cg_stop()


def instructions(backends, steps: int = 50):
    """{(setting, backend): instructions per step}, each measured in its own process under callgrind."""
    import re
    import subprocess
    import tempfile

    out = {}
    for setting in DROPOUT:
        for b in backends:
            f = os.path.join(tempfile.mkdtemp(), "cg.out")
            subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={f}.%p",
                            sys.executable, __file__, "--_cg-child", b, setting, str(steps)],
                           check=True, capture_output=True)
            total = 0
            for name in os.listdir(os.path.dirname(f)):
                with open(os.path.join(os.path.dirname(f), name)) as fh:
                    for line in fh:
                        m = re.match(r"(?:summary|totals):\s+(\d+)", line)
                        if m:
                            total = max(total, int(m.group(1)))
            out[(setting, b)] = total / steps
    return out


def _warm_text_step(backend: str, M: int = 16):
    """One text-config training step of ``backend`` as a call, run once (compilation, extension load)."""
    mod, pos, gout = make(backend, TEXT, M)
    step(mod, pos, gout)
    return lambda: step(mod, pos, gout)


def count_launches(backend: str, M: int = 16):
    """(operators that launch a kernel, Triton launches) for one text-config training step."""
    from seqpe_kernels.launches import count_launches as count

    return count(_warm_text_step(backend, M))


def host_syncs(backend: str, M: int = 16):
    """The calls of one text-config training step that would make the host wait for a GPU (check_range off, as
    ``make`` sets it: with it on, one read per call)."""
    from seqpe_kernels.launches import host_syncs as syncs

    return [f"{op} at {where}" for op, where in syncs(_warm_text_step(backend, M))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--backends", nargs="+", default=["torch", "cpu"],
                    help="torch cpu triton cuda (triton on CPU: TRITON_INTERPRET=1, launches not run; see host_times)")
    ap.add_argument("--no-count", action="store_true", help="skip the launch count")
    ap.add_argument("--instructions", action="store_true", help="also count instructions per step (callgrind)")
    ap.add_argument("--_cg-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._cg_child:
        b, setting, steps = args._cg_child
        _cg_child(b, setting, int(steps))
        return 0
    import torch

    if "triton" in args.backends and not torch.cuda.is_available() and "triton" not in sys.modules:
        # no GPU: the Triton encoder's host cost is timed under the interpreter with its launches not run
        # (host_times); the interpreter is chosen when triton is imported, so it is set before anything imports it
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    from seqpe_kernels import __version__

    print(f"seqpe-kernels {__version__}, torch {torch.__version__}, 1 thread")
    per = host_times(args.backends, args.reps, args.iters)
    print(f"\ntiny training step (D=16, 2 heads, 2 layers, M=8, fwd+bwd), {args.reps} interleaved rounds x "
          f"{args.iters} steps:")
    print(f"  {'dropout':<34} {'backend':<8} {'median ms':>10} {'min':>7} {'max':>7} {'x eager':>8}")
    for name in DROPOUT:
        base = statistics.median(per[(name, "torch")]) if (name, "torch") in per else None
        for b in args.backends:
            ts = per[(name, b)]
            med = statistics.median(ts)
            ratio = f"{med / base:.3f}" if base else "-"
            print(f"  {name:<34} {b:<8} {med:>10.3f} {min(ts):>7.3f} {max(ts):>7.3f} {ratio:>8}")
    if "triton" in args.backends and not torch.cuda.is_available():
        print("  (triton: its Python host cost, the kernel launches not run; each launch adds ~10 us of host time on "
              "a GPU: benchmarks/launch_overhead.py)")
    if args.instructions:
        ins = instructions([b for b in args.backends if b != "triton"])
        print("\ninstructions per tiny step (callgrind, each backend in its own process; load-independent):")
        for name in DROPOUT:
            base = ins.get((name, "torch"))
            for b in [b for b in args.backends if b != "triton"]:
                n = ins[(name, b)]
                ratio = f"{n / base:.3f}" if base else "-"
                print(f"  {name:<34} {b:<8} {n / 1e6:>8.2f} M  {ratio:>6}x eager")
    if not args.no_count:
        print("\nkernel launches per text-default training step (M=16 here; the count does not depend on M):")
        backends = ["torch", "cpu"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
        for b in backends:
            aten, tri = count_launches(b)
            syncs = host_syncs(b)
            print(f"  {b:<8} ATen/extension ops {aten:>4}  Triton launches {tri:>4}  total {aten + tri:>4}  "
                  f"host syncs {len(syncs)}{'' if not syncs else ' (' + ', '.join(sorted(set(syncs))) + ')'}")
        if "triton" not in backends:
            print("  (triton: run with TRITON_INTERPRET=1 to count its launches on CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
