"""Count the kernel launches of a step on any machine (the host-cost guard of issue 11).

On a GPU every ATen or extension operator that does work, and every Triton launch, is one kernel launch with
its host cost; on CPU the same operators run, so counting them there measures what the step will launch.
``count_launches(fn)`` runs ``fn`` once under the torch profiler and returns ``(ops, triton)``: operators that
do work (ATen and ``seqpe_ext`` kernels, a composite operator counted through the operators it calls; views,
allocations and scalar reads excluded) outside Triton launches, and the number of Triton launches (the
interpreter's own tensor copies inside a launch are not counted).
"""
from __future__ import annotations

from typing import Callable, Tuple

# operators that only make views / allocate / read a scalar: no kernel launch on a GPU
NO_KERNEL = frozenset({
    "aten::empty", "aten::view", "aten::as_strided", "aten::t", "aten::transpose", "aten::expand", "aten::reshape",
    "aten::slice", "aten::select", "aten::permute", "aten::unsqueeze", "aten::squeeze", "aten::_reshape_alias",
    "aten::detach", "aten::alias", "aten::empty_strided", "aten::narrow", "aten::split", "aten::split_with_sizes",
    "aten::_unsafe_view", "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh", "aten::result_type",
    "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense", "aten::empty_like", "aten::unbind",
    "aten::chunk", "aten::contiguous", "aten::new_empty", "aten::new_empty_strided", "aten::set_", "aten::flatten",
    "aten::unflatten", "aten::to", "aten::detach_", "aten::lift", "aten::is_same_size"})
# whole-call wrappers whose work is done by the operators they call
WRAPPERS = frozenset({"seqpe_ext::encoder"})
_TRITON_RANGE = "seqpe::triton_launch"


def _significant(e) -> bool:
    n = e.name
    return (n.startswith("aten::") or n.startswith("seqpe_ext::")) and n not in NO_KERNEL and n not in WRAPPERS


def _inside_triton(e) -> bool:
    p = e.cpu_parent
    while p is not None:
        if p.name == _TRITON_RANGE:
            return True
        p = p.cpu_parent
    return False


def count_launches(fn: Callable[[], object]) -> Tuple[int, int]:
    """(operators that launch a kernel, Triton launches) of one call of ``fn`` (run it once before, so that
    compilation and lazy loading are not counted)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    launches = [0]
    restore = []
    try:
        import triton.runtime.interpreter as interp
        import triton.runtime.jit as jit

        from .ops.launch import DirectKernel

        # every path a Triton launch takes: JITFunction.run (and the interpreter's), and the direct call of a
        # cached compiled kernel (seqpe_kernels.ops.launch)
        methods = ((jit.JITFunction, "run"), (interp.InterpretedFunction, "run"), (DirectKernel, "_run"))
    except Exception:  # pragma: no cover - no triton here
        methods = ()
    for cls, name in methods:
        orig = getattr(cls, name)

        def run(self, *a, _orig=orig, **k):
            launches[0] += 1
            with record_function(_TRITON_RANGE):
                return _orig(self, *a, **k)

        setattr(cls, name, run)
        restore.append((cls, name, orig))
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        for cls, name, orig in restore:
            setattr(cls, name, orig)
    events = [e for e in prof.events() if not _inside_triton(e)]
    parents = {e.cpu_parent.id for e in events if _significant(e) and e.cpu_parent is not None}
    ops = sum(1 for e in events if _significant(e) and e.id not in parents)
    del torch
    return ops, launches[0]
