"""Why some seeds of the tiny SeqPE ViT never learned position (issue 15), and what fixed it.

Runs ``seqpe_kernels.training.train`` on the synthetic ViT task for several seeds under named settings and prints, per seed,
the main loss every 100 steps (mean of 50 steps; ln 4 = 1.386 is the position-blind plateau: the colour pair is
learnt, the side is a guess among 4) and the accuracy at 1x, 2x, 4x the training grid. ``--trace`` also prints,
every ``--every`` steps, how much SeqPE's output varies over the 16 training positions: the norm of its
per-channel std over positions ("spread") against the norm of its mean over positions ("common"), for the encoder
output and for the first layer's attn_mul factor P^q.

    python benchmarks/vit_learnability.py old --seeds 0-7             # before: encoder at the model's lr, 600 steps
    python benchmarks/vit_learnability.py default --seeds 0-15        # after: pe_lr 1e-4, 1000 steps (the default)
    python benchmarks/vit_learnability.py old --seeds 4 --steps 120 --trace --every 10
    python benchmarks/vit_learnability.py learned sinusoidal rope none --seeds 0-3 --steps 600

Settings (TrainConfig overrides; see SETTINGS): old, default, steps1500, lr3e-3, lr3e-4, pe_lr3e-3, pe_lr3e-4,
pe_lr1e-4, dropout0, batch128, contrastive1, attn_add, noreg, and the baselines learned, sinusoidal, rope, none.
Results of the issue-15 investigation: benchmarks/results/vit-learnability_AMD-EPYC-2core.md.
"""
import argparse
import json
import sys

import numpy as np
import torch

OLD = dict(pe_lr=1e-3, steps=600)  # the ViT defaults before issue 15 (encoder at the model's lr 1e-3)
SETTINGS = {
    "old": OLD,
    "default": {},
    "steps1500": dict(OLD, steps=1500),
    "lr3e-3": dict(OLD, lr=3e-3, pe_lr=3e-3),
    "lr3e-4": dict(OLD, lr=3e-4, pe_lr=3e-4),
    "pe_lr3e-3": dict(OLD, pe_lr=3e-3),
    "pe_lr3e-4": dict(OLD, pe_lr=3e-4),
    "pe_lr1e-4": dict(OLD, pe_lr=1e-4),
    "dropout0": dict(OLD, dropout=0.0),
    "batch128": dict(OLD, batch_size=128),
    "contrastive1": dict(OLD, contrastive_weight=1.0),
    "attn_add": dict(OLD, pe_method="attn_add"),
    "noreg": dict(OLD, contrastive_weight=0.0, transfer_weight=0.0),
    "learned": dict(pe="learned", steps=600),
    "sinusoidal": dict(pe="sinusoidal", steps=600),
    "rope": dict(pe="rope", steps=600),
    "none": dict(pe="none", steps=600),
}


def _seeds(text):
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("settings", nargs="+", choices=list(SETTINGS))
    p.add_argument("--seeds", default="0-7", help="e.g. 0-7 or 0,3,5")
    p.add_argument("--steps", type=int, default=None, help="override the setting's steps")
    p.add_argument("--extra", default="{}", help="more TrainConfig overrides as JSON")
    p.add_argument("--trace", action="store_true", help="print the encoder's spread over the training grid")
    p.add_argument("--every", type=int, default=50)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import seqpe_kernels.training.train as T
    from seqpe_kernels.training.samplers import grid_positions

    captured, trace, count = {}, [], [0]
    build = T._build

    def capture(*a, **k):
        enc, model, mcfg = build(*a, **k)
        captured.update(enc=enc, model=model)
        return enc, model, mcfg

    T._build = capture
    grid = torch.from_numpy(grid_positions(0, 0, 4, 4))

    @torch.no_grad()
    def spread():
        enc, model = captured["enc"], captured["model"]
        was = enc.training
        enc.eval()  # no dropout: draws no random numbers, so the run is the same with and without --trace
        pe = enc(grid).float()
        enc.train(was)
        if pe.shape[-1] == 0:
            return [0.0, 0.0, 0.0, 0.0]
        pq = model.pe_qk.projs[0](pe) if getattr(model.pe_qk, "projs", None) is not None else pe
        return [float(x.std(0).norm()) for x in (pe, pq)] + [float(x.mean(0).norm()) for x in (pe, pq)]

    step = torch.optim.AdamW.step

    def traced(self, *a, **k):
        if args.trace and count[0] == 0:
            trace.append((0, *spread()))
        out = step(self, *a, **k)
        count[0] += 1
        if args.trace and count[0] % args.every == 0:
            trace.append((count[0], *spread()))
        return out

    torch.optim.AdamW.step = traced
    for name in args.settings:
        kw = dict(SETTINGS[name], **json.loads(args.extra))
        if args.steps:
            kw["steps"] = args.steps
        for seed in _seeds(args.seeds):
            count[0] = 0
            trace.clear()
            cfg = T.TrainConfig(task="vit", seed=seed, progress=False, eval_scales=(1.0, 2.0, 4.0), **kw)
            r = T.train(cfg, log=lambda *a, **k: None)
            m = np.array(r["main"])
            curve = " ".join(f"{m[i:i + 50].mean():.2f}" for i in range(0, len(m), 100))
            acc = " ".join(f"{row['value']:.3f}" for row in r["eval"]["rows"])
            print(f"{name:<12} seed {seed:2d}: main loss / 100 steps [{curve}]  accuracy 1x 2x 4x: {acc}", flush=True)
            for st, ps, qs, pm, qm in trace:
                ratio = (lambda a, b: f"{a / b:.3f}" if b else "n/a")  # NoPE has no output
                print(f"    step {st:5d}  main {m[max(0, st - args.every):max(st, 1)].mean():.3f}  "
                      f"PE spread {ps:.3f} common {pm:.3f} ratio {ratio(ps, pm)}  |  P^q layer 0 ratio "
                      f"{ratio(qs, qm)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
