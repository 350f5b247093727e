"""Count the kernel launches of a step on any machine (the host-cost guard of issue 11).

On a GPU every ATen or extension operator that does work, and every Triton launch, is one kernel launch with
its host cost; on CPU the same operators run, so counting them there measures what the step will launch.
``count_launches(fn)`` runs ``fn`` once under the torch profiler and returns ``(ops, triton)``: operators that
do work (ATen and ``seqpe_ext`` kernels, a composite operator counted through the operators it calls; views,
allocations and scalar reads excluded) outside Triton launches, and the number of Triton launches (the
interpreter's own tensor copies inside a launch are not counted). ``host_syncs(fn)`` lists the calls (operators
and tensor methods) that would make the host wait for a GPU (scalar reads, value-dependent output sizes, host
copies): a host-light step on a GPU needs none of them.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Tuple

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


# operators that make the host wait for the device on a GPU: a scalar read, or an output whose size depends on
# the values (the host must read it back before it can allocate)
SYNCS = frozenset({"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "_unique2",
                   "unique_dim", "unique_consecutive", "repeat_interleave", "bincount", "histc"})
# Tensor methods that read a tensor on the host (a device-to-host copy on a GPU); on CPU most never reach the
# dispatcher (``.tolist()``, ``.numpy()``), so they are watched at the Python level
HOST_READS = frozenset({"tolist", "item", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"})


@contextlib.contextmanager
def _triton_launches(on_launch: Callable[[], contextlib.AbstractContextManager]):
    """Wrap every path a Triton launch takes (JITFunction.run and the interpreter's, and the direct call of a
    cached compiled kernel, seqpe_kernels.ops.launch) in ``on_launch()``."""
    restore = []
    try:
        import triton.runtime.interpreter as interp
        import triton.runtime.jit as jit

        from .ops.launch import DirectKernel

        methods = ((jit.JITFunction, "run"), (interp.InterpretedFunction, "run"), (DirectKernel, "_run"))
    except Exception:  # pragma: no cover - no triton here
        methods = ()
    for cls, name in methods:
        orig = getattr(cls, name)

        def run(self, *a, _orig=orig, **k):
            with on_launch():
                return _orig(self, *a, **k)

        setattr(cls, name, run)
        restore.append((cls, name, orig))
    try:
        yield
    finally:
        for cls, name, orig in restore:
            setattr(cls, name, orig)


def count_launches(fn: Callable[[], object]) -> Tuple[int, int]:
    """(operators that launch a kernel, Triton launches) of one call of ``fn`` (run it once before, so that
    compilation and lazy loading are not counted)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    launches = [0]

    def on_launch():
        launches[0] += 1
        return record_function(_TRITON_RANGE)

    with _triton_launches(on_launch), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if not _inside_triton(e)]
    parents = {e.cpu_parent.id for e in events if _significant(e) and e.cpu_parent is not None}
    ops = sum(1 for e in events if _significant(e) and e.id not in parents)
    return ops, launches[0]


@contextlib.contextmanager
def watch_host_syncs() -> Iterator[List[Tuple[str, str]]]:
    """Inside: the calls that would make the host wait for a GPU (``SYNCS`` operators and ``HOST_READS`` tensor
    methods) are appended to the yielded list, each with the innermost frame outside torch that made it. Counted
    on any machine: on CPU the same calls run. What runs inside a Triton launch (the interpreter's own reads) is
    not counted."""
    import traceback

    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    inside = [0]  # > 0 inside a Triton launch or a host read already recorded
    found: List[Tuple[str, str]] = []

    def record(name):
        frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename and f.filename != __file__]
        found.append((name, f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"))

    @contextlib.contextmanager
    def nested():
        inside[0] += 1
        try:
            yield
        finally:
            inside[0] -= 1

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if inside[0] or name not in HOST_READS:
                return func(*args, **(kwargs or {}))
            record(f"Tensor.{name}")
            with nested():
                return func(*args, **(kwargs or {}))

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside[0] and func.overloadpacket.__name__ in SYNCS:
                record(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with _triton_launches(nested), Reads(), Ops():
        yield found


def host_syncs(fn: Callable[[], object]) -> List[Tuple[str, str]]:
    """``watch_host_syncs`` around one call of ``fn``: what it would sync on a GPU."""
    with watch_host_syncs() as found:
        fn()
    return found
