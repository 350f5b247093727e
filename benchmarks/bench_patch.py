"""What ``seqpe_kernels.patch`` buys an existing SeqPE script, measured on the authors' interface.

    python benchmarks/bench_patch.py [--reps 5] [--configs text vits] [--backend auto] [--threads N]

The module is tests/authors_seqpe.py (the stand-in of the authors' SequentialPE: their attribute names, Conv1D
layers, ``forward(x, pad_mask)``), at the default training steps of SEQPE_SPEC §6 (seqpe_kernels.bench CONFIGS):
text (M=1552, D=768, 12 heads, K=5, final LN) and ViT-S (M=4324, D=384, 6 heads, 2-D K=2), fp32, resid_pdrop 0.1.
Rows: a training step (``pe_model(x, pad_mask)`` forward + backward, train mode), an eval forward (inference mode),
and the data side: ``PeUtils.prepare_seqpe_data`` (the authors' per-position string loop) against
``seqpe_kernels.prepare_seqpe_data`` for the step's positions and for a 32 768-position evaluation window.
Unpatched and patched runs are interleaved and medians of ``--reps`` compared (this machine is shared).

Numbers from a shared 2-core CPU are only meaningful as ratios measured in the same run.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import seqpe_kernels as sk  # noqa: E402
from seqpe_kernels.bench import CONFIGS as BENCH_CONFIGS  # noqa: E402

import authors_seqpe as A  # noqa: E402

SIZES = {"text": "text-default", "vits": "vits-default"}


def make(name: str):
    bc = BENCH_CONFIGS[SIZES[name]]
    kw = bc.module_kwargs()
    torch.manual_seed(0)
    m = A.SequentialPE(kw["embed_dim"], kw["num_heads"], kw.get("num_layers", 2), kw["max_digits"],
                       attn_direction=kw.get("attn_direction", "causal"),
                       use_last_layernorm=kw.get("use_last_layernorm", True),
                       mask_padding=kw.get("mask_padding", False), resid_pdrop=kw.get("resid_pdrop", 0.1),
                       attn_pdrop=kw.get("attn_pdrop", 0.0), out_proj_dim=kw.get("out_dim") or -1,
                       data_dim=kw.get("data_dim", 1))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    g = torch.Generator().manual_seed(1)
    shape = (bc.M, bc.data_dim) if bc.data_dim > 1 else (bc.M,)
    pos = torch.randint(0, bc.pos_bound, shape, generator=g)
    raw = pos.tolist() if bc.data_dim == 1 else [tuple(p) for p in pos.tolist()]
    return bc, m, raw


def timed(fn, reps):
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--configs", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backend={args.backend!r}")
    print(f"{'config':8} {'what':34} {'unpatched ms':>13} {'patched ms':>11} {'speed-up':>9}")
    for name in args.configs:
        bc, m, raw = make(name)
        K = m.max_digits
        pat = sk.patch(copy.deepcopy(m), backend=args.backend)
        x, pm = A.PeUtils.prepare_seqpe_data(raw, K)
        gout = torch.randn(len(raw), m.out_proj.out_features)

        def train(mod):
            mod.train()
            mod.zero_grad(set_to_none=True)
            (mod(x, pm) * gout).sum().backward()

        def evaluate(mod):
            mod.eval()
            with torch.inference_mode():
                mod(x, pm)

        train(pat)  # warm-up (and the patch's first-call verification)
        evaluate(pat)
        rows = []
        for what, fn in (("train step (fwd+bwd)", train), ("eval forward", evaluate)):
            a, b = [], []
            for _ in range(args.reps):
                a += timed(lambda: fn(m), 1)
                b += timed(lambda: fn(pat), 1)
            rows.append((what, statistics.median(a), statistics.median(b)))
        big = list(range(32768)) if bc.data_dim == 1 else [(i // 182, i % 182) for i in range(182 * 182)]
        for what, data in ((f"prepare_seqpe_data, step (M={len(raw)})", raw),
                           (f"prepare_seqpe_data, eval (M={len(big)})", big)):
            kd = 5 if bc.data_dim == 1 else 3
            sk.prepare_seqpe_data(data, kd)  # warm-up
            a = timed(lambda: A.PeUtils.prepare_seqpe_data(data, kd), args.reps)
            b = timed(lambda: sk.prepare_seqpe_data(data, kd), args.reps)
            rows.append((what, statistics.median(a), statistics.median(b)))
        for what, a, b in rows:
            print(f"{name:8} {what:34} {a * 1e3:13.2f} {b * 1e3:11.2f} {a / b:8.2f}x")


if __name__ == "__main__":
    main()
