"""After training: the extrapolation evaluation (LM perplexity at multiples of the training length, ViT accuracy
on larger grids, the encoder run once per length in eval mode), its table, the JSON and the plot of a run."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
from torch import nn

from .config import TrainConfig
from .datasets import SYNTHETIC_CLASSES, ImageFolderData, synthetic_images
@torch.no_grad()
def evaluate(cfg: TrainConfig, enc: nn.Module, model: nn.Module, data, device: torch.device) -> dict:
    """Extrapolation: the encoder in eval mode, run once per length / grid, its table reused for every batch."""
    from .samplers import grid_positions

    was = enc.training, model.training
    enc.eval()
    model.eval()
    rows = []
    try:
        if cfg.task == "lm":
            N = cfg.block_size
            for s in cfg.eval_scales:
                L = max(2, int(round(s * N)))
                row = {"scale": float(s), "length": L, "value": None, "tokens": 0}
                # an encoder with a position limit (a learned table's rows; SeqPE's digits) cannot encode past it;
                # RoPE, ALiBi, sinusoidal and none have none
                limit = getattr(enc, "position_limit", None)
                if limit is None and getattr(enc, "max_digits", None) is not None:
                    limit = getattr(enc, "base", 10) ** enc.max_digits
                if limit is not None and L > limit:
                    row["note"] = f"length {L} exceeds the {cfg.pe} encoder's {limit} positions"
                    rows.append(row)
                    continue
                toks = data.eval
                n_seq = min(len(toks) // L, max(1, cfg.eval_tokens // L))
                if n_seq == 0:  # (held-out perplexity is never measured on the training text)
                    row["note"] = f"held-out text ({len(toks)} tokens) shorter than the length {L}"
                    rows.append(row)
                    continue
                seqs = torch.from_numpy(toks[:n_seq * L].reshape(n_seq, L)).to(device)  # one copy per length
                pe = enc(torch.arange(L, device=device)).view(1, L, -1)  # once per length
                # summed on the device in fp64 (the same products and sums as Python floats) and read once per
                # length: a read per batch is a host-device sync per batch
                nll, cnt = torch.zeros((), dtype=torch.float64, device=device), 0
                for i in range(0, n_seq, 8):
                    ids = seqs[i:i + 8]
                    _, loss = model(ids, pe=pe, labels=ids)
                    k = ids.shape[0] * (L - 1)
                    nll = nll + loss.double() * k
                    cnt += k
                mean_nll = nll.item() / cnt  # exp overflows past ~709 nats (a diverged model): report inf
                row.update(value=math.exp(mean_nll) if mean_nll < 700 else float("inf"), tokens=cnt)
                rows.append(row)
            return {"metric": "perplexity", "train_length": N, "rows": rows}
        g = cfg.img_size // cfg.patch_size
        for s in cfg.eval_scales:
            grid = max(2, int(round(s * g)))
            size = grid * cfg.patch_size
            limit = getattr(enc, "position_limit", None)
            if limit is not None and grid > limit:
                rows.append({"scale": float(s), "grid": grid, "img_size": size, "value": None, "samples": 0,
                             "note": f"grid {grid} exceeds the {cfg.pe} table ({limit} per axis)"})
                continue
            if data is None:
                x, lab = synthetic_images(np.random.default_rng([cfg.seed, 31337, grid]), cfg.eval_samples, grid,
                                          cfg.patch_size)
            elif not data.eval_files:  # (held-out accuracy is never measured on the training images)
                rows.append({"scale": float(s), "grid": grid, "img_size": size, "value": None, "samples": 0,
                             "note": "the image folder has no held-out images"})
                continue
            else:
                x, lab = ImageFolderData.load(data.eval_files, size)
            pe = enc(torch.from_numpy(grid_positions(0, 0, grid, grid)).to(device)).view(1, grid * grid, -1)
            # the images copied once per grid and the hits counted on the device, read once: a copy or read per batch
            # is a host-device sync per batch
            x, lab_d = x.to(device), lab.to(device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            for i in range(0, len(lab), 64):
                logits = model(x[i:i + 64], pe=pe)
                correct += (logits.argmax(-1) == lab_d[i:i + 64]).sum()
            rows.append({"scale": float(s), "grid": grid, "img_size": size, "value": int(correct) / len(lab),
                         "samples": len(lab)})
        return {"metric": "accuracy", "train_grid": g, "chance": 1.0 / model.config.num_classes,
                "position_blind_ceiling": 2.0 / SYNTHETIC_CLASSES if data is None else None, "rows": rows}
    finally:
        enc.train(was[0])
        model.train(was[1])


def format_eval(ev: dict) -> str:
    if ev["metric"] == "perplexity":
        lines = [f"Extrapolation: LM perplexity on held-out text (trained on N={ev['train_length']} tokens, "
                 f"positions 0..{ev['train_length'] - 1}; encoder run once per length)",
                 f"  {'scale':>6} {'length':>7} {'tokens':>7} {'perplexity':>11}"]
        for r in ev["rows"]:
            v = f"{r['value']:11.3f}" if r["value"] is not None else f"{'n/a':>11}"
            lines.append(f"  {r['scale']:5.1f}x {r['length']:7d} {r['tokens']:7d} {v}" +
                         (f"  ({r['note']})" if r.get("note") else ""))
    else:
        g = ev["train_grid"]
        blind = ev.get("position_blind_ceiling")
        lines = [f"Extrapolation: ViT accuracy on larger patch grids (trained on a {g}x{g} grid; chance "
                 f"{ev['chance']:.3f}" + (f", position-blind ceiling {blind:.3f}" if blind else "") +
                 "; encoder run once per grid)",
                 f"  {'scale':>6} {'grid':>7} {'pixels':>7} {'samples':>8} {'accuracy':>9}"]
        for r in ev["rows"]:
            v = f"{r['value']:9.3f}" if r["value"] is not None else f"{'n/a':>9}"
            lines.append(f"  {r['scale']:5.1f}x {r['grid']:>3d}x{r['grid']:<3d} {r['img_size']:7d} "
                         f"{r['samples']:8d} {v}" + (f"  ({r['note']})" if r.get("note") else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- outputs
def write_json(result: dict, path: str):
    keys = ("losses", "main", "contrastive", "transfer", "config", "eval", "checks", "time_s")
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump({k: result[k] for k in keys}, f, indent=1)


def plot(result: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    steps = np.arange(1, len(result["losses"]) + 1)
    for key, style in (("losses", "-"), ("main", "--"), ("contrastive", ":"), ("transfer", "-.")):
        v = np.array([np.nan if x is None else x for x in result[key]], dtype=float)
        if np.isfinite(v).any():
            ax.plot(steps, v, style, label="total" if key == "losses" else key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{cfg['task']} training ({cfg['encoder_backend']}, {cfg['world_size']} rank(s))")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1]
    ev = result.get("eval")
    if ev:
        rows = [r for r in ev["rows"] if r["value"] is not None]
        xs = [r["scale"] for r in rows]
        ax.plot(xs, [r["value"] for r in rows], "o-")
        ax.set_xlabel("evaluation length / training length" if ev["metric"] == "perplexity"
                      else "evaluation grid / training grid")
        ax.set_ylabel(ev["metric"])
        if ev["metric"] == "perplexity":
            ax.set_xscale("log", base=2)
            ax.set_title(f"extrapolation (trained on {ev['train_length']} tokens)")
        else:
            ax.axhline(ev["chance"], color="gray", ls=":", label="chance")
            if ev.get("position_blind_ceiling"):
                ax.axhline(ev["position_blind_ceiling"], color="gray", ls="--", label="position-blind ceiling")
            ax.set_ylim(0, 1)
            ax.legend()
            ax.set_title(f"extrapolation (trained on a {ev['train_grid']}x{ev['train_grid']} grid)")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}x" for x in xs])
        ax.grid(alpha=0.3)
    else:
        ax.axis("off")
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


