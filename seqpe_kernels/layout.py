"""What makes a module a SeqPE encoder the fused path can run (SEQPE_SPEC §2-§3), as ``seqpe_kernels.patch`` checks
it: the attribute names of the two interfaces (the authors' ``SequentialPE``, this package's ``SeqPE``), the
parameter names and shapes, the activation (gelu_new, checked on values), and dropout probabilities the fused
kernels can apply (one residual and one attention rate). Every difference is named in the refusal.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from .reference.seqpe import SeqPE, gelu_new


class PatchError(ValueError):
    """The module cannot be patched (or a patched module's fused forward cannot run it); the message says why."""


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
