"""Loading and saving SeqPE encoder weights in the authors' file layouts (SEQPE_SPEC §3), with the configuration.

Supported inputs of :func:`load_checkpoint`:

* an image checkpoint (``best_model.pth`` / ``ckpt_epoch_N.pth``): a ``torch.save`` dict whose ``pe_model``
  entry is the ``SequentialPE`` state dict (other entries: ``model``, ``config``, ``optimizer`` ... ignored);
* a ``seqpe-kernels train --save`` file: a ``torch.save`` dict whose ``encoder`` entry is the encoder;
* a bare ``torch.save``-d state dict of the encoder;
* a text (accelerate ``save_state``) directory: the encoder is ``model_1.safetensors`` inside it
  (``model.safetensors`` there is GPT-2);
* a ``.safetensors`` file holding the encoder state dict.

Configuration. :func:`save_checkpoint` and ``train --save`` record the encoder's full constructor
configuration (``SeqPE.config()``) beside the weights: a ``seqpe_config`` entry of plain Python values in a
``.pth`` dict (``torch.load(weights_only=True)`` reads it), a ``seqpe_config`` JSON string in the
safetensors metadata (also for ``model_1.safetensors`` of a directory). The layouts stay what the authors'
loaders read. On loading, the architecture is read off the tensor shapes (width, digits per axis, data_dim,
layers, output width, final LayerNorm, digit base); what the weights cannot tell (heads, attention direction,
pad masking, temperature, dropout, ...) comes, in this order, from the caller's arguments, the file's recorded
configuration (``seqpe_config``; for older files the train run's ``config``, the image checkpoint's pickled
yacs config, e.g. ``NUM_ATTENTION_HEADS``, or the authors' text run files ``pe_config.json`` / ``train_args.json``
in or above the save_state folder), else a stated guess: a :class:`CheckpointConfigWarning` names every
guessed value and the argument that overrides it. An argument that contradicts the file's record is used, with
a warning naming both values.

Safety. Nothing in a file is executed unless the caller opts in with ``allow_unsafe_pickle=True``. Files that
``torch.load(weights_only=True)`` refuses (the image checkpoints pickle a yacs ``CfgNode``) are read with a
restricted unpickler: it imports nothing, calls only the globals torch's weights-only loader allows (tensor
rebuild functions, OrderedDict, dtypes, ...), and turns every other class or function the pickle names into an
:class:`InertObject` that records the arguments and state the pickle gives it as plain data.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from .safe_pickle import (InertObject, InertPickleWarning, _InertPickle, _is_data_class, _LenientPickle,  # noqa: F401
                          _inert_class)

__all__ = ["load_checkpoint", "save_checkpoint", "read_state_dict", "infer_config", "InertObject",
           "CheckpointConfigWarning", "InertPickleWarning"]

_PROBE_KEY = "transformers.0.attn.c_attn.weight"
_TEXT_ENCODER_FILE = "model_1.safetensors"
_CONFIG_ENTRY = "seqpe_config"  # .pth dict entry / safetensors metadata key holding SeqPE.config()
_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers

# SeqPE constructor arguments: read off the weights / chosen by whoever trained the encoder
_SHAPE_KEYS = ("embed_dim", "max_digits", "num_layers", "data_dim", "out_dim", "use_last_layernorm", "base")
_CHOSEN_KEYS = ("num_heads", "attn_direction", "mask_padding", "temperature", "resid_pdrop", "attn_pdrop",
                "scale_attn_weights", "layer_norm_eps", "init")
_CONFIG_KEYS = _SHAPE_KEYS + _CHOSEN_KEYS
# guesses for files that record nothing (the paper's settings; SEQPE_SPEC §2.1), each announced by a warning.
# layer_norm_eps (fixed 1e-5 in the authors' code) and init (no effect on a loaded module) are left to the
# constructor's defaults without a warning.
_GUESSES = {"attn_direction": "causal", "mask_padding": False, "temperature": 1.0, "resid_pdrop": 0.1,
            "attn_pdrop": 0.0, "scale_attn_weights": True}
_PLAIN = (bool, int, float, str, type(None))
# the authors' text runs record their settings beside the save_state folders, not in them: output_dir/pe_config.json
# (a yacs YAML dump despite the name) and output_dir/train_args.json (the CLI arguments, lower-case keys)
_TEXT_RUN_FILES = ("pe_config.json", "train_args.json")
# SEQPE_ACTIVATION_FUNCTION values (HF ACT2FN names) that compute gelu_new, the one activation SeqPE implements
_GELU_NEW_NAMES = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_accurate")


class CheckpointConfigWarning(UserWarning):
    """A setting of the loaded encoder was guessed, or an argument contradicts the file's recorded config."""


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


def _device_of(map_location) -> Optional[torch.device]:
    if isinstance(map_location, (str, torch.device)):
        return torch.device(map_location)
    return None


def _first_line(e: BaseException) -> str:
    msg = str(e)
    return next((ln for ln in msg.splitlines() if ln.strip()), type(e).__name__)


def _torch_load(path: Path, map_location, allow_unsafe_pickle: bool) -> Tuple[Any, Dict[str, Any]]:
    """torch.load(weights_only=True); if it refuses the file's pickled objects, the inert unpickler (default)
    or, only with allow_unsafe_pickle=True, the real pickle. Returns (object, {"unpickler", "inert_globals"})."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True), \
            {"unpickler": "weights_only", "inert_globals": []}
    except pickle.UnpicklingError as e:
        refused = e
    except Exception as e:  # a file that is not a torch.save archive fails with many exception types
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise ValueError(f"{path}: could not read it as a torch.save file ({type(e).__name__}: "
                         f"{_first_line(e) if str(e) else ''})") from e
    if allow_unsafe_pickle:  # the caller trusts the file: real unpickling, which runs the file's pickle code
        try:
            obj = torch.load(path, map_location=map_location, weights_only=False, pickle_module=_LenientPickle)
        except Exception as e2:
            raise ValueError(f"{path}: could not read it even with weights_only=False "
                             f"({type(e2).__name__}: {e2})") from e2
        return obj, {"unpickler": "unsafe", "inert_globals": []}
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist()):
                raise ValueError(f"{path}: a TorchScript archive, not a torch.save checkpoint; load it with "
                                 "torch.jit.load if you trust it")
    pm = _InertPickle()
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False, pickle_module=pm)
    except Exception as e2:
        raise ValueError(f"{path}: could not read it as a torch.save file ({_first_line(refused)}; the restricted "
                         f"unpickler: {type(e2).__name__}: {_first_line(e2)}). Pass allow_unsafe_pickle=True "
                         "to unpickle it for real (this runs code from the file) only if you trust it.") from e2
    inert = sorted(pm.inert_globals)
    odd = [g for g in inert if not _is_data_class(g)]
    if odd:
        warnings.warn(
            f"{path}: the file pickles {', '.join(odd)}, which torch.load(weights_only=True) refuses. They were "
            "read as inert data (seqpe_kernels.safe_pickle.InertObject): nothing was imported or called. The "
            "tensors are unaffected. Pass allow_unsafe_pickle=True to unpickle them for real (this runs code "
            "from the file) only if you trust it.", InertPickleWarning, stacklevel=4)
    return obj, {"unpickler": "inert", "inert_globals": inert}


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


_PREFIX_RE = re.compile("|".join(re.escape(p) for p in _PREFIXES))
_MAX_WRAPPERS = 8  # DDP around torch.compile around DDP ...: a few; more is a crafted file (and was quadratic)


def _strip_prefix(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop the wrapper prefixes (``module.``, ``_orig_mod.``, in any nesting) that every key shares, in one pass
    per key."""
    common = None
    for k in sd:
        chain, i = [], 0
        while len(chain) <= _MAX_WRAPPERS and (m := _PREFIX_RE.match(k, i)):
            chain.append(m.group())
            i = m.end()
        if common is None:
            common = chain
        else:
            n = 0
            while n < min(len(common), len(chain)) and common[n] == chain[n]:
                n += 1
            common = common[:n]
        if not common:
            return sd
    if not common:
        return sd
    if len(common) > _MAX_WRAPPERS:
        raise ValueError(f"the state dict's keys are nested under more than {_MAX_WRAPPERS} wrapper prefixes "
                         f"({'/'.join(_PREFIXES)}): not a checkpoint of a wrapped encoder")
    cut = sum(map(len, common))
    return {k[cut:]: v for k, v in sd.items()}


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


def _check_recorded_config(cfg, where) -> Optional[Dict[str, Any]]:
    """A recorded ``seqpe_config``: a dict of plain values; unknown keys are dropped with a warning."""
    if cfg is None:
        return None
    if not isinstance(cfg, Mapping) or not all(isinstance(k, str) for k in cfg):
        raise ValueError(f"{where}: the recorded {_CONFIG_ENTRY} is not a dict of settings (got {type(cfg).__name__})")
    bad = [k for k, v in cfg.items() if not isinstance(v, _PLAIN)]
    if bad:
        raise ValueError(f"{where}: the recorded {_CONFIG_ENTRY} has values that are not plain numbers, strings "
                         f"or booleans: {bad}")
    unknown = [k for k in cfg if k not in _CONFIG_KEYS]
    if unknown:
        warnings.warn(f"{where}: the recorded {_CONFIG_ENTRY} has settings this version does not know, ignored: "
                      f"{unknown}", CheckpointConfigWarning, stacklevel=4)
    return {k: v for k, v in cfg.items() if k in _CONFIG_KEYS}


# ----------------------------------------------------------------------------------------------- reading
def read_state_dict(path, map_location="cpu", allow_unsafe_pickle: bool = False
                    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read the encoder's state dict from any supported container.

    Returns ``(state_dict, info)``; ``info`` has ``format`` ("image-pth", "train-pth", "state-dict-pth",
    "safetensors", "text-dir"), ``file`` (the file actually read), ``seqpe_config`` (the recorded encoder
    configuration, or None), ``config`` (the run config of an image checkpoint or a train file, or None),
    ``unpickler`` ("weights_only", "inert", "unsafe" or None for safetensors), ``inert_globals`` (names the
    pickle referred to that were read as :class:`InertObject`) and ``config_files`` (for a text save_state folder
    or its ``model_1.safetensors``: the authors' run files read into ``config``, see :func:`_text_run_config`). ``allow_unsafe_pickle``: see
    :func:`load_checkpoint`.
    """
    path = Path(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint file or directory: {path}")
    info: Dict[str, Any] = {"format": None, "file": path, "config": None, "config_files": [], "seqpe_config": None,
                            "unpickler": None, "inert_globals": []}
    if path.is_dir():
        f = path / _TEXT_ENCODER_FILE
        if not f.is_file():
            found = sorted(p.name for p in path.iterdir())
            raise ValueError(f"{path} is a directory but has no {_TEXT_ENCODER_FILE} (the SeqPE encoder of an "
                             f"accelerate save_state directory); files found: {_short_list(found)}")
        info.update(format="text-dir", file=f)
        path = f
    if path.name == _TEXT_ENCODER_FILE:
        info["config"], info["config_files"] = _text_run_config(path.parent)
    if path.suffix == ".safetensors":
        st = _require_safetensors()
        from safetensors import safe_open

        dev = _device_of(map_location)
        try:
            sd = st.load_file(str(path), device=str(dev) if dev is not None else "cpu")
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
        except Exception as e:  # safetensors raises its own error type on a corrupt header
            raise ValueError(f"{path}: could not read it as a safetensors file ({e})") from e
        if _CONFIG_ENTRY in meta:
            try:
                recorded = json.loads(meta[_CONFIG_ENTRY])
            except ValueError as e:
                raise ValueError(f"{path}: the '{_CONFIG_ENTRY}' metadata is not valid JSON ({e})") from e
            info["seqpe_config"] = _check_recorded_config(recorded, path)
        info["format"] = info["format"] or "safetensors"
        what = "no encoder keys"
    else:
        obj, how = _torch_load(path, map_location, allow_unsafe_pickle)
        info.update(how)
        container = isinstance(obj, Mapping) and not _is_state_dict(obj)
        if container and "pe_model" in obj:
            sd, fmt = obj["pe_model"], "image-pth"
        elif container and "encoder" in obj and isinstance(obj["encoder"], Mapping):
            sd, fmt = obj["encoder"], "train-pth"
        elif _is_state_dict(obj):
            sd, fmt = obj, "state-dict-pth"
        elif isinstance(obj, Mapping):
            raise _no_encoder_error(path, "no key 'pe_model' (image checkpoint) or 'encoder' (seqpe-kernels "
                                          "train --save)", obj.keys())
        else:
            raise ValueError(f"{path}: expected a dict (an image checkpoint with 'pe_model', a train file with "
                             f"'encoder', or a state dict), got {type(obj).__name__}")
        if fmt != "state-dict-pth":
            entry = "pe_model" if fmt == "image-pth" else "encoder"
            if not _is_state_dict(sd):
                raise ValueError(f"{path}: the '{entry}' entry is not a state dict of tensors "
                                 f"(got {type(sd).__name__})")
            info.update(config=obj.get("config"), seqpe_config=_check_recorded_config(obj.get(_CONFIG_ENTRY), path))
        info["format"] = fmt
        what = "no key 'pe_model'"
    sd = _strip_prefix(dict(sd))
    if _PROBE_KEY not in sd:
        raise _no_encoder_error(path, what, sd.keys())
    return sd, info


def _scalar(v: str):
    """A plain YAML scalar as yacs dumps it (true / false / null / numbers / strings); None for anything else."""
    if v in ("", "~", "null"):
        return None
    if v in ("true", "false"):
        return v == "true"
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        return v[1:-1]
    if re.fullmatch(r"[-+]?\d+", v):
        return int(v)
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", v):
        return float(v)
    return None if v[0] in "{[&*|>!%@`" else v


def _text_run_config(folder: Path) -> Tuple[Optional[Dict[str, Any]], list]:
    """The authors' text run settings for a ``save_state`` folder (``step_N/``, ``best_model/``): ``pe_config.json``
    and ``train_args.json`` in the folder, else in the run folder above it. Returns ({KEY: value}, files read):
    upper-case keys (train_args' lower-case ones upper-cased, so both read as the image config's yacs keys),
    pe_config's values first. Only top-level plain values; unreadable or oversized files are passed over."""
    for where in (folder, folder.parent):
        found: Dict[str, Any] = {}
        files = []
        for name in _TEXT_RUN_FILES:
            f = where / name
            try:
                if not f.is_file() or f.stat().st_size > (1 << 20):
                    continue
                text = f.read_text(errors="replace")
            except OSError:
                continue
            try:
                data = json.loads(text)
            except ValueError:  # pe_config.json: YAML
                data = {m.group(1): _scalar(m.group(2)) for m in
                        (re.match(r"([A-Za-z_][A-Za-z0-9_]*):[ \t]*(.*?)[ \t]*$", ln) for ln in text.splitlines()) if m}
            if not isinstance(data, dict):
                continue
            for k, v in data.items():
                if isinstance(k, str) and isinstance(v, _PLAIN):
                    found.setdefault(k.upper(), v)
            files.append(f)
        if files:
            return found, files
    return None, []


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


def _lookup(cfg, key):
    """``cfg[key]`` / ``cfg.key`` of a run config (dict, CfgNode, inert object), also one level down
    (``cfg.MODEL.key``); None when absent. Only plain values count."""
    def get(c):
        if isinstance(c, InertObject):
            return c[key] if key in c else c._state_dict().get(key)
        if isinstance(c, Mapping):
            return c.get(key)
        return None
    if cfg is None:
        return None
    try:
        v = get(cfg)
        if v is None and isinstance(cfg, Mapping):
            v = next((get(c) for c in cfg.values() if isinstance(c, Mapping) and get(c) is not None), None)
    except Exception:  # an exotic object: no hints
        return None
    return v if isinstance(v, _PLAIN) else None


def _run_config_hints(info, shapes: Dict[str, Any]) -> Tuple[Dict[str, Any], str]:
    """Encoder settings recorded in an older file's run config: the image checkpoint's yacs config, the authors'
    text run files (:func:`_text_run_config`), or the ``config`` of a train file written before ``seqpe_config``
    existed. ``shapes``: what the weights say (:func:`infer_config`). Raises for an activation SeqPE does not
    compute; a run config whose sizes contradict the weights is not this checkpoint's: warned about, not used."""
    run, embed_dim = info["config"], shapes["embed_dim"]
    hints: Dict[str, Any] = {}
    if info["format"] == "train-pth" and isinstance(run, Mapping) and "pe_heads" in run:
        # what seqpe_kernels.training.train._build passed to FusedSeqPE (direction, padding, attn dropout: defaults)
        hints = dict(num_heads=run.get("pe_heads"), temperature=run.get("pe_temperature", 1.0),
                     resid_pdrop=run.get("dropout"), attn_pdrop=0.0, attn_direction="causal", mask_padding=False,
                     scale_attn_weights=True, init="image" if run.get("task") == "vit" else "text")
        return {k: v for k, v in hints.items() if isinstance(v, _PLAIN) and v is not None}, \
            "the train run's 'config' entry"
    files = info.get("config_files") or []
    source = (f"the run's {' and '.join(str(f) for f in files)}" if files else "the checkpoint's pickled run config")
    sizes = [(k, _lookup(run, k), shapes[name]) for k, name in (("PE_EMBED_DIM", "embed_dim"),
             ("SEQPE_LAYER_NUM", "num_layers"), ("SEQPE_MAX_DIGITS", "max_digits"), ("PE_DATA_DIM", "data_dim"))]
    wrong = [f"{k}={v!r} (weights: {w!r})" for k, v, w in sizes
             if isinstance(v, int) and not isinstance(v, bool) and v > 0 and v != w]
    if wrong:
        warnings.warn(f"{info['file']}: {source} does not describe these weights ({', '.join(wrong)}), so none of "
                      "its settings are used", CheckpointConfigWarning, stacklevel=3)
        return {}, source
    act = _lookup(run, "SEQPE_ACTIVATION_FUNCTION")
    if isinstance(act, str) and act not in _GELU_NEW_NAMES:
        raise ValueError(f"{info['file']}: {source} records SEQPE_ACTIVATION_FUNCTION={act!r}; SeqPE computes "
                         f"gelu_new (the authors' default; also {', '.join(_GELU_NEW_NAMES[1:])}), so this encoder "
                         "cannot be loaded without computing something else")
    if info["format"] == "image-pth" and run is not None:  # the authors' image checkpoint (its run config beside
        hints["init"] = "image"                              # the weights): truncated-normal init
    heads = _lookup(run, "NUM_ATTENTION_HEADS")
    if isinstance(heads, int) and not isinstance(heads, bool):
        if heads == -1 and embed_dim // 64 >= 1:  # the authors' -1 means embed_dim // 64
            heads = embed_dim // 64
        if heads > 0:
            hints["num_heads"] = heads
    def prob(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1

    for key, name, ok in (("SEQPE_ATTN_DIRECTION", "attn_direction", lambda v: v in ("causal", "bi")),
                          ("SEQPE_MASK_PADDING", "mask_padding", lambda v: isinstance(v, bool)),
                          ("SEQPE_SCALE_ATTN_WEIGHTS", "scale_attn_weights", lambda v: isinstance(v, bool)),
                          ("SEQPE_RESID_PDROP", "resid_pdrop", prob),
                          ("SEQPE_ATTN_PDROP", "attn_pdrop", prob),
                          ("SEQPE_TEMPERATURE", "temperature",
                           lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0)):
        v = _lookup(run, key)
        if v is not None and ok(v):
            hints[name] = v
    return hints, source


def _expected_shapes(module_cls, cfg) -> Dict[str, tuple]:
    """{key: shape} of ``module_cls(**cfg)``'s state dict, built on the meta device (nothing allocated) with one
    transformer block whose keys stand for every block's: a file's sizes are checked before they are allocated,
    and a crafted block count costs no time."""
    n = cfg.get("num_layers")
    one = type(n) is int and n > 1
    with torch.device("meta"):
        probe = module_cls(**({**cfg, "num_layers": 1} if one else cfg))
    out: Dict[str, tuple] = {}
    for k, t in probe.state_dict().items():
        if one and k.startswith("transformers.0."):
            for i in range(n):
                out[f"transformers.{i}.{k[len('transformers.0.'):]}"] = tuple(t.shape)
        else:
            out[k] = tuple(t.shape)
    return out


def _describe_mismatch(expected: Mapping[str, tuple], sd: Mapping[str, torch.Tensor], path, cfg,
                       name: str) -> Optional[str]:
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = []
    for k in expected:
        if k in sd and tuple(sd[k].shape) != expected[k]:
            a, b = list(sd[k].shape), list(expected[k])
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
    return (f"{path}: the weights do not fit {name}({cfg}): " + "; ".join(parts))


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    return a == b


# ----------------------------------------------------------------------------------------------- public
def load_checkpoint(path, num_heads: Optional[int] = None, attn_direction: Optional[str] = None,
                    mask_padding: Optional[bool] = None, module_cls=None, map_location="cpu", *,
                    allow_unsafe_pickle: bool = False, **overrides):
    """Build a SeqPE encoder from a checkpoint (SEQPE_SPEC §3.3) and load it strictly.

    Args:
        path: image ``.pth`` (``pe_model`` entry), ``seqpe-kernels train --save`` file (``encoder`` entry),
            bare state-dict ``.pth``, ``.safetensors`` file, or a text accelerate directory containing
            ``model_1.safetensors``.
        num_heads, attn_direction, mask_padding, **overrides: constructor arguments (``temperature``,
            ``resid_pdrop``, ``attn_pdrop``, ``scale_attn_weights``, ``layer_norm_eps``, ``init``, FusedSeqPE's
            ``backend`` ...). The architecture comes from the tensor shapes; the rest from these arguments,
            else from the configuration the file records (``seqpe_config``, written by :func:`save_checkpoint`
            and ``train --save``; for older files the train run's config or the image config's / text run's
            (``pe_config.json`` / ``train_args.json`` in or above the save_state folder) ``NUM_ATTENTION_HEADS`` /
            ``SEQPE_ATTN_DIRECTION`` / ``SEQPE_MASK_PADDING`` / ``SEQPE_TEMPERATURE`` ...), else a guess announced by a :class:`CheckpointConfigWarning` that names the
            argument to pass: ``num_heads = embed_dim // 64`` as the authors' CLI defaults (12 for the text
            config, 6 for the image config), the paper's causal direction, no pad masking, temperature 1,
            ``resid_pdrop`` 0.1, ``attn_pdrop`` 0, scaled attention. An argument that contradicts the file's
            record wins, with a warning naming both values.
        module_cls: class to instantiate (default :class:`seqpe_kernels.reference.SeqPE`; e.g. FusedSeqPE).
        map_location: where tensors are loaded; a device (string or torch.device) also moves the module there.
        allow_unsafe_pickle: files that ``torch.load(weights_only=True)`` refuses (the image checkpoints pickle
            a yacs CfgNode) are read by default with a restricted unpickler that imports and runs nothing
            (unknown classes and functions become :class:`InertObject` data; an :class:`InertPickleWarning`
            names any other than a CfgNode / Namespace / numpy value). True unpickles such files for real
            with ``weights_only=False``, which runs code from the file: only for files you trust.

    Raises:
        ValueError naming the missing/unexpected keys and shape mismatches when the weights do not fit, or
        when the file cannot be read.
    """
    if module_cls is None:
        from .reference import SeqPE as module_cls
    sd, info = read_state_dict(path, map_location, allow_unsafe_pickle)
    where = info["file"]
    cfg = infer_config(sd)

    recorded, source = info["seqpe_config"], f"its {_CONFIG_ENTRY}"
    if recorded is None:
        recorded, source = _run_config_hints(info, cfg)
    else:
        recorded = dict(recorded)
        if recorded.get("out_dim") in (None, -1):
            recorded["out_dim"] = recorded.get("embed_dim", cfg["embed_dim"])
        wrong = [f"{k}={recorded[k]!r} (weights: {cfg[k]!r})" for k in _SHAPE_KEYS
                 if k in recorded and not _same(recorded[k], cfg[k])]
        if wrong:
            raise ValueError(f"{where}: the file's {_CONFIG_ENTRY} contradicts its own weights: {', '.join(wrong)}")

    explicit = dict(overrides)
    for k, v in (("num_heads", num_heads), ("attn_direction", attn_direction), ("mask_padding", mask_padding)):
        if v is not None:
            explicit[k] = v
    conflicts = [f"{k}={explicit[k]!r} was passed, the file records {k}={recorded[k]!r}"
                 for k in _CHOSEN_KEYS if k in explicit and k in recorded and not _same(explicit[k], recorded[k])]
    if conflicts:
        warnings.warn(f"{where}: arguments contradict the configuration the file records ({source}): "
                      f"{'; '.join(conflicts)}. The passed values are used; leave them out to load the encoder as "
                      "it was saved.", CheckpointConfigWarning, stacklevel=2)
    for k in _CHOSEN_KEYS:
        if k in recorded:
            cfg[k] = recorded[k]
    cfg.update(explicit)

    guessed = []
    if "num_heads" not in cfg:
        heads = cfg["embed_dim"] // 64
        if heads < 1 or cfg["embed_dim"] % heads:
            raise ValueError(f"{where}: the file does not record the number of heads and the authors' default "
                             f"embed_dim // 64 does not apply to embed_dim={cfg['embed_dim']}; pass num_heads=")
        cfg["num_heads"] = heads
        guessed.append(f"num_heads={heads} (embed_dim // 64, the authors' CLI default)")
    for k, v in _GUESSES.items():
        if k not in cfg:
            cfg[k] = v
            guessed.append(f"{k}={v!r}")
    if guessed:
        names = ", ".join(g.split("=")[0] + "=..." for g in guessed)
        warnings.warn(f"{where}: the file does not record these encoder settings, so they are guesses (the paper's "
                      f"settings): {', '.join(guessed)}. If the encoder was trained otherwise its outputs are wrong: "
                      f"pass {names} to load_checkpoint. (Files written by save_checkpoint or seqpe-kernels train "
                      "--save record them.)", CheckpointConfigWarning, stacklevel=2)
    for k, t in sd.items():  # an expanded view (stride 0) would be materialised at its full size by the load
        if t.numel() * t.element_size() > t.untyped_storage().nbytes():
            raise ValueError(f"{where}: {k} has {t.numel()} elements backed by {t.untyped_storage().nbytes()} bytes "
                             f"(shape {list(t.shape)}, strides {list(t.stride())}: an expanded view, not weights)")
    name = getattr(module_cls, "__name__", module_cls)
    try:
        expected = _expected_shapes(module_cls, cfg)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: cannot build {name} with the configuration {cfg}: {e}") from e
    problem = _describe_mismatch(expected, sd, where, cfg, name)
    if problem:
        raise ValueError(problem)
    try:
        module = module_cls(**cfg)
    except (RuntimeError, MemoryError) as e:  # (the file's tensors are this size too: they were loaded)
        raise ValueError(f"{where}: cannot allocate {name} with the configuration {cfg}: {e}") from e
    fdt = {t.dtype for t in sd.values() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    if torch.float64 in fdt:  # fp64 tensors load into an fp64 module (into fp32 they would be rounded silently);
        module = module.to(torch.float64)  # fp16 / bf16 files load exactly into the fp32 module
        if len(fdt) > 1:
            warnings.warn(f"{where}: the file mixes {', '.join(sorted(str(d) for d in fdt))} tensors; the encoder "
                          "is loaded in float64, so that none is rounded", CheckpointConfigWarning, stacklevel=2)
    module.load_state_dict(sd, strict=True)
    dev = _device_of(map_location)
    if dev is not None:
        module = module.to(dev)
    return module


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The encoder inside DDP (``.module``) / torch.compile (``._orig_mod``) wrappers."""
    while not hasattr(module, "config"):
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            break
        module = inner
    return module


def encoder_config(module: torch.nn.Module) -> Optional[Dict[str, Any]]:
    """``module.config()`` as plain Python values (what the checkpoints record), or None if it has none."""
    module = _unwrap(module)
    if not callable(getattr(module, "config", None)):
        from .layout import _check_layout, _layout
        from .patch import _inner, module_config

        m = _inner(module)
        try:  # the authors' module (patched or not): its configuration is in its modules' attributes
            layout = _layout(m)
            if _check_layout(m, layout):
                return None
            return module_config(m, layout)
        except (ValueError, AttributeError):  # (PatchError is a ValueError) not an encoder this package reads, or
            return None                       # one with no single configuration: nothing recorded (the load asks)
    cfg = {k: v for k, v in module.config().items()}
    bad = {k: v for k, v in cfg.items() if not isinstance(v, _PLAIN)}
    if bad:
        raise ValueError(f"the encoder's config() has values that are not plain numbers, strings or booleans: {bad}")
    return cfg


def save_checkpoint(module: torch.nn.Module, path) -> Path:
    """Write ``module``'s state dict and configuration in one of the authors' layouts, chosen by ``path``:

    * ``*.safetensors``: a safetensors file of the state dict, ``seqpe_config`` JSON in its metadata;
    * no suffix (a directory, created if needed): ``<dir>/model_1.safetensors`` as accelerate writes it, with
      the same metadata;
    * ``*.pth`` / ``*.pt`` / ``*.bin``: an image-style ``torch.save({"pe_model": state_dict,
      "seqpe_config": {...}})`` (plain values: ``torch.load(weights_only=True)`` reads it).

    The configuration is ``module.config()`` (every constructor argument of SeqPE), so :func:`load_checkpoint`
    rebuilds the same module without guessing. Returns the path of the file written.
    """
    path = Path(os.fspath(path))
    inner = _unwrap(module)
    config = encoder_config(inner)
    if config is None:
        warnings.warn(f"save_checkpoint: {type(inner).__name__} has no config(); {path} records no encoder "
                      "settings, so loading it will guess them", CheckpointConfigWarning, stacklevel=2)
    sd = {k: v.detach().contiguous().cpu() for k, v in inner.state_dict().items()}
    if path.suffix == "" or path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        path = path / _TEXT_ENCODER_FILE
    if path.suffix == ".safetensors":
        st = _require_safetensors()
        meta = {"format": "pt"}
        if config is not None:
            meta[_CONFIG_ENTRY] = json.dumps(config, sort_keys=True)
        st.save_file(sd, str(path), metadata=meta)
    elif path.suffix in (".pth", ".pt", ".bin"):
        obj: Dict[str, Any] = {"pe_model": sd}
        if config is not None:
            obj[_CONFIG_ENTRY] = config
        torch.save(obj, path)
    else:
        raise ValueError(f"save_checkpoint: unknown suffix {path.suffix!r}; use .pth/.pt/.bin (image-style "
                         "{'pe_model': ...}), .safetensors, or a directory name (text-style model_1.safetensors)")
    return path
