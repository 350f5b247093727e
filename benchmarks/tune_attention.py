"""Sweep the Triton tiny-attention kernels at the paper shapes (CUDA; event timing, medians).

    python benchmarks/tune_attention.py [--chunks 32 16 8]
    python benchmarks/tune_attention.py --resources   # no GPU needed: sm_90 registers / occupancy of each kernel
Prints forward and backward times for the full block (all T query rows) and the CLS-only block: the package's
kernels per num_warps setting, then an experimental variant ("dcN") that walks the head dimension in chunks of N,
then the C++/CUDA extension's kernels ("ext", the `cuda` backend's; each row must agree with the first).

Why the variant: the package's kernels hold whole [TQ, T, DH] broadcast products per (sequence, head) program (1 warp:
128 fp32 values per thread for one product at the text shape), so the full-block backward takes 133 registers and
runs at 23 % occupancy on sm_90 (benchmarks/results/kernel_resources_sm90.md); with ~0.1 ms per text step above its
bandwidth floor it is the Triton step's largest remaining non-GEMM excess. Chunking the head dimension bounds every
product at [TQ, T, N] (scores and dO V^T accumulate over the chunks; dQ, dK, dV are written chunk by chunk) at the
cost of reading q, k and dO twice. Whether that is faster is a GPU question; the variant computes the same values as
the package's kernels (tests/test_table_grad.py checks it under the interpreter), so a win here can replace them.
"""
import argparse
import os
import sys

if "--resources" in sys.argv:  # kernels recorded on CPU tensors (not run), compiled for sm_90 in a subprocess
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import triton
import triton.language as tl
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from seqpe_kernels.ops import attention as A  # noqa: E402
from seqpe_kernels.ops._common import acc_dtype, drop_scales  # noqa: E402
from seqpe_kernels.ops.launch import direct  # noqa: E402

SHAPES = {  # name: (M, T, D, H, dtype, table rows: layer 0's digit table, base * digits + 1)
    "text-default": (1552, 6, 768, 12, torch.bfloat16, 51),
    "vits-default": (4324, 5, 384, 6, torch.float32, 41),
}
DEVICE = "cuda"  # tests run the sweep's logic on CPU under the interpreter


@triton.jit
def _rows(ROWS, m, T, TQ, q_start, iq, jk, Q_ROWS: tl.constexpr, KV_ROWS: tl.constexpr):
    if Q_ROWS:
        qr = tl.load(ROWS + m * T + q_start + iq, mask=iq < TQ, other=0)
    else:
        qr = iq
    if KV_ROWS:
        kr = tl.load(ROWS + m * T + jk, mask=jk < T, other=0)
    else:
        kr = jk
    return qr, kr


@direct
@triton.jit
def _attn_fwd_dc(Q, K, V, ROWS, PAD, O, SEEDS, seed_idx, sqm, sqt, skm, skt, svm, svt, spm, T, TQ, L, q_start, H,
                 D, sdiv, p, drop_scale, drop_scale_lo, DH: tl.constexpr, DHP: tl.constexpr, DC: tl.constexpr,
                 TP: tl.constexpr, TQP: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                 DROPOUT: tl.constexpr, Q_ROWS: tl.constexpr, KV_ROWS: tl.constexpr, ACC: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    iq = tl.arange(0, TQP)
    jk = tl.arange(0, TP)
    qr, kr = _rows(ROWS, m, T, TQ, q_start, iq, jk, Q_ROWS, KV_ROWS)
    s = tl.zeros([TQP, TP], dtype=ACC)
    for c in range(0, DHP // DC):
        d = c * DC + tl.arange(0, DC)
        dm = d < DH
        col = h * DH + d
        q = tl.load(Q + m * sqm + qr[:, None] * sqt + col[None, :], mask=(iq < TQ)[:, None] & dm[None, :],
                    other=0.0).to(ACC)
        k = tl.load(K + m * skm + kr[:, None] * skt + col[None, :], mask=(jk < T)[:, None] & dm[None, :],
                    other=0.0).to(ACC)
        s += tl.sum(q[:, None, :] * k[None, :, :], axis=2)
    pr, allowed = A._masked_softmax(s / sdiv, PAD, m * spm, iq, jk, T, L, q_start, CAUSAL, HAS_MASK)
    if DROPOUT:
        pr = tl.where(A._keep(SEEDS, seed_idx, m, H, h, TQ, T, iq, jk, p),
                      pr * (tl.cast(drop_scale, ACC) + tl.cast(drop_scale_lo, ACC)), 0.0)
    for c in range(0, DHP // DC):
        d = c * DC + tl.arange(0, DC)
        dm = d < DH
        col = h * DH + d
        v = tl.load(V + m * svm + kr[:, None] * svt + col[None, :], mask=(jk < T)[:, None] & dm[None, :],
                    other=0.0).to(ACC)
        o = tl.sum(pr[:, :, None] * v[None, :, :], axis=1)
        tl.store(O + m * TQ * D + iq[:, None] * D + col[None, :], o.to(O.dtype.element_ty),
                 mask=(iq < TQ)[:, None] & dm[None, :])


@direct
@triton.jit
def _attn_bwd_dc(Q, K, V, ROWS, PAD, DO, DQ, DK, DV, SEEDS, seed_idx, sqm, sqt, skm, skt, svm, svt, spm,
                 dqm, dqt, dkm, dkt, dvm, dvt, T, TQ, L, q_start, H, D, sdiv, p, drop_scale, drop_scale_lo,
                 DH: tl.constexpr, DHP: tl.constexpr, DC: tl.constexpr, TP: tl.constexpr, TQP: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, Q_ROWS: tl.constexpr,
                 KV_ROWS: tl.constexpr, ACC: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    iq = tl.arange(0, TQP)
    jk = tl.arange(0, TP)
    qr, kr = _rows(ROWS, m, T, TQ, q_start, iq, jk, Q_ROWS, KV_ROWS)
    s = tl.zeros([TQP, TP], dtype=ACC)
    dpd = tl.zeros([TQP, TP], dtype=ACC)
    for c in range(0, DHP // DC):  # scores and dO V^T, accumulated over the head-dimension chunks
        d = c * DC + tl.arange(0, DC)
        dm = d < DH
        col = h * DH + d
        qm = (iq < TQ)[:, None] & dm[None, :]
        kvm = (jk < T)[:, None] & dm[None, :]
        q = tl.load(Q + m * sqm + qr[:, None] * sqt + col[None, :], mask=qm, other=0.0).to(ACC)
        k = tl.load(K + m * skm + kr[:, None] * skt + col[None, :], mask=kvm, other=0.0).to(ACC)
        v = tl.load(V + m * svm + kr[:, None] * svt + col[None, :], mask=kvm, other=0.0).to(ACC)
        do = tl.load(DO + m * TQ * D + iq[:, None] * D + col[None, :], mask=qm, other=0.0).to(ACC)
        s += tl.sum(q[:, None, :] * k[None, :, :], axis=2)
        dpd += tl.sum(do[:, None, :] * v[None, :, :], axis=2)
    pr, allowed = A._masked_softmax(s / sdiv, PAD, m * spm, iq, jk, T, L, q_start, CAUSAL, HAS_MASK)
    pd, ds = A._softmax_bwd(pr, dpd, allowed, SEEDS, seed_idx, m, H, h, TQ, T, iq, jk, p, sdiv, drop_scale,
                            drop_scale_lo, DROPOUT, ACC)
    for c in range(0, DHP // DC):  # dQ, dK, dV chunk by chunk
        d = c * DC + tl.arange(0, DC)
        dm = d < DH
        col = h * DH + d
        qm = (iq < TQ)[:, None] & dm[None, :]
        kvm = (jk < T)[:, None] & dm[None, :]
        do = tl.load(DO + m * TQ * D + iq[:, None] * D + col[None, :], mask=qm, other=0.0).to(ACC)
        dv = tl.sum(pd[:, :, None] * do[:, None, :], axis=0)
        tl.store(DV + m * dvm + jk[:, None] * dvt + col[None, :], dv.to(DV.dtype.element_ty), mask=kvm)
        k = tl.load(K + m * skm + kr[:, None] * skt + col[None, :], mask=kvm, other=0.0).to(ACC)
        dq = tl.sum(ds[:, :, None] * k[None, :, :], axis=1)
        tl.store(DQ + m * dqm + iq[:, None] * dqt + col[None, :], dq.to(DQ.dtype.element_ty), mask=qm)
        q = tl.load(Q + m * sqm + qr[:, None] * sqt + col[None, :], mask=qm, other=0.0).to(ACC)
        dk = tl.sum(ds[:, :, None] * q[:, None, :], axis=0)
        tl.store(DK + m * dkm + jk[:, None] * dkt + col[None, :], dk.to(DK.dtype.element_ty), mask=kvm)


def _chunk(DHP: int, dc: int) -> int:
    return max(1, min(DHP, dc))


def forward_dc(dc, qkv, kv, pad_mask, num_heads, causal, q_start, scale_div, p, seeds, seed_idx, rows=None,
               num_warps=1):
    """A.tiny_attention_forward with the head-dimension-chunked kernel (no tl.dot path: the paper's T < 16)."""
    q, k, v, M, TQ, T, st, q_rows, kv_rows = A._operands(qkv, kv, rows, pad_mask, num_heads)
    D = q.shape[-1]
    DH, TP, TQP, DHP, use_dot = A._geometry(q, M, TQ, T, D, num_heads)
    assert not use_dot, "the variant has no tl.dot path (T >= 16)"
    L = pad_mask.shape[1] if pad_mask is not None else 0
    out = q.new_empty((M, TQ, D))
    if M > 0:
        pad = pad_mask if pad_mask is not None else q
        _attn_fwd_dc[(M, num_heads)](
            q, k, v, rows if rows is not None else q, pad, out, seeds if p > 0 else q, seed_idx, *st,
            pad.stride(0) if pad_mask is not None else 0, T, TQ, L, q_start, num_heads, D, scale_div, p,
            *drop_scales(p, q.dtype), DH=DH, DHP=DHP, DC=_chunk(DHP, dc), TP=TP, TQP=TQP, CAUSAL=causal,
            HAS_MASK=pad_mask is not None, DROPOUT=p > 0, Q_ROWS=q_rows, KV_ROWS=kv_rows, ACC=acc_dtype(q),
            num_warps=num_warps)
    return out


def backward_dc(dc, dout, qkv, kv, pad_mask, num_heads, causal, q_start, scale_div, p, seeds, seed_idx, rows=None,
                num_warps=1):
    """A.tiny_attention_backward with the head-dimension-chunked kernel."""
    q, k, v, M, TQ, T, st, q_rows, kv_rows = A._operands(qkv, kv, rows, pad_mask, num_heads, check=False)
    D = q.shape[-1]
    DH, TP, TQP, DHP, use_dot = A._geometry(q, M, TQ, T, D, num_heads)
    assert not use_dot, "the variant has no tl.dot path (T >= 16)"
    L = pad_mask.shape[1] if pad_mask is not None else 0
    dout = dout.contiguous()
    d_first = torch.empty((M, T, 3 * D) if q_rows else qkv.shape, dtype=qkv.dtype, device=qkv.device)
    d_kv = (torch.empty((M, T, 2 * D) if kv_rows else kv.shape, dtype=kv.dtype, device=kv.device)
            if kv is not None else qkv.new_empty((0,)))
    dq, dk, dv = A._views(d_first, d_kv if kv is not None else None, D)
    if M > 0:
        pad = pad_mask if pad_mask is not None else q
        _attn_bwd_dc[(M, num_heads)](
            q, k, v, rows if rows is not None else q, pad, dout, dq, dk, dv, seeds if p > 0 else q, seed_idx,
            *st, pad.stride(0) if pad_mask is not None else 0,
            dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), T, TQ, L,
            q_start, num_heads, D, scale_div, p, *drop_scales(p, q.dtype), DH=DH, DHP=DHP, DC=_chunk(DHP, dc),
            TP=TP, TQP=TQP, CAUSAL=causal, HAS_MASK=pad_mask is not None, DROPOUT=p > 0, Q_ROWS=q_rows,
            KV_ROWS=kv_rows, ACC=acc_dtype(q), num_warps=num_warps)
    return d_first, d_kv


def _close(a, b):
    """Every output both give (the extension returns an empty tensor where Triton returns None) agrees."""
    def given(t):
        return t is not None and t.numel() > 0
    return all(given(x) == given(y) and (not given(x) or torch.allclose(x.float(), y.float(), atol=2e-2, rtol=2e-2))
               for x, y in zip(a, b))


def resources(chunks) -> int:
    """sm_90 registers, shared memory and occupancy of the package's attention kernels and the variants at the
    paper shapes (benchmarks/kernel_resources.py's compile: launches recorded on CPU, compiled in a subprocess)."""
    import kernel_resources as KR

    launches = []
    for name, (M, T, D, H, dt, n) in SHAPES.items():
        tab, rows = torch.zeros(n, 3 * D, dtype=dt), torch.zeros(M, T, dtype=torch.long)  # layer 0, as in main()
        q_cls, kv = torch.zeros(M, 1, D, dtype=dt), torch.zeros(M, T, 2 * D, dtype=dt)
        sdiv = (D // H) ** 0.5
        for args in ((tab, None, None, H, True, 0, sdiv, 0.0, None, 0, rows),
                     (q_cls, kv, None, H, True, T - 1, sdiv, 0.0, None, 0, None)):
            dout = torch.zeros(M, T if args[-1] is not None else 1, D, dtype=dt)
            launches += KR.record(lambda: (A.tiny_attention_forward(*args), A.tiny_attention_backward(dout, *args)),
                                  run=False)
            for c in chunks:
                launches += KR.record(lambda: (forward_dc(c, *args), backward_dc(c, dout, *args)), run=False)
    for d in launches:  # the compile subprocess imports the kernels' module by name
        if d["module"] == "__main__":
            d["module"] = "tune_attention"
    os.environ["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.abspath(__file__)),
                                                os.environ.get("PYTHONPATH", "")])
    rc, log, usage = KR.compile_sm90(launches)
    print(log.strip())
    print(KR.table(launches, usage))
    return rc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, nargs="*", default=[32, 16, 8],
                    help="head-dimension chunks of the experimental variant (none: the package's kernels only)")
    ap.add_argument("--resources", action="store_true", help="sm_90 registers / occupancy instead of timings (CPU)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    a = ap.parse_args(argv)
    chunks = a.chunks
    if a.resources:
        return resources(chunks)
    torch.manual_seed(0)
    # the C++/CUDA extension's attention beside Triton's ("ext" rows), when it has kernels for this device: status
    # loads it and never raises (no compiler, or CUDA sources that did not build: a library with the CPU kernels
    # alone, whose ops raise NotImplementedError on CUDA tensors, would end the sweep at the first "ext" row)
    from seqpe_kernels import _ext

    ok, why = _ext.status(torch.device(DEVICE).type)
    ext = _ext.load() if ok else None
    if not ok:
        print(f"(no ext rows: {why[:160]})")
    print(f"{'shape':14s} {'block':5s} {'kernel':6s} {'warps':>5s} {'fwd us':>8s} {'bwd us':>8s}")
    for name in a.shapes:
        M, T, D, H, dt, n = SHAPES[name]
        # the full block as the step runs it (layer 0): q / k / v read by row index from the table's c_attn output
        tab = torch.randn(n, 3 * D, device=DEVICE, dtype=dt)
        rows = torch.randint(0, n, (M, T), device=DEVICE)
        q_cls = torch.randn(M, 1, D, device=DEVICE, dtype=dt)
        kv = torch.randn(M, T, 2 * D, device=DEVICE, dtype=dt)
        sdiv = (D // H) ** 0.5
        for block, args in (("full", (tab, None, None, H, True, 0, sdiv, 0.0, None, 0, rows)),
                            ("cls", (q_cls, kv, None, H, True, T - 1, sdiv, 0.0, None, 0, None))):
            ref = None
            settings = [("pkg", w) for w in (None, 1, 2, 4, 8)] + [(f"dc{c}", w) for c in chunks for w in (1, 2)]
            if ext is not None:  # the C++/CUDA backend's kernels, as its encoder calls them (their own warp count)
                settings.append(("ext", None))
            for kern, w in settings:
                if kern == "ext":
                    fwd = lambda: ext.tiny_attention_fwd(*args)  # noqa: E731
                    bwd = lambda g: ext.tiny_attention_bwd(g, *args)  # noqa: E731
                elif kern == "pkg":
                    A.NUM_WARPS_OVERRIDE = w
                    fwd = lambda: A.tiny_attention_forward(*args)  # noqa: E731
                    bwd = lambda g: A.tiny_attention_backward(g, *args)  # noqa: E731
                else:
                    c = int(kern[2:])
                    fwd = lambda: forward_dc(c, *args, num_warps=w)  # noqa: E731
                    bwd = lambda g: backward_dc(c, g, *args, num_warps=w)  # noqa: E731
                out = fwd()
                if ref is None:
                    dout = torch.randn_like(out)
                grads = bwd(dout)
                if ref is None:
                    ref = (out, grads)
                else:  # every setting must compute the same thing
                    assert _close((out, *grads), (ref[0], *ref[1])), f"{kern} warps={w} disagrees"
                tf = triton.testing.do_bench(fwd, return_mode="median") * 1e3
                tb = triton.testing.do_bench(lambda: bwd(dout), return_mode="median") * 1e3
                print(f"{name:14s} {block:5s} {kern:6s} {str(w or 'rule'):>5s} {tf:8.1f} {tb:8.1f}", flush=True)
            A.NUM_WARPS_OVERRIDE = None


if __name__ == "__main__":
    sys.exit(main())
