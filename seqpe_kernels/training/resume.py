"""``train --save`` / ``--resume``: a run's file (the encoder with its configuration, which
``seqpe_kernels.load_checkpoint`` reads; the model, AdamW, sampler and RNG states, all readable with
``torch.load(weights_only=True)``), and continuing it exactly as an uninterrupted run would."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from .config import TrainConfig
# config fields a resumed run must share with the saved one (they define the model or the loss); fields left
# at None take the saved run's values, except these, which are per invocation
_RESUME_MUST_MATCH = ("task", "pe", "model_dim", "model_layers", "model_heads", "pe_dim", "pe_heads", "pe_layers",
                      "pe_temperature", "pe_method", "pe_qk", "max_position", "patch_size", "dropout",
                      "contrastive_weight", "transfer_weight", "transfer_beta", "pe_warmup_steps", "shift_rate",
                      "shift_pool", "pe_main_batch_size", "weight_decay", "clip", "block_size", "img_size")
_RESUME_NOT_FILLED = ("steps", "device", "resume", "cuda_graphs", "given", "do_eval", "progress")


def _to_saveable(x):
    """numpy arrays -> tensors (a sampler's state), so torch.load(weights_only=True) reads the file."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x.copy())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, dict):
        return {k: _to_saveable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_saveable(v) for v in x)
    return x


def _from_saved(x):
    if isinstance(x, torch.Tensor):
        return x.numpy()
    if isinstance(x, dict):
        return {k: _from_saved(v) for k, v in x.items()}
    return x


def _train_state(step: int, sched, data_rng, streams, first_stream: int, device, distributed: bool) -> dict:
    """Everything beyond the weights and the optimizer that the next step depends on: the step count, the
    regulariser warm-up, the data RNG, every position stream's samplers and every rank's torch RNG."""
    local = {"streams": {first_stream + i: {name: (_to_saveable(getattr(s, name).state_dict())
                                                   if getattr(s, name) is not None else None)
                                            for name in ("main", "contrastive", "transfer")}
                         for i, s in enumerate(streams)},
             "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state(device).cpu() if device.type == "cuda" else None}
    ranks = [local]
    if distributed:
        import torch.distributed as dist

        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, local)
    return {"step": step, "pe_weight_scheduler": sched.state_dict(),
            "data_rng": _to_saveable(data_rng.bit_generator.state),
            "streams": {k: v for r in ranks for k, v in r["streams"].items()},
            "torch_rng": [r["torch_rng"] for r in ranks], "cuda_rng": [r["cuda_rng"] for r in ranks]}


def save_run(result: dict, path: str) -> None:
    """Write a ``train --save`` file: ``encoder`` (state dict) with ``seqpe_config`` (its full constructor
    configuration, so :func:`seqpe_kernels.load_checkpoint` rebuilds it without guessing), ``model``, ``config``
    (the run's settings), ``optimizer`` and ``train_state`` (step, warm-up, sampler and RNG states), all plain
    data that ``torch.load(weights_only=True)`` reads. ``--resume`` continues from it."""
    from ..checkpoint import encoder_config

    obj = {"encoder": result["encoder"].state_dict(), "seqpe_config": encoder_config(result["encoder"]),
           "model": result["model"].state_dict(), "config": result["config"]}
    if result.get("optimizer") is not None:
        obj["optimizer"] = result["optimizer"].state_dict()
    if result.get("train_state") is not None:
        obj["train_state"] = result["train_state"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # output_path() allows new folders
    torch.save(obj, path)


def _read_resume(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--resume {path}: not a file written by seqpe-kernels train --save "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    need = ("encoder", "model", "config")
    if not isinstance(obj, dict) or any(k not in obj for k in need) or not isinstance(obj["config"], dict):
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"--resume {path}: not a file written by seqpe-kernels train --save (needs the entries "
                         f"{list(need)}; found {keys})")
    obj["path"] = path
    return obj


def _resume_config(cfg: TrainConfig, resume: dict) -> TrainConfig:
    """``cfg`` with every field not given (``cfg.given``; in code: left at None) taken from the saved run's
    config: a resumed run continues with the saved run's backend, seed, learning rates, streams, ..."""
    saved, d = resume["config"], cfg.to_dict()
    given = cfg.given
    for f in dataclasses.fields(TrainConfig):
        not_given = d.get(f.name) is None or (given is not None and f.name not in given)
        if f.name not in _RESUME_NOT_FILLED and not_given and saved.get(f.name) is not None:
            d[f.name] = saved[f.name]
    return TrainConfig(**d)


def _apply_given_lrs(opt, groups_now, cfg: TrainConfig, saved: dict, log) -> None:
    """Learning rates given for the resumed run replace the ones the loaded AdamW state carries (its
    param_groups keep the saved run's): each group takes the lr ``_param_groups`` gives it now."""
    given = cfg.given or ()
    changed = [k for k in ("lr", "pe_lr") if k in given and saved.get(k) != getattr(cfg, k)]
    if not changed:
        return
    lr_of = {id(p): g["lr"] for g in groups_now for p in g["params"]}
    for g in opt.param_groups:
        g["lr"] = lr_of.get(id(g["params"][0]), g["lr"]) if g["params"] else g["lr"]
    log("  learning rates from this run's flags: " + ", ".join(f"{k} {saved.get(k)} -> {getattr(cfg, k)}"
                                                                for k in changed))


def _check_resume_config(cfg: TrainConfig, resume: dict) -> None:
    saved, d = resume["config"], cfg.to_dict()
    bad = [f"{k}: saved {saved[k]!r}, this run {d[k]!r}" for k in _RESUME_MUST_MATCH
           if k in saved and saved[k] != d[k]]
    if bad:
        raise ValueError(f"--resume {resume['path']}: this run's settings differ from the saved run's "
                         f"({'; '.join(bad)}); pass the saved run's flags")


def _restore(resume: dict, enc, model, opt, sched, streams, data_rng, first_stream: int, rank: int, device, log
             ) -> int:
    """Load a ``train --save`` file's states into a freshly built run; returns the step it had reached."""
    path = resume["path"]
    saved_cfg = resume.get("seqpe_config")
    if saved_cfg is not None and saved_cfg != enc.config():
        diff = {k: (saved_cfg.get(k), v) for k, v in enc.config().items() if saved_cfg.get(k) != v}
        raise ValueError(f"--resume {path}: the saved encoder's configuration differs from this run's "
                         f"(key: (saved, this run)): {diff}")
    for name, module in (("encoder", enc), ("model", model)):
        try:
            module.load_state_dict(resume[name], strict=True)
        except RuntimeError as e:
            raise ValueError(f"--resume {path}: the saved {name} does not fit this run's: {e}") from e
    notes = []
    if resume.get("optimizer") is not None:
        try:
            opt.load_state_dict(resume["optimizer"])
        except ValueError as e:  # group sizes differ: e.g. a file from before LM encoder biases were decayed
            raise ValueError(f"--resume {path}: the saved AdamW state groups the parameters differently from this "
                             f"version (files written before the LM encoder's biases joined its weight-decay group, "
                             f"SEQPE_SPEC §8.2 item 8, cannot be continued): {e}") from e
    else:
        notes.append("no optimizer state saved: AdamW restarts")
    state = resume.get("train_state")
    if state is None:
        log(f"  resumed weights from {path} (an older file: {', '.join(notes + ['no sampler/RNG state'])})")
        return 0
    sched.load_state_dict(state["pe_weight_scheduler"])
    data_rng.bit_generator.state = state["data_rng"]
    missing = []
    for i, s in enumerate(streams):
        saved = state["streams"].get(first_stream + i)
        if saved is None:
            missing.append(first_stream + i)
            continue
        for name in ("main", "contrastive", "transfer"):
            if getattr(s, name) is not None and saved.get(name) is not None:
                getattr(s, name).load_state_dict(_from_saved(saved[name]))
    if missing:
        notes.append(f"position streams {missing} were not saved: they restart from their seeds")
    dropped = sorted(k for k in state["streams"] if not first_stream <= k < first_stream + len(streams))
    if dropped and rank == 0 and len(state["torch_rng"]) == 1:  # (a multi-rank save: other ranks hold the rest)
        notes.append(f"saved position streams {dropped} are not part of this run (--position-streams)")
    if rank < len(state["torch_rng"]):
        torch.set_rng_state(state["torch_rng"][rank])
        cuda = state["cuda_rng"][rank]
        if cuda is not None and device.type == "cuda":
            torch.cuda.set_rng_state(cuda, device)
    else:
        notes.append("no saved RNG state for this rank")
    log(f"  resumed from {path} at step {state['step']}" + (f" ({'; '.join(notes)})" if notes else ""))
    return int(state["step"])


