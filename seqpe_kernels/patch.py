"""Drop-in: ``seqpe_kernels.patch(pe_model)`` runs an existing SeqPE encoder through the fused kernels, in place.

Users already have training and evaluation scripts built around the authors' ``SequentialPE`` (ghrua/seqpe, text
or image copy, or forks of it): ``pe_model = build_pe_model(cfg)``, called once per step as
``pe_model(x, pad_mask)`` on digit tensors from ``PeUtils.prepare_seqpe_data``, with its own optimizer groups,
DDP wrapper and checkpoint slot. One line after the encoder is built::

    pe_model = seqpe_kernels.patch(pe_model)

and the rest of the script runs unchanged: the same module object, the same ``Parameter`` objects (identity,
names, order), the same state-dict keys, its call signature (``module(x, pad_mask)`` for the authors' class,
``module(positions)`` / ``module.forward_digits(digits, pad_mask)`` for this package's :class:`SeqPE`),
``requires_grad`` toggles and ``train()`` / ``eval()`` honoured, fp32 and autocast (bf16 / fp16) as the eager
module computes them. :func:`unpatch` restores the original forward.

How (and why not a class swap). The module's class is left alone (``type(m)``, pickling by class reference,
isinstance checks and the class's other instances are untouched). The instance gets an instance attribute
``forward`` (and ``extra_repr``, so ``repr`` says it is patched): a small bound callable whose ``__func__`` is a
module-level function of this file, so ``accelerate`` (which wraps ``model.forward.__func__`` in autocast) and
``accelerator.unwrap_model`` keep it, and ``torch.save(module)`` / ``copy.deepcopy`` round-trip it. The fused path
is :class:`~seqpe_kernels.FusedSeqPE`'s own (``_fused``, ``_plan``, ...), run on a :class:`_FusedView` that maps
the foreign module's attribute names (``pe_embed_dim``, ``head_num``, ``seqpe_temperature``, per-block dropout
``p`` ...) onto the names that path reads, and reads the parameters live through the module's own dicts.

Order with wrappers. ``patch`` works before or after ``accelerator.prepare`` / DDP: a DDP or DataParallel wrapper
is looked through (its ``.module`` is patched, the wrapper returned); an autocast wrapper that
``accelerator.prepare`` installed on the instance (``forward`` = fp32-output conversion around
``torch.autocast`` around the class's forward) is kept and rebuilt around the fused forward. A forward replaced
by anything this file cannot see through (no ``__wrapped__`` chain down to the class's forward) is refused with a
message saying to patch first. ``torch.compile``-d modules are refused (patch before compiling).

Checks. A module whose layout differs from SEQPE_SPEC §2-§3 is refused with a message naming every difference
(missing or extra parameters, shapes, an ``nn.Linear`` where a [in, out] Conv1D belongs, heads, an activation
other than gelu_new, dropout probabilities that differ between blocks, forward hooks on submodules the fused
path would skip, ``use_cls_token=False`` ...). And since a fork can change the math without changing the layout,
the first fused call on each (device, backend, dtype) also runs the module's own forward on a small fixed probe
batch (eval mode, no grad, no autocast, no RNG draw) and refuses to continue if the two differ
(``verify=False`` skips this).

Note: ``seqpe_kernels.patch`` is the function (exported by the package); this module is
``sys.modules["seqpe_kernels.patch"]`` -- import its other names with ``from seqpe_kernels.patch import ...``.
"""
from __future__ import annotations

import inspect
import sys
import types
import weakref
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from . import backend as _backend
from .fused import FusedSeqPE
from .layout import _AUTHORS, _OURS, PatchError, _check_layout, _dropout_p, _layout
from .precision import fp32_matmul
from .reference.tokenize import prepare_seqpe_data
from .reference.seqpe import SeqPE
from .reference.tokenize import tokenize

__all__ = ["patch", "unpatch", "is_patched", "patch_state", "prepare_seqpe_data", "to_fused", "PatchError"]  # prepare_seqpe_data: reference.tokenize

_STATE = "_seqpe_fused"  # the instance attribute holding the _FusedView of a patched module


# ============================================================================================ bound callable
class _Bound:
    """``func`` bound to ``obj``, like a method, but picklable (``torch.save(module)``, ``copy.deepcopy``): a
    ``types.MethodType`` in an instance ``__dict__`` pickles as ``getattr(obj, name)``, which runs before the
    instance's state is restored and so would silently give back the class's (unpatched) forward.

    ``__func__`` / ``__self__`` as on a method: ``accelerate`` wraps ``model.forward.__func__``."""

    __slots__ = ("__self__", "__func__", "__weakref__")

    def __init__(self, obj, func):
        self.__self__ = obj
        self.__func__ = func

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self):
        return (_Bound, (self.__self__, self.__func__))

    @property
    def __signature__(self):
        return inspect.signature(types.MethodType(self.__func__, self.__self__))

    @property
    def __name__(self):
        return self.__func__.__name__

    def __repr__(self):
        return f"<seqpe_kernels.patch bound {self.__func__.__name__} of {type(self.__self__).__name__}>"


# ============================================================================================ the fused view
def _fused_class_attrs() -> Dict[str, Any]:
    """SeqPE's and FusedSeqPE's own class attributes (not nn.Module's), FusedSeqPE's overriding."""
    out: Dict[str, Any] = {}
    for cls in (SeqPE, FusedSeqPE):
        out.update(vars(cls))
    return out


_FUSED_ATTRS = _fused_class_attrs()


class _FusedView:
    """What FusedSeqPE's fused path reads (``embed_dim``, ``num_heads``, ``resid_pdrop``, ``_parameters``,
    ``_modules``, ``training`` ...), mapped live onto a patched module's own attributes, plus the options of the
    patch (``backend``, ``check_range``, ``dedup``) and FusedSeqPE's test hook ``record_dropout_masks``.

    Attribute lookup: this class, which also carries FusedSeqPE's / SeqPE's own methods and properties (copied
    below, so whichever helpers FusedSeqPE's fused path calls -- ``_fused``, ``_plan``, ``_encode``, ... -- run on
    the view without this file naming them), then the module. The entry points below handle the eager ("torch")
    backend themselves, so FusedSeqPE code that reaches ``super()`` for it never runs on a view."""

    def __init__(self, module: nn.Module, layout: str, backend: str, check_range: bool, verify: bool, dedup: str,
                 dedup_in_training: bool, eager_forward, eager_digits):
        self.module = module
        self.layout = layout
        self.backend = backend
        self.check_range = check_range
        self.verify = verify
        self.dedup = dedup
        self.dedup_in_training = dedup_in_training
        self.eager_forward = eager_forward    # the class's forward function (the module's own computation)
        self.eager_digits = eager_digits      # (module, digits, pad_mask) -> output, eagerly
        self.record_dropout_masks: Optional[Dict[str, torch.Tensor]] = None
        self.installed: Dict[str, Any] = {}   # attribute -> the object this patch put into module.__dict__
        self.saved: Dict[str, Any] = {}       # attribute -> what module.__dict__ held before (absent: not there)

    # --------------------------------------------------------------- live configuration
    def _name(self, key):
        return getattr(self.module, (_AUTHORS if self.layout == "authors" else _OURS)[key])

    embed_dim = property(lambda self: self._name("embed_dim"))
    max_digits = property(lambda self: self._name("max_digits"))
    data_dim = property(lambda self: self._name("data_dim"))
    attn_direction = property(lambda self: self._name("attn_direction"))
    mask_padding = property(lambda self: bool(self._name("mask_padding")))
    use_last_layernorm = property(lambda self: bool(self._name("use_last_layernorm")))
    temperature = property(lambda self: self._name("temperature"))
    training = property(lambda self: self.module.training)
    _parameters = property(lambda self: self.module._parameters)
    _modules = property(lambda self: self.module._modules)

    @property
    def _attn0(self):
        return next(iter(self.module._modules["transformers"]._modules.values()))._modules["attn"]

    @property
    def num_layers(self):
        return len(self.module._modules["transformers"]._modules)

    @property
    def num_heads(self):
        return self._attn0.num_heads

    @property
    def scale_attn_weights(self):
        vals = {bool(getattr(b._modules["attn"], "scale_attn_weights", True))
                for b in self.module._modules["transformers"]._modules.values()}
        if len(vals) > 1:
            raise PatchError("seqpe_kernels.patch: the attention layers' scale_attn_weights differ; the fused "
                             "encoder applies one. Set them equal (or unpatch the module).")
        return vals.pop()

    @property
    def base(self):
        return self.module._modules["token_of_seqpe_embed"].weight.shape[0]

    @property
    def out_dim(self):
        return self.module._modules["out_proj"].out_features

    @property
    def layer_norm_eps(self):
        return next(iter(self.module._modules["transformers"]._modules.values()))._modules["layernorm_1"].eps

    @property
    def resid_pdrop(self):
        return _dropout_p(self.module)[0]

    @property
    def attn_pdrop(self):
        return _dropout_p(self.module)[1]

    def __call__(self, positions):  # prefix_shared_forward calls ``module(positions)`` for M = 0
        return self.forward_positions(positions)

    def __getattr__(self, name):
        try:
            m = self.__dict__["module"]
        except KeyError:  # during unpickling / copying
            raise AttributeError(name) from None
        return getattr(m, name)

    def __getstate__(self):
        st = dict(self.__dict__)
        for k in ("_plans", "_resolved", "_verified", "_structure", "_hooks_seen"):  # caches: rebuilt on the next call
            st.pop(k, None)
        return st

    def __setstate__(self, st):
        self.__dict__.update(st)

    # --------------------------------------------------------------- entry points
    def forward_digits(self, digits: torch.Tensor, pad_mask: Optional[torch.Tensor]) -> torch.Tensor:
        if not isinstance(digits, torch.Tensor):
            raise TypeError(f"digits must be a torch.Tensor of digit ids [M, L], got {type(digits).__name__}")
        name = self.resolved_backend(digits.device)
        if name == "torch":
            return self.eager_digits(self.module, digits, pad_mask)
        if self.layout == "authors" and digits.dim() == 2 and 0 < digits.shape[1] < self.data_dim * self.max_digits:
            # the authors' forward encodes shorter digit rows as shorter sequences (digit slots 0..L-1); the fused
            # kernels take full rows only, so such a call runs the module's own forward, as before patching
            warnings.warn(f"seqpe_kernels.patch: digit rows of length {digits.shape[1]} < data_dim*max_digits = "
                          f"{self.data_dim * self.max_digits} run through {type(self.module).__name__}'s own (eager) "
                          "forward, unfused", RuntimeWarning, stacklevel=3)
            return self.eager_digits(self.module, digits, pad_mask)
        self._maybe_verify(digits.device, name)
        digits, pad = self._check_digits(digits, pad_mask)
        return self._fused(digits, pad if self.mask_padding else None, from_positions=False, name=name)

    def forward_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """SeqPE's positions interface: FusedSeqPE.forward (its deduplication options included) on this view."""
        dev = positions.device if isinstance(positions, torch.Tensor) else torch.device("cpu")
        name = self.resolved_backend(dev)
        if name == "torch":
            return self.eager_forward(self.module, positions)
        self._maybe_verify(dev, name)
        return FusedSeqPE.forward(self, positions)

    # --------------------------------------------------------------- verification
    def _maybe_verify(self, device: torch.device, name: str):
        if self.__dict__.get("_structure") != _REGISTRATIONS[0] and not torch.compiler.is_compiling() \
                and not self.module.__dict__.get("_is_replica"):  # (a DataParallel replica: of a checked module)
            self._recheck_structure()  # a submodule inside the encoder was (re)assigned since the last look
        if not self.verify:
            return
        p = self.module._parameters.get("cls_token_embed")
        if p is None:  # a DataParallel replica's parameters are plain attributes
            p = self.module.__dict__.get("cls_token_embed")
        key = (device, name, p.dtype if p is not None else None)
        done = self.__dict__.get("_verified")
        if done is not None and key in done:
            return
        if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return
        self._verify(torch.device(device), name)
        self.__dict__.setdefault("_verified", set()).add(key)

    def _recheck_structure(self):
        """The patch-time layout check again, after a submodule inside the encoder was assigned (an activation
        swapped for another, a Conv1D for an nn.Linear, ...): the fused path would otherwise compute the old
        module. Also forgets the probe verifications, so the next call runs the probe again."""
        problems = _check_layout(self.module, self.layout)
        if problems:
            raise PatchError(f"seqpe_kernels.patch: {type(self.module).__name__} was changed after it was patched and "
                             "no longer has the SeqPE encoder layout the fused forward computes:\n  - "
                             + "\n  - ".join(problems) + "\nseqpe_kernels.unpatch(module) restores its own forward.")
        _watch(self.module)
        self.__dict__.pop("_verified", None)
        self.__dict__["_structure"] = _REGISTRATIONS[0]

    @torch.no_grad()
    def _verify(self, device: torch.device, name: str):
        """The module's own forward and the fused one on a fixed probe batch, eval mode, no autocast, on a probe
        copy of the module (``_probe_copy``: its own train / eval flags, the same tensors): switching the shared
        module to eval for the probe made another thread's training calls in that window run without dropout."""
        try:
            m = _probe_copy(self.module)
            v = _FusedView.__new__(_FusedView)
            v.__dict__.update(self.__getstate__())
            v.module = m
            m.__dict__[_STATE] = v
        except Exception:  # noqa: BLE001 - a module class that cannot be copied this way: probe in place
            m, v = self.module, self
        K, d = self.max_digits, self.data_dim
        top = min(self.base ** K, 2 ** 62)
        i = torch.arange(7, dtype=torch.int64)
        cols = [((i * (7919 * (a + 1)) + 3 * a) * (a + 1)) % top for a in range(d)]
        pos = torch.stack(cols, 1)
        pos[0] = 0
        pos[1] = top - 1
        digits, pad = tokenize(pos, K, self.base, d, check_range=False)
        digits, pad = digits.to(device), pad.to(device)
        flags = [(s, s.training) for s in m.modules()]
        try:
            m.eval()
            # fp32 on both sides: a TF32 GEMM is ~1e-3 off (set and restored under either precision API)
            with fp32_matmul(tf32=False), torch.autocast(device.type, enabled=False):
                want = v.eager_digits(m, digits, pad)
                got = v._fused(digits, pad if v.mask_padding else None, from_positions=False, name=name)
        finally:
            for s, t in flags:
                s.training = t
        dt = want.dtype
        tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dt, 5e-2)
        scale = want.abs().max().clamp_min(1e-30)
        err = ((got.to(dt) - want).abs().max() / scale).item()
        if not err <= tol and not bool(torch.isfinite(want).all()) and bool(torch.isfinite(got).all()):
            raise PatchError(
                f"seqpe_kernels.patch: {type(m).__name__}.forward itself gives NaN / inf on the probe batch "
                f"({dt}, {device}) where the fused encoder is finite: in fp64 the authors' fp32 attention mask "
                "overflows to -inf and -inf * 0 on every allowed entry is NaN (README, Notes on the reference). The fused "
                "encoder promotes the mask as this package's SeqPE does; patch(..., verify=False) accepts that.")
        if not err <= tol:  # NaN included
            raise PatchError(
                f"seqpe_kernels.patch: the fused encoder does not reproduce {type(m).__name__}.forward on a probe "
                f"batch ({name} backend on {device}, {dt}: max relative difference {err:.3g} > {tol:g}). The module "
                "has the SequentialPE layout but computes something else (a fork that changed the math?). "
                "seqpe_kernels.unpatch(module) restores its forward; patch(..., verify=False) skips this check.")


# FusedSeqPE's / SeqPE's methods and properties, as methods of the view (plain class attributes, so that
# torch.compile traces them like any method); the view's own definitions above take precedence
for _n, _v in _FUSED_ATTRS.items():
    if not _n.startswith("__") and _n not in _FusedView.__dict__ and isinstance(_v, (types.FunctionType, property)):
        setattr(_FusedView, _n, _v)
del _n, _v


# ================================================================ submodule assignments inside patched encoders
# torch calls its global module-registration hooks on every submodule assignment (``blk.mlp.act = ...``,
# ``add_module``, ``ModuleList[i] = ...``). The one installed below counts those whose parent lies inside a
# patched encoder; a view whose count is stale re-runs the layout check (and the probe) before its next call.
_REGISTRATIONS = [0]
_WATCHED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_HOOK: list = []


def _on_registration(parent, name, sub):
    if parent in _WATCHED:
        _REGISTRATIONS[0] += 1
    return None


def _watch(m: nn.Module) -> None:
    if not _HOOK:
        _HOOK.append(nn.modules.module.register_module_module_registration_hook(_on_registration))
    for s in m.modules():
        _WATCHED.add(s)


# ============================================================================================ the patched forwards
def _view(module) -> Optional[_FusedView]:
    return module.__dict__.get(_STATE)


def _authors_forward(self, x, pad_mask=None):
    """The authors' ``SequentialPE.forward(x, pad_mask)``, fused: digit ids [M, L] (and the pad mask, read when
    ``mask_padding``) -> [M, out_dim]."""
    v = _view(self)
    if v is None:  # unpatched while a stale reference to this forward was kept: run the module's own forward
        return type(self).forward(self, x, pad_mask)
    return v.forward_digits(x, pad_mask)


def _seqpe_forward(self, positions):
    """``SeqPE.forward(positions)``, fused (with FusedSeqPE's deduplication options)."""
    v = _view(self)
    if v is None:
        return type(self).forward(self, positions)
    return v.forward_positions(positions)


def _seqpe_forward_digits(self, digits, pad_mask=None):
    """``SeqPE.forward_digits(digits, pad_mask)``, fused."""
    v = _view(self)
    if v is None:
        return type(self).forward_digits(self, digits, pad_mask)
    return v.forward_digits(digits, pad_mask)


def _patched_extra_repr(self):
    v = _view(self)
    base = type(self).extra_repr(self)
    if v is None:
        return base
    tag = f"[seqpe_kernels.patch: fused forward, backend={v.backend!r}]"
    return tag + (f"\n{base}" if base else "")


_FUSED_FUNCS = (_authors_forward, _seqpe_forward, _seqpe_forward_digits)


def _probe_copy(m: nn.Module) -> nn.Module:
    """``m`` with every module in it copied shallowly (its own ``__dict__``, so its own ``training`` flag and
    submodule dict) and every tensor shared: what the probe switches to eval without touching ``m``. Cheap (no
    tensor copied; a deepcopy would also copy whatever else the module holds, accelerate's hooks included) and
    fine for any parameter kind (a DataParallel replica's non-leaf copies, plain tensors)."""
    memo: Dict[int, nn.Module] = {}

    def cp(mod):
        c = memo.get(id(mod))
        if c is None:
            c = memo[id(mod)] = object.__new__(type(mod))
            c.__dict__.update(mod.__dict__)
            c.__dict__["_modules"] = {k: (None if s is None else cp(s)) for k, s in mod._modules.items()}
        return c

    return cp(m)


def _patched_replicate(self):
    """``nn.DataParallel``'s replica of a patched module. torch's ``Module._replicate_for_data_parallel`` copies
    ``__dict__``, so the replica would call the fused forward bound to *this* module, i.e. compute with this
    module's parameters on this module's device (and its gradients would skip the broadcast's backward). The
    replica gets the same patch bound to itself; replicate() then sets its parameters, which the fused path
    reads live."""
    v = _view(self)
    if v is not None and v.__dict__.get("_structure") != _REGISTRATIONS[0]:
        v._recheck_structure()  # (a submodule reassigned since the last direct call: replicas skip the check)
    replica = type(self)._replicate_for_data_parallel(self)
    d = replica.__dict__
    if v is None:  # unpatched since: a plain replica
        d.pop("_replicate_for_data_parallel", None)
        return replica
    nv = _FusedView.__new__(_FusedView)
    nv.__dict__.update(v.__getstate__())  # options and the test hook
    # the caches shared (replicas are built every call; plans and backends depend on the configuration only)
    for k in ("_verified", "_plans", "_resolved"):
        nv.__dict__[k] = v.__dict__.setdefault(k, set() if k == "_verified" else {})
    nv.module = replica

    def rebound(f):
        try:
            return _rebind(f, self, replica)
        except PatchError:  # a wrapper this patch cannot see through: as torch's replicate leaves it
            return f

    nv.installed = {k: rebound(f) for k, f in v.installed.items()}
    nv.saved = {k: rebound(f) for k, f in v.saved.items()}
    for attr in list(d):
        if attr != _STATE:
            d[attr] = rebound(d[attr])
    d[_STATE] = nv
    return replica


# ============================================================================================ wrapper chains
def _rebind(fn, old, new):
    """``fn`` with every method binding to ``old`` in its wrapper chain (bound methods, _Bound) bound to ``new``
    instead; ``fn`` itself when nothing in it is bound to ``old`` (any other value: itself)."""
    if isinstance(fn, (types.MethodType, _Bound)):
        inner = _rebind(fn.__func__, old, new)
        owner = new if fn.__self__ is old else fn.__self__
        if inner is fn.__func__ and owner is fn.__self__:
            return fn
        return types.MethodType(inner, owner) if isinstance(fn, types.MethodType) else _Bound(owner, inner)
    if not callable(fn):
        return fn
    inner = getattr(fn, "__wrapped__", None)
    if inner is None or inner is fn:
        return fn
    new_inner = _rebind(inner, old, new)
    return fn if new_inner is inner else _substitute(fn, inner, new_inner)


def _chain(fn) -> List[Any]:
    """``fn`` and what it wraps (``__func__`` of a method, ``__wrapped__`` of a decorator), outermost first."""
    out, seen = [], set()
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        out.append(fn)
        if isinstance(fn, (types.MethodType, _Bound)):
            fn = fn.__func__
        else:
            fn = getattr(fn, "__wrapped__", None)
    return out


def _substitute(fn, old, new):
    """A copy of the wrapper chain ``fn`` with ``old`` (its innermost callable) replaced by ``new``.

    Rebuilds each layer: a bound method around the rebuilt function; a decorator function (``functools.wraps``:
    ``torch.autocast``'s, accelerate's ``convert_outputs_to_fp32``) with the closure cell that held the wrapped
    callable pointing at the rebuilt one; a callable object (accelerate's ``ConvertOutputsToFp32``) with the
    attribute that held it replaced. Raises PatchError for a layer it cannot see through."""
    if fn is old:
        return new
    if isinstance(fn, types.MethodType):
        return types.MethodType(_substitute(fn.__func__, old, new), fn.__self__)
    if isinstance(fn, _Bound):
        return _Bound(fn.__self__, _substitute(fn.__func__, old, new))
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        raise PatchError(f"cannot see through {fn!r}")
    new_inner = _substitute(inner, old, new)
    if isinstance(fn, types.FunctionType):
        cells = fn.__closure__ or ()
        hit = [i for i, c in enumerate(cells) if _cell(c) is inner]
        if not hit:
            raise PatchError(f"cannot see through {fn!r} (it does not hold what its __wrapped__ names)")
        new_cells = tuple(types.CellType(new_inner) if i in hit else c for i, c in enumerate(cells))
        g = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, new_cells)
        g.__kwdefaults__ = fn.__kwdefaults__
        g.__qualname__, g.__module__, g.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
        g.__dict__.update(fn.__dict__)
        g.__wrapped__ = new_inner
        return g
    d = getattr(fn, "__dict__", None)
    keys = [k for k, v in (d or {}).items() if v is inner and k != "__wrapped__"]
    if not keys:
        raise PatchError(f"cannot see through {fn!r} (it does not hold what its __wrapped__ names)")
    g = object.__new__(type(fn))  # not copy.copy: accelerate's wrapper refuses __getstate__ on purpose
    g.__dict__.update(d)
    for k in keys:
        g.__dict__[k] = new_inner
    g.__dict__["__wrapped__"] = new_inner
    return g


def _cell(c):
    try:
        return c.cell_contents
    except ValueError:  # empty cell
        return None


def _install(module: nn.Module, v: _FusedView, attr: str, func) -> None:
    """Put ``func`` bound to ``module`` in as ``module.<attr>``, keeping a wrapper already installed there."""
    cls_fn = getattr(type(module), attr)
    d = module.__dict__
    bound = _Bound(module, func)
    if attr not in d:
        new = bound
    else:
        cur = d[attr]
        chain = _chain(cur)
        if chain[-1] is not cls_fn:
            raise PatchError(
                f"seqpe_kernels.patch: {type(module).__name__}.{attr} was replaced on this instance by {cur!r}, "
                f"which does not wrap {type(module).__name__}.{attr} in a way this patch can see through. Call "
                "seqpe_kernels.patch(pe_model) right after the encoder is built (before accelerator.prepare, "
                "torch.compile or anything else that replaces its forward).")
        try:
            new = _substitute(cur, cls_fn, func)
        except PatchError as e:
            raise PatchError(
                f"seqpe_kernels.patch: {type(module).__name__}.{attr} is wrapped on this instance ({e}). Call "
                "seqpe_kernels.patch(pe_model) right after the encoder is built, before accelerator.prepare.") from None
        v.saved[attr] = cur
    v.installed[attr] = new
    object.__setattr__(module, attr, new)
    if attr == "forward" and isinstance(d.get("_original_forward"), (types.MethodType, _Bound)) \
            and _chain(d["_original_forward"])[-1] is cls_fn:
        # accelerate keeps the pre-prepare forward here (and unwrap_model walks back to it): the fused one now
        v.saved["_original_forward"] = d["_original_forward"]
        v.installed["_original_forward"] = bound
        object.__setattr__(module, "_original_forward", bound)


def _uninstall(module: nn.Module, v: _FusedView, attr: str) -> None:
    d = module.__dict__
    cur = d.get(attr)
    mine = v.installed.get(attr)
    if cur is None:
        return
    if cur is mine:
        if attr in v.saved:
            object.__setattr__(module, attr, v.saved[attr])
        else:
            del d[attr]
        return
    # something wrapped the fused forward after patching (accelerator.prepare): put the class's function back at
    # the bottom of that wrapper chain
    cls_fn = getattr(type(module), attr)
    chain = _chain(cur)
    bottom = chain[-1]
    if bottom in _FUSED_FUNCS or bottom is mine:
        repl = cls_fn if bottom in _FUSED_FUNCS else types.MethodType(cls_fn, module)
        try:
            object.__setattr__(module, attr, _substitute(cur, bottom, repl))
            return
        except PatchError:
            pass
    # unrecognised: leave it; the fused functions fall back to the class's forward once the state is gone


# ============================================================================================ public API
_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def _inner(module):
    while isinstance(module, _WRAPPERS):
        module = module.module
    return module


def _refuse_compiled(module):
    if hasattr(module, "_orig_mod") and type(module).__name__ == "OptimizedModule":
        raise PatchError("seqpe_kernels.patch: this module was compiled with torch.compile; patch the encoder "
                         "before compiling it (seqpe_kernels.patch(pe_model), then torch.compile(pe_model)).")


def patch(module: Optional[nn.Module], backend: str = "auto", *, check_range: bool = True, verify: bool = True,
          dedup: str = "auto", dedup_in_training: bool = False):
    """Make ``module``'s forward run the fused SeqPE encoder, in place; returns ``module``.

    ``module``: the authors' ``SequentialPE`` (text or image copy, or a fork with that layout), this package's
    ``SeqPE``, or either inside ``DistributedDataParallel`` / ``DataParallel`` (the wrapper is returned). ``None``
    is returned as is (the authors' builder returns None for non-SeqPE runs), and a :class:`FusedSeqPE` or an
    already patched module is left as it is.

    Options: ``backend`` ("auto", "triton", "cuda", "cpu", "torch": see seqpe_kernels.backend; resolved per call
    on the inputs' device, so patching before ``.cuda()`` is fine); ``check_range`` (validate digit ids /
    positions, one host sync per call); ``verify`` (compare with the module's own forward on a probe batch at the
    first fused call per device, backend and dtype); ``dedup`` / ``dedup_in_training`` (FusedSeqPE's options; used
    by ``SeqPE.forward(positions)`` only -- the authors' forward takes digits, which are encoded as given).

    Raises :class:`PatchError` with every difference when the module's layout is not the SeqPE encoder's.
    """
    if module is None:
        return None
    if not isinstance(module, nn.Module):
        raise TypeError(f"seqpe_kernels.patch expects an nn.Module, got {type(module).__name__}")
    if backend not in ("auto",) + _backend.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose auto, {', '.join(_backend.BACKENDS)}")
    if dedup not in ("auto", "off", "unique", "prefix"):
        raise ValueError(f"unknown dedup {dedup!r}; choose auto, off, unique or prefix")
    _refuse_compiled(module)
    m = _inner(module)
    _refuse_compiled(m)
    if isinstance(m, FusedSeqPE) or _view(m) is not None:
        return module
    layout = _layout(m)
    problems = _check_layout(m, layout)
    if problems:
        raise PatchError(f"seqpe_kernels.patch: {type(m).__name__} does not have the SeqPE encoder layout "
                         "(SEQPE_SPEC §2-§3), so the fused encoder would compute something else:\n  - "
                         + "\n  - ".join(problems))
    cls = type(m)
    if layout == "authors":
        eager_digits = cls.forward
        v = _FusedView(m, layout, backend, check_range, verify, dedup, dedup_in_training, cls.forward, eager_digits)
        todo = (("forward", _authors_forward),)
    else:
        v = _FusedView(m, layout, backend, check_range, verify, dedup, dedup_in_training, cls.forward,
                       cls.forward_digits)
        todo = (("forward", _seqpe_forward), ("forward_digits", _seqpe_forward_digits))
    done = []
    try:
        for attr, fn in todo:
            _install(m, v, attr, fn)
            done.append(attr)
    except Exception:
        for attr in done:
            _uninstall(m, v, attr)
        raise
    if "extra_repr" in m.__dict__:
        v.saved["extra_repr"] = m.__dict__["extra_repr"]
    v.installed["extra_repr"] = _Bound(m, _patched_extra_repr)
    object.__setattr__(m, "extra_repr", v.installed["extra_repr"])
    if "_replicate_for_data_parallel" in m.__dict__:
        v.saved["_replicate_for_data_parallel"] = m.__dict__["_replicate_for_data_parallel"]
    v.installed["_replicate_for_data_parallel"] = _Bound(m, _patched_replicate)
    object.__setattr__(m, "_replicate_for_data_parallel", v.installed["_replicate_for_data_parallel"])
    object.__setattr__(m, _STATE, v)
    return module


def unpatch(module: Optional[nn.Module]):
    """Undo :func:`patch` (a no-op for a module that is not patched); returns ``module``."""
    if module is None:
        return None
    m = _inner(module)
    v = _view(m)
    if v is None:
        return module
    for attr in ("forward", "forward_digits", "extra_repr", "_original_forward", "_replicate_for_data_parallel"):
        if attr not in v.installed:
            continue
        if attr == "_original_forward":
            if m.__dict__.get(attr) is v.installed[attr]:
                object.__setattr__(m, attr, v.saved[attr])
            continue
        if attr in ("extra_repr", "_replicate_for_data_parallel"):
            if m.__dict__.get(attr) is v.installed[attr]:
                if attr in v.saved:
                    object.__setattr__(m, attr, v.saved[attr])
                else:
                    del m.__dict__[attr]
            continue
        _uninstall(m, v, attr)
    del m.__dict__[_STATE]
    return module


def is_patched(module) -> bool:
    return module is not None and _view(_inner(module)) is not None


def patch_state(module) -> _FusedView:
    """The patch's state object of a patched module: its options (``backend``, ``check_range``, ``verify``) can be
    changed there, and ``record_dropout_masks = {}`` makes the next training call record its dropout keep-masks
    (FusedSeqPE's test hook, site names ``attn{i}``, ``resid_attn{i}``, ``resid_mlp{i}``)."""
    v = _view(_inner(module))
    if v is None:
        raise PatchError("the module is not patched (seqpe_kernels.patch(module) first)")
    return v


def module_config(m: nn.Module, layout: Optional[str] = None) -> Dict[str, Any]:
    """SeqPE's constructor arguments (``SeqPE.config()``) of an encoder with the authors' layout, read from its
    modules as they are now (what :func:`to_fused` builds and ``save_checkpoint`` records for such a module,
    patched or not). PatchError where the fused encoder has one value and the module several."""
    layout = layout or _layout(m)
    v = _FusedView(m, layout, "auto", True, False, "auto", False, None, None)
    eps = {b.layernorm_1.eps for b in m.transformers} | {b.layernorm_2.eps for b in m.transformers}
    if v.use_last_layernorm:
        eps.add(m.layernorm.eps)
    if len(eps) > 1:
        raise PatchError(f"FusedSeqPE has one LayerNorm eps, this module uses {sorted(eps)}")
    return dict(embed_dim=v.embed_dim, num_heads=v.num_heads, max_digits=v.max_digits, num_layers=v.num_layers,
                data_dim=v.data_dim, out_dim=v.out_dim, attn_direction=v.attn_direction,
                mask_padding=v.mask_padding, use_last_layernorm=v.use_last_layernorm, resid_pdrop=v.resid_pdrop,
                attn_pdrop=v.attn_pdrop, temperature=v.temperature, layer_norm_eps=eps.pop(),
                init=_init_of(type(m)), base=v.base,
                scale_attn_weights=v.scale_attn_weights)


def _init_of(cls) -> str:
    """"image" (truncated-normal init) for the authors' image encoder, else "text". Their image class is also named
    SequentialPE: told apart by its file (image_seqpe/models/sequential_pe.py) when the name does not say."""
    if cls.__name__.lower().startswith("image"):
        return "image"
    f = getattr(sys.modules.get(cls.__module__), "__file__", None) or ""
    return "image" if "image_seqpe" in Path(f).parts else "text"


def to_fused(module: nn.Module, backend: str = "auto", **options) -> FusedSeqPE:
    """A :class:`FusedSeqPE` with ``module``'s configuration and a copy of its weights (same state-dict keys), for
    new code that can pass integer positions: ``enc(positions)`` computes the digits in-kernel (no digit tensors,
    no pad mask) and deduplicates repeated positions at eval. ``module``: the authors' SequentialPE or a SeqPE."""
    m = _inner(module)
    if isinstance(m, SeqPE):
        return FusedSeqPE.from_reference(m, backend=backend, **options)
    layout = _layout(m)
    problems = _check_layout(m, layout)
    if problems:
        raise PatchError(f"seqpe_kernels.to_fused: {type(m).__name__} does not have the SeqPE encoder layout:\n  - "
                         + "\n  - ".join(problems))
    p = next(m.parameters())
    new = FusedSeqPE(**module_config(m, layout), backend=backend, **options)
    new = new.to(device=p.device, dtype=p.dtype)
    new.load_state_dict(m.state_dict(), strict=True)
    new.train(m.training)
    return new
