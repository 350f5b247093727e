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
import types
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import backend as _backend
from .fused import FusedSeqPE
from .reference.seqpe import SeqPE, gelu_new
from .reference.tokenize import tokenize

__all__ = ["patch", "unpatch", "is_patched", "patch_state", "prepare_seqpe_data", "to_fused", "PatchError"]

_STATE = "_seqpe_fused"  # the instance attribute holding the _FusedView of a patched module


class PatchError(ValueError):
    """The module cannot be patched (or a patched module's fused forward cannot run it); the message says why."""


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


# ============================================================================================ layouts
# attribute names of the two module interfaces this file knows (SEQPE_SPEC §2.1; seqpe_kernels.SeqPE)
_AUTHORS = {"embed_dim": "pe_embed_dim", "max_digits": "max_digits", "data_dim": "data_dim",
            "attn_direction": "attn_direction", "mask_padding": "mask_padding",
            "use_last_layernorm": "use_last_layernorm", "temperature": "seqpe_temperature"}
_AUTHORS_EXTRA = ("head_num", "layer_num", "use_cls_token")
_OURS = {k: k for k in ("embed_dim", "max_digits", "data_dim", "attn_direction", "mask_padding",
                        "use_last_layernorm", "temperature")}


def _layout(m: nn.Module) -> str:
    if isinstance(m, SeqPE):
        return "seqpe"
    need = list(_AUTHORS.values()) + list(_AUTHORS_EXTRA)
    missing = [a for a in need if not hasattr(m, a)]
    if not missing:
        return "authors"
    ours_missing = [a for a in list(_OURS.values()) + ["num_heads", "num_layers"] if not hasattr(m, a)]
    raise PatchError(
        f"seqpe_kernels.patch: {type(m).__name__} is not a SeqPE encoder this patch knows: it lacks the authors' "
        f"SequentialPE attribute(s) {', '.join(missing)}"
        + (f" (and seqpe_kernels.SeqPE's {', '.join(ours_missing)})" if ours_missing else "")
        + ". Pass the encoder module itself (pe_model = build_pe_model(...)), not the main model.")


def _expected_params(D: int, O: int, L: int, d: int, base: int, nl: int, last_ln: bool) -> Dict[str, Tuple[int, ...]]:
    """SEQPE_SPEC §3.1: parameter name -> shape."""
    exp = {"pos_of_seqpe_embed.weight": (L, D), "token_of_seqpe_embed.weight": (base, D), "cls_token_embed": (1, 1, D)}
    if d > 1:
        exp["dim_token_embed"] = (d, 1, D)
    for i in range(nl):
        p = f"transformers.{i}."
        exp.update({p + "attn.c_attn.weight": (D, 3 * D), p + "attn.c_attn.bias": (3 * D,),
                    p + "attn.c_proj.weight": (D, D), p + "attn.c_proj.bias": (D,),
                    p + "layernorm_1.weight": (D,), p + "layernorm_1.bias": (D,),
                    p + "layernorm_2.weight": (D,), p + "layernorm_2.bias": (D,),
                    p + "mlp.c_fc.weight": (D, 4 * D), p + "mlp.c_fc.bias": (4 * D,),
                    p + "mlp.c_proj.weight": (4 * D, D), p + "mlp.c_proj.bias": (D,)})
    if last_ln:
        exp.update({"layernorm.weight": (D,), "layernorm.bias": (D,)})
    exp.update({"out_proj.weight": (O, D), "out_proj.bias": (O,)})
    return exp


def _short(names: Sequence[str], n: int = 8) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _dropout_ps(m: nn.Module) -> Dict[str, Dict[str, float]]:
    """{'resid': {site name: p}, 'attn': {...}} over every block's dropout layers."""
    out = {"resid": {}, "attn": {}}
    for i, blk in enumerate(m._modules["transformers"]):
        at, ml = blk._modules["attn"], blk._modules["mlp"]
        for kind, owner, attr, name in (("attn", at, "attn_dropout", f"transformers.{i}.attn.attn_dropout"),
                                        ("resid", at, "resid_dropout", f"transformers.{i}.attn.resid_dropout"),
                                        ("resid", ml, "dropout", f"transformers.{i}.mlp.dropout")):
            layer = getattr(owner, attr, None)
            out[kind][name] = float(layer.p) if layer is not None and hasattr(layer, "p") else 0.0
    return out


def _dropout_p(m: nn.Module) -> Tuple[float, float]:
    """(residual p, attention p) shared by every block; PatchError naming them if they differ. Reads the module
    dicts directly: this runs on every call."""
    res, att = set(), set()
    for blk in m._modules["transformers"]._modules.values():
        at, ml = blk._modules["attn"]._modules, blk._modules["mlp"]._modules
        att.add(getattr(at.get("attn_dropout"), "p", 0.0))
        res.add(getattr(at.get("resid_dropout"), "p", 0.0))
        res.add(getattr(ml.get("dropout"), "p", 0.0))
    if len(res) > 1 or len(att) > 1:
        ps = _dropout_ps(m)
        _one_p(ps["resid"], "residual-dropout")
        _one_p(ps["attn"], "attention-dropout")
    return float(res.pop()), float(att.pop())


def _one_p(ps: Dict[str, float], what: str) -> float:
    vals = sorted(set(ps.values()))
    if len(vals) > 1:
        raise PatchError(f"seqpe_kernels.patch: the fused encoder applies one {what} probability to every block, "
                         "but this module's differ: " + ", ".join(f"{k}.p={v}" for k, v in ps.items())
                         + ". Set them equal (or unpatch the module) to train it fused.")
    return vals[0] if vals else 0.0


def _check_layout(m: nn.Module, layout: str) -> List[str]:
    """Every way ``m`` differs from the layout the fused path computes (empty: it matches)."""
    names = _AUTHORS if layout == "authors" else _OURS
    problems: List[str] = []
    get = lambda key: getattr(m, names[key])  # noqa: E731
    D, K, d = get("embed_dim"), get("max_digits"), get("data_dim")
    if layout == "authors" and not m.use_cls_token:
        problems.append("use_cls_token=False (the encoder's output is read at the CLS token; SEQPE_SPEC §1.5)")
    if get("attn_direction") not in ("causal", "bi"):
        problems.append(f"attn_direction={get('attn_direction')!r} (expected 'causal' or 'bi')")
    mods = m._modules
    for sub in ("token_of_seqpe_embed", "pos_of_seqpe_embed", "transformers", "out_proj"):
        if sub not in mods:
            problems.append(f"no submodule {sub!r}")
    if problems:
        return problems
    blocks = list(mods["transformers"])
    nl = len(blocks)
    if layout == "authors" and m.layer_num != nl:
        problems.append(f"layer_num={m.layer_num} but transformers has {nl} block(s)")
    if nl < 1:
        problems.append("no transformer blocks")
    tok = mods["token_of_seqpe_embed"]
    base = tok.weight.shape[0] if isinstance(getattr(tok, "weight", None), torch.Tensor) else 10
    out = mods["out_proj"]
    if not isinstance(out, nn.Linear):
        problems.append(f"out_proj is a {type(out).__name__}, expected nn.Linear ([out, in] weight)")
        O = D
    else:
        O = out.out_features
        if out.bias is None:
            problems.append("out_proj has no bias")
    for nm in ("token_of_seqpe_embed", "pos_of_seqpe_embed"):
        e = mods[nm]
        if not isinstance(e, nn.Embedding):
            problems.append(f"{nm} is a {type(e).__name__}, expected nn.Embedding")
        elif e.max_norm is not None:
            problems.append(f"{nm} has max_norm={e.max_norm} (renormalises rows in its forward)")
    last_ln = bool(get("use_last_layernorm"))
    exp = _expected_params(D, O, d * K, d, base, nl, last_ln)
    have = dict(m.named_parameters())
    missing = [k for k in exp if k not in have]
    extra = [k for k in have if k not in exp]
    if missing:
        problems.append(f"missing parameter(s) {_short(missing)}")
    if extra:
        problems.append(f"parameter(s) the SeqPE encoder does not have: {_short(extra)}")
    bad = [f"{k} {tuple(have[k].shape)} (expected {exp[k]})" for k in exp if k in have
           and tuple(have[k].shape) != exp[k]]
    if bad:
        problems.append("shape(s) differ: " + _short(bad, 6))
    bufs = [n for n, _ in m.named_buffers()]
    if bufs:
        problems.append(f"buffer(s) the SeqPE encoder does not have: {_short(bufs)}")
    heads = set()
    scales = set()
    for i, blk in enumerate(blocks):
        p = f"transformers.{i}"
        bm = blk._modules
        at, ml = bm.get("attn"), bm.get("mlp")
        if at is None or ml is None:
            problems.append(f"{p} has no attn / mlp submodule")
            continue
        for nm, lin in (("attn.c_attn", at._modules.get("c_attn")), ("attn.c_proj", at._modules.get("c_proj")),
                        ("mlp.c_fc", ml._modules.get("c_fc")), ("mlp.c_proj", ml._modules.get("c_proj"))):
            if isinstance(lin, nn.Linear):
                problems.append(f"{p}.{nm} is an nn.Linear; the SeqPE encoder's are GPT-2 Conv1D ([in, out] "
                                "weight, y = x @ W + b)")
        for nm in ("layernorm_1", "layernorm_2"):
            ln = bm.get(nm)
            if not isinstance(ln, nn.LayerNorm):
                problems.append(f"{p}.{nm} is not an nn.LayerNorm")
            elif tuple(ln.normalized_shape) != (D,) or not ln.elementwise_affine:
                problems.append(f"{p}.{nm} normalises {tuple(ln.normalized_shape)} (affine={ln.elementwise_affine}),"
                                f" expected ({D},) affine")
        h = getattr(at, "num_heads", None)
        if not isinstance(h, int) or h < 1 or D % h:
            problems.append(f"{p}.attn.num_heads={h!r} does not divide embed_dim {D}")
        heads.add(h)
        scales.add(bool(getattr(at, "scale_attn_weights", True)))
        act = ml._modules.get("act")
        if act is not None and not _is_gelu_new(act):
            problems.append(f"{p}.mlp.act is {type(act).__name__}; the fused encoder computes gelu_new "
                            "(tanh approximation, SEQPE_SPEC §2.3)")
    if len(heads) > 1:
        problems.append(f"blocks have different head counts {sorted(heads, key=str)}")
    if layout == "authors" and heads and m.head_num not in heads:
        problems.append(f"head_num={m.head_num} but the blocks' attn.num_heads is {sorted(heads, key=str)}")
    if len(scales) > 1:
        problems.append("blocks differ in scale_attn_weights")
    if last_ln:
        ln = mods.get("layernorm")
        if not isinstance(ln, nn.LayerNorm):
            problems.append("use_last_layernorm=True but layernorm is not an nn.LayerNorm")
    for kind, what in (("resid", "residual-dropout"), ("attn", "attention-dropout")):
        try:
            _one_p(_dropout_ps(m)[kind], what)
        except PatchError as e:
            problems.append(str(e).split(": ", 1)[1])
    hooked = [n or type(m).__name__ for n, s in m.named_modules() if s is not m and
              (s._forward_hooks or s._forward_pre_hooks or s._backward_hooks or
               getattr(s, "_backward_pre_hooks", None))]
    if hooked:
        problems.append(f"forward/backward hooks on submodule(s) {_short(hooked)} (the fused forward does not run "
                        "the submodules, so they would not fire; hooks on the encoder module itself are fine)")
    dts = {p.dtype for p in m.parameters()}
    if any(not dt.is_floating_point for dt in dts):
        problems.append(f"non-floating parameter dtype(s) {sorted(map(str, dts))}")
    return problems


def _is_gelu_new(act: nn.Module) -> bool:
    """Whether ``act`` computes gelu_new (checked on values: the class name differs between libraries)."""
    try:
        with torch.no_grad():
            x = torch.linspace(-6, 6, 97, dtype=torch.float64)
            return bool(torch.allclose(act(x).double(), gelu_new(x), rtol=1e-6, atol=1e-9))
    except Exception:
        return False


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
        return bool(getattr(self._attn0, "scale_attn_weights", True))

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
        for k in ("_plans", "_resolved", "_verified"):  # caches: rebuilt on the next call
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
        if not self.verify:
            return
        p = self.module._parameters.get("cls_token_embed")
        key = (device, name, p.dtype if p is not None else None)
        done = self.__dict__.get("_verified")
        if done is not None and key in done:
            return
        if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return
        self._verify(torch.device(device), name)
        self.__dict__.setdefault("_verified", set()).add(key)

    @torch.no_grad()
    def _verify(self, device: torch.device, name: str):
        """The module's own forward and the fused one on a fixed probe batch, eval mode, no autocast."""
        m = self.module
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
        tf32, prec = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
        try:
            m.eval()
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on both sides: a TF32 GEMM is ~1e-3 off
            torch.set_float32_matmul_precision("highest")
            with torch.autocast(device.type, enabled=False):
                want = self.eager_digits(m, digits, pad)
                got = self._fused(digits, pad if self.mask_padding else None, from_positions=False, name=name)
        finally:
            for s, t in flags:
                s.training = t
            torch.set_float32_matmul_precision(prec)
            torch.backends.cuda.matmul.allow_tf32 = tf32
        dt = want.dtype
        tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dt, 5e-2)
        scale = want.abs().max().clamp_min(1e-30)
        err = ((got.to(dt) - want).abs().max() / scale).item()
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


# ============================================================================================ wrapper chains
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
    for attr in ("forward", "forward_digits", "extra_repr", "_original_forward"):
        if attr not in v.installed:
            continue
        if attr == "_original_forward":
            if m.__dict__.get(attr) is v.installed[attr]:
                object.__setattr__(m, attr, v.saved[attr])
            continue
        if attr == "extra_repr":
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
    v = _FusedView(m, layout, backend, True, False, "auto", False, None, None)
    eps = {b.layernorm_1.eps for b in m.transformers} | {b.layernorm_2.eps for b in m.transformers}
    if v.use_last_layernorm:
        eps.add(m.layernorm.eps)
    if len(eps) > 1:
        raise PatchError(f"to_fused: FusedSeqPE has one LayerNorm eps, this module uses {sorted(eps)}")
    p = next(m.parameters())
    new = FusedSeqPE(embed_dim=v.embed_dim, num_heads=v.num_heads, max_digits=v.max_digits, num_layers=v.num_layers,
                     data_dim=v.data_dim, out_dim=v.out_dim, attn_direction=v.attn_direction,
                     mask_padding=v.mask_padding, use_last_layernorm=v.use_last_layernorm, resid_pdrop=v.resid_pdrop,
                     attn_pdrop=v.attn_pdrop, temperature=v.temperature, layer_norm_eps=eps.pop(), base=v.base,
                     scale_attn_weights=v.scale_attn_weights, backend=backend, **options)
    new = new.to(device=p.device, dtype=p.dtype)
    new.load_state_dict(m.state_dict(), strict=True)
    new.train(m.training)
    return new


# ============================================================================================ data
def prepare_seqpe_data(raw_pos_list, max_digits: int, device=None, pad_value: int = 0, is_left_padding: bool = True,
                       *, base: int = 10, check_range: bool = True):
    """Vectorised drop-in for the authors' ``PeUtils.prepare_seqpe_data`` (same arguments, same outputs).

    ``raw_pos_list``: integer positions -- a list of ints (1-D) or of tuples (n-D, row first), a numpy array, or a
    tensor ``[M]`` / ``[M, d]`` (kept on its device). Returns ``(digits int64 [M, d*K], pad_mask float32
    [M, d*K])`` on ``device`` (default: the positions' device; CPU for Python lists): each axis's decimal digits,
    padded to ``max_digits`` with ``pad_value`` (left padding by default, as every call site of the authors' code
    uses), axes concatenated; pad_mask is 1 on real digits. A few tensor ops instead of a Python string loop per
    position. Unlike the original (ragged lists, then an opaque error), a position with more than ``max_digits``
    digits or a negative one raises with the reason.

    Swap it in with one line: ``PeUtils.prepare_seqpe_data = staticmethod(seqpe_kernels.prepare_seqpe_data)``.
    """
    pos = _as_positions(raw_pos_list, device)
    digits, mask = tokenize(pos, max_digits, base, None, check_range)
    if is_left_padding and pad_value == 0:
        return digits, mask
    M = digits.shape[0]
    K = max_digits
    dig = digits.view(M, -1, K)
    n = mask.view(M, -1, K).sum(-1, keepdim=True).long()          # real digits per axis
    slot = torch.arange(K, device=digits.device)
    if is_left_padding:
        real = slot >= (K - n)
    else:  # real digits first, then the padding
        idx = (slot + (K - n)).clamp(max=K - 1)
        dig = torch.gather(dig, -1, idx)
        real = slot < n
    dig = torch.where(real, dig, torch.full_like(dig, pad_value))
    return dig.reshape(M, -1), real.to(torch.float32).reshape(M, -1)


def _as_positions(raw, device) -> torch.Tensor:
    if isinstance(raw, torch.Tensor):
        pos = raw
    else:
        try:
            import numpy as np

            if isinstance(raw, np.ndarray):
                raw = torch.from_numpy(raw)
        except ImportError:  # pragma: no cover
            pass
        if isinstance(raw, torch.Tensor):
            pos = raw
        else:
            raw = list(raw)
            pos = torch.tensor(raw, dtype=torch.int64) if raw else torch.empty(0, dtype=torch.int64)
    if device is not None:
        pos = pos.to(device)
    return pos
