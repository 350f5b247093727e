"""Loading and saving SeqPE encoder weights in the authors' file layouts (SEQPE_SPEC §3).

Supported inputs of :func:`load_checkpoint`:

* an image checkpoint (``best_model.pth`` / ``ckpt_epoch_N.pth``): a ``torch.save`` dict whose ``pe_model``
  entry is the ``SequentialPE`` state dict (other entries: ``model``, ``config``, ``optimizer`` ... ignored);
* a bare ``torch.save``-d state dict of the encoder;
* a text (accelerate ``save_state``) directory: the encoder is ``model_1.safetensors`` inside it
  (``model.safetensors`` there is GPT-2);
* a ``.safetensors`` file holding the encoder state dict.

The architecture is read off the tensor shapes (width, digits per axis, data_dim, layers, output width,
final LayerNorm, digit base). What the weights cannot tell - the head count, the attention direction, pad
masking - comes from the arguments; for image checkpoints whose pickled ``config`` can be read, its
``NUM_ATTENTION_HEADS`` fills in a missing ``num_heads`` and disagreements with the other recorded settings
are reported as warnings.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

__all__ = ["load_checkpoint", "save_checkpoint", "read_state_dict", "infer_config"]

_PROBE_KEY = "transformers.0.attn.c_attn.weight"
_TEXT_ENCODER_FILE = "model_1.safetensors"
_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers


# ----------------------------------------------------------------------------------------------- helpers
def _require_safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading or writing .safetensors files needs the 'safetensors' package: "
                          "pip install safetensors") from e
    return st


def _short_list(keys, n: int = 12) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)} in all)"


class _Placeholder(dict):
    """Stands in for a pickled class that cannot be imported (e.g. yacs' CfgNode when yacs is absent).

    Derives from dict so a pickled dict subclass (CfgNode) keeps its items and ``.get`` works on it.
    """

    _qualname = "?"

    def __new__(cls, *args, **kwargs):
        return dict.__new__(cls)

    def __init__(self, *args, **kwargs):
        dict.__init__(self)

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)

    def __repr__(self):
        return f"<unimportable {self._qualname} {dict.__repr__(self)}>"


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Placeholder,), {"_qualname": f"{module}.{name}"})


class _LenientPickle:
    """A ``pickle_module`` for torch.load that replaces unimportable classes by placeholders."""

    Unpickler = _LenientUnpickler
    __name__ = "seqpe_kernels.checkpoint._LenientPickle"

    @staticmethod
    def load(f, **kwargs):
        return _LenientUnpickler(f, **kwargs).load()


def _device_of(map_location) -> Optional[torch.device]:
    if isinstance(map_location, (str, torch.device)):
        return torch.device(map_location)
    return None


def _torch_load(path: Path, map_location, allow_unsafe_pickle: bool):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" not in msg:  # not a pickled class: the file itself is broken
            first = next((ln for ln in msg.splitlines() if ln.strip()), type(e).__name__)
            raise ValueError(f"{path}: could not read it as a torch.save file ({first})") from e
        culprit = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
        culprit = culprit.group(1) if culprit else "a pickled Python object"
        if not allow_unsafe_pickle:
            raise ValueError(
                f"{path}: the file pickles {culprit} (the image checkpoints store their yacs config this way), "
                "which torch.load(weights_only=True) refuses; pass allow_unsafe_pickle=True to load it with "
                "weights_only=False if you trust the file, or re-save just the encoder with save_checkpoint()."
            ) from e
        warnings.warn(
            f"{path}: torch.load(weights_only=True) refused the file because it pickles {culprit} (the image "
            "checkpoints store their yacs CfgNode config that way). Retrying with weights_only=False: this runs "
            "the file's pickle code, so only do it for files you trust (pass allow_unsafe_pickle=False to refuse). "
            "Classes that cannot be imported (e.g. yacs when it is not installed) are replaced by placeholders.",
            UserWarning, stacklevel=3)
        try:
            return torch.load(path, map_location=map_location, weights_only=False, pickle_module=_LenientPickle)
        except Exception as e2:
            raise ValueError(f"{path}: could not read it even with weights_only=False "
                             f"({type(e2).__name__}: {e2})") from e2
    except Exception as e:  # a file that is not a torch.save archive fails with many exception types
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise ValueError(f"{path}: could not read it as a torch.save file "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_prefix(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    changed = True
    while changed and sd:
        changed = False
        for pre in _PREFIXES:
            if all(k.startswith(pre) for k in sd):
                sd = {k[len(pre):]: v for k, v in sd.items()}
                changed = True
    return sd


def _no_encoder_error(path, what: str, keys) -> ValueError:
    keys = list(keys)
    hint = ""
    if any(k.startswith("transformer.h.") or k.startswith("transformer.wte") for k in keys):
        hint = (" These look like GPT-2 main-model weights (the text pipeline's model.safetensors); the encoder "
                f"lies next to it in {_TEXT_ENCODER_FILE}.")
    elif any(k.startswith("blocks.") or k.startswith("patch_embed.") for k in keys):
        hint = " These look like ViT main-model weights (the image checkpoint's 'model' entry); the encoder is 'pe_model'."
    return ValueError(f"{path}: this file has no SeqPE encoder weights: {what} and no '{_PROBE_KEY}'; "
                      f"keys found: {_short_list(keys)}.{hint}")


# ----------------------------------------------------------------------------------------------- reading
def read_state_dict(path, map_location="cpu", allow_unsafe_pickle: bool = True
                    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read the encoder's state dict from any supported container.

    Returns ``(state_dict, info)``; ``info`` has ``format`` ("image-pth", "state-dict-pth", "safetensors",
    "text-dir"), ``file`` (the file actually read) and ``config`` (the pickled run config of an image
    checkpoint, or None).
    """
    path = Path(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint file or directory: {path}")
    info: Dict[str, Any] = {"format": None, "file": path, "config": None}
    if path.is_dir():
        f = path / _TEXT_ENCODER_FILE
        if not f.is_file():
            found = sorted(p.name for p in path.iterdir())
            raise ValueError(f"{path} is a directory but has no {_TEXT_ENCODER_FILE} (the SeqPE encoder of an "
                             f"accelerate save_state directory); files found: {_short_list(found)}")
        info.update(format="text-dir", file=f)
        path = f
    if path.suffix == ".safetensors":
        st = _require_safetensors()
        dev = _device_of(map_location)
        try:
            sd = st.load_file(str(path), device=str(dev) if dev is not None else "cpu")
        except Exception as e:  # safetensors raises its own error type on a corrupt header
            raise ValueError(f"{path}: could not read it as a safetensors file ({e})") from e
        info["format"] = info["format"] or "safetensors"
        what = "no encoder keys"
    else:
        obj = _torch_load(path, map_location, allow_unsafe_pickle)
        if isinstance(obj, Mapping) and "pe_model" in obj:
            sd = obj["pe_model"]
            info.update(format="image-pth", config=obj.get("config"))
            if not _is_state_dict(sd):
                raise ValueError(f"{path}: the 'pe_model' entry is not a state dict of tensors "
                                 f"(got {type(sd).__name__})")
        elif _is_state_dict(obj):
            sd = obj
            info["format"] = "state-dict-pth"
        elif isinstance(obj, Mapping):
            raise _no_encoder_error(path, "no key 'pe_model'", obj.keys())
        else:
            raise ValueError(f"{path}: expected a dict (an image checkpoint with 'pe_model', or a state dict), "
                             f"got {type(obj).__name__}")
        what = "no key 'pe_model'"
    sd = _strip_prefix(dict(sd))
    if _PROBE_KEY not in sd:
        raise _no_encoder_error(path, what, sd.keys())
    return sd, info


def _shape(sd, key):
    return tuple(sd[key].shape) if key in sd else None


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Constructor arguments of :class:`~seqpe_kernels.reference.SeqPE` read off the tensor shapes.

    Gives embed_dim, max_digits, num_layers, data_dim, out_dim, use_last_layernorm and base; not num_heads
    (the weights do not determine it).
    """
    sd = state_dict
    need = ["token_of_seqpe_embed.weight", "pos_of_seqpe_embed.weight", "out_proj.weight", _PROBE_KEY]
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"cannot infer the encoder configuration: missing key(s) {missing}; "
                         f"keys found: {_short_list(sd.keys())}")
    tok = _shape(sd, "token_of_seqpe_embed.weight")
    pos = _shape(sd, "pos_of_seqpe_embed.weight")
    if len(tok) != 2 or len(pos) != 2:
        raise ValueError(f"token_of_seqpe_embed.weight {list(tok)} and pos_of_seqpe_embed.weight {list(pos)} "
                         "must both be 2-D embedding tables")
    base, D = tok
    L = pos[0]
    if pos[1] != D:
        raise ValueError(f"pos_of_seqpe_embed.weight has width {pos[1]} but token_of_seqpe_embed.weight has {D}")
    dim = _shape(sd, "dim_token_embed")
    if dim is not None:
        if len(dim) != 3 or dim[1] != 1 or dim[2] != D:
            raise ValueError(f"dim_token_embed has shape {list(dim)}, expected [data_dim, 1, {D}]")
        data_dim = dim[0]
    else:
        data_dim = 1
    if L % data_dim:
        raise ValueError(f"pos_of_seqpe_embed has {L} rows, not a multiple of data_dim={data_dim} "
                         "(it should have data_dim * max_digits rows)")
    layers = sorted({int(m.group(1)) for k in sd for m in [re.match(r"transformers\.(\d+)\.", k)] if m})
    if layers != list(range(len(layers))):
        raise ValueError(f"transformer block indices are not 0..n-1: found {layers}")
    out = _shape(sd, "out_proj.weight")
    if len(out) != 2 or out[1] != D:
        raise ValueError(f"out_proj.weight has shape {list(out)}, expected [out_dim, {D}] (nn.Linear layout)")
    return dict(embed_dim=D, max_digits=L // data_dim, num_layers=len(layers), data_dim=data_dim,
                out_dim=out[0], use_last_layernorm="layernorm.weight" in sd, base=base)


def _config_get(cfg, key):
    if cfg is None:
        return None
    try:
        if isinstance(cfg, Mapping):
            return cfg.get(key)
        return getattr(cfg, key, None)
    except Exception:  # a placeholder or exotic object: no hints
        return None


def _describe_mismatch(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], path, cfg) -> Optional[str]:
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = []
    for k in expected:
        if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape):
            a, b = list(sd[k].shape), list(expected[k].shape)
            note = ""
            if len(a) == 2 and a[::-1] == b:
                note = " (transposed: Conv1D weights are stored [in, out], nn.Linear weights [out, in])"
            shapes.append(f"{k}: file {a} vs module {b}{note}")
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"keys the module needs but the file lacks: {_short_list(missing)}")
    if unexpected:
        parts.append(f"keys in the file the module does not have: {_short_list(unexpected)}")
    if shapes:
        parts.append("shape mismatches: " + "; ".join(shapes[:12]) + (" ..." if len(shapes) > 12 else ""))
    return (f"{path}: the weights do not fit {type(module).__name__}({cfg}): " + "; ".join(parts))


# ----------------------------------------------------------------------------------------------- public
def load_checkpoint(path, num_heads: Optional[int] = None, attn_direction: str = "causal", mask_padding: bool = False,
                    module_cls=None, map_location="cpu", *, allow_unsafe_pickle: bool = True, **overrides):
    """Build a SeqPE encoder from the authors' checkpoint files (SEQPE_SPEC §3.3) and load it strictly.

    Args:
        path: image ``.pth`` (``pe_model`` entry), bare state-dict ``.pth``, ``.safetensors`` file, or a text
            accelerate directory containing ``model_1.safetensors``.
        num_heads: encoder heads; not recorded in the weights. Default: the image config's
            ``NUM_ATTENTION_HEADS`` when it can be read, else ``embed_dim // 64`` as the authors' CLI does
            (12 for the text config, 6 for the image config).
        attn_direction, mask_padding: as trained (not recorded in the weights; the paper used causal, False).
        module_cls: class to instantiate (default :class:`seqpe_kernels.reference.SeqPE`; e.g. FusedSeqPE).
        map_location: where tensors are loaded; a device (string or torch.device) also moves the module there.
        allow_unsafe_pickle: an image checkpoint's pickled yacs config makes ``torch.load(weights_only=True)``
            fail; with True (default) it is retried with ``weights_only=False`` after a warning, with False
            a ValueError is raised instead.
        **overrides: further constructor arguments (resid_pdrop, temperature, init, ...) or corrections to
            the inferred ones.

    Raises:
        ValueError naming the missing/unexpected keys and shape mismatches when the weights do not fit.
    """
    if module_cls is None:
        from .reference import SeqPE as module_cls
    sd, info = read_state_dict(path, map_location, allow_unsafe_pickle)
    cfg = infer_config(sd)
    run_cfg = info["config"]
    if num_heads is None:
        hint = _config_get(run_cfg, "NUM_ATTENTION_HEADS")
        if isinstance(hint, int) and hint > 0:
            num_heads = hint
        else:
            num_heads = cfg["embed_dim"] // 64
            if num_heads < 1 or cfg["embed_dim"] % num_heads:
                raise ValueError(f"cannot default num_heads for embed_dim={cfg['embed_dim']} (the authors' default "
                                 "embed_dim // 64 does not apply); pass num_heads=")
    for key, arg_name, value in (("SEQPE_ATTN_DIRECTION", "attn_direction", attn_direction),
                                 ("SEQPE_MASK_PADDING", "mask_padding", mask_padding),
                                 ("SEQPE_TEMPERATURE", "temperature", overrides.get("temperature", 1.0))):
        recorded = _config_get(run_cfg, key)
        if recorded is not None and not isinstance(recorded, _Placeholder) and recorded != value:
            warnings.warn(f"{info['file']}: the checkpoint's config records {key}={recorded!r} but the encoder is "
                          f"built with {arg_name}={value!r}; pass {arg_name}={recorded!r} to match training",
                          UserWarning, stacklevel=2)
    cfg.update(num_heads=num_heads, attn_direction=attn_direction, mask_padding=mask_padding)
    cfg.update(overrides)
    try:
        module = module_cls(**cfg)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{info['file']}: cannot build {getattr(module_cls, '__name__', module_cls)} with the "
                         f"configuration {cfg}: {e}") from e
    problem = _describe_mismatch(module, sd, info["file"], cfg)
    if problem:
        raise ValueError(problem)
    module.load_state_dict(sd, strict=True)
    dev = _device_of(map_location)
    if dev is not None:
        module = module.to(dev)
    return module


def save_checkpoint(module: torch.nn.Module, path) -> Path:
    """Write ``module``'s state dict in one of the authors' layouts, chosen by ``path``:

    * ``*.safetensors``: a safetensors file of the state dict;
    * no suffix (a directory, created if needed): ``<dir>/model_1.safetensors`` as accelerate writes it;
    * ``*.pth`` / ``*.pt`` / ``*.bin``: an image-style ``torch.save({"pe_model": state_dict})``.

    Returns the path of the file written.
    """
    path = Path(os.fspath(path))
    sd = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    if path.suffix == "" or path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        path = path / _TEXT_ENCODER_FILE
    if path.suffix == ".safetensors":
        st = _require_safetensors()
        st.save_file(sd, str(path))
    elif path.suffix in (".pth", ".pt", ".bin"):
        torch.save({"pe_model": sd}, path)
    else:
        raise ValueError(f"save_checkpoint: unknown suffix {path.suffix!r}; use .pth/.pt/.bin (image-style "
                         "{'pe_model': ...}), .safetensors, or a directory name (text-style model_1.safetensors)")
    return path
