"""seqpe::prefix_attention (fused ancestor attention of prefix_shared_forward) vs the eager ``attend`` math.

On CPU the kernels run under TRITON_INTERPRET=1 (conftest.py). Outputs and the gradients of q, k, v are
compared relative to the largest reference magnitude: fp32 at 1e-5, fp64 at 1e-12 (on the GPU, where n and
the atomic dk/dv sums are large, fp32 at 1e-5 of an fp64 reference).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import seqpe_kernels.ops.prefix_attention as pa
from seqpe_kernels import FusedSeqPE
from seqpe_kernels.savings.dedup import prefix_shared_forward

from conftest import HAS_CUDA, seed_for_case
from test_dedup import assert_close_rel, make, positions_for
from test_fused import check_parity_vs_fp64

DEV = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def seed_for(*key):
    torch.manual_seed(seed_for_case(*key))  # fresh per run, replayable (conftest)


def ref_attend(q, k, v, anc, key_mask, H, scale):
    """The eager ``attend`` of seqpe_kernels.savings.dedup.prefix_shared_forward, line for line. One change: the key
    mask is cast to the logits' dtype first (eager multiplies float32 mask by finfo(fp64).min, which is
    -inf in float32, so its fp64 fully-masked rows are NaN); identical for fp32."""
    n, a = anc.shape
    D = q.shape[1]
    de = D // H
    flat = anc.reshape(-1)
    qh = q.reshape(n, 1, H, de).permute(0, 2, 1, 3)
    kh = k.index_select(0, flat).view(n, a, H, de).permute(0, 2, 1, 3)
    vh = v.index_select(0, flat).view(n, a, H, de).permute(0, 2, 1, 3)
    w = torch.matmul(qh, kh.transpose(-1, -2))
    if scale:
        w = w / torch.full([], vh.size(-1) ** 0.5, dtype=w.dtype, device=w.device)
    if key_mask is not None:
        w = w + torch.finfo(w.dtype).min * (1 - key_mask.to(w.dtype)[:, None, None, :])
    w = F.softmax(w, dim=-1).type(vh.dtype)
    o = torch.matmul(w, vh)
    return o.permute(0, 2, 1, 3).reshape(n, D)


def make_inputs(n, N, a, H, de, dtype, masked, device=DEV, q_off=3):
    """q, k, v as strided column slices of one [rows, 3D] "c_attn output" leaf (q also a row slice), ancestor
    rows drawn from a small pool (so many nodes share ancestors: the atomic scatter adds up), and a key
    mask with some fully masked rows."""
    D = H * de
    big = torch.randn(max(N, q_off + n), 3 * D, dtype=dtype, device=device).requires_grad_()
    q, k, v = big[q_off:q_off + n, :D], big[:N, D:2 * D], big[:N, 2 * D:]
    anc = torch.stack([torch.randperm(N, device=device)[:a] if N >= a else torch.randint(0, N, (a,), device=device)
                       for _ in range(n)]) if n else torch.zeros(0, a, dtype=torch.long, device=device)
    km = None
    if masked:
        km = (torch.rand(n, a, device=device) > 0.4).float()
        km[::3] = 0.0  # fully masked rows: uniform over the a keys
        km[1::5] = 1.0
    return big, q, k, v, anc, km


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(torch.finfo(b.dtype).tiny)).item() if b.numel() else 0.0


def check_case(n, N, a, H, de, dtype, masked, scale, device=DEV, tol=None, ref_dtype=None):
    """The op vs ref_attend; with ref_dtype (fp64 for an fp32 op) the reference runs on a ref_dtype copy of the
    inputs, so the tolerance bounds the op's own error rather than the sum of two same-precision errors."""
    tol = TOL[dtype] if tol is None else tol
    big, q, k, v, anc, km = make_inputs(n, N, a, H, de, dtype, masked, device)
    assert not q.is_contiguous() and q.stride(0) == 3 * H * de
    out = pa.prefix_attention(q, k, v, anc, km, H, scale)
    big_r, (q_r, k_r, v_r) = big, (q, k, v)
    if ref_dtype is not None:
        D3 = 3 * H * de
        big_r = big.detach().to(ref_dtype).requires_grad_()
        q_r, k_r, v_r = big_r[3:3 + n, :D3 // 3], big_r[:N, D3 // 3:2 * D3 // 3], big_r[:N, 2 * D3 // 3:]
    ref = ref_attend(q_r, k_r, v_r, anc, km, H, scale)
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    what = f"n={n} N={N} a={a} H={H} de={de} {dtype} masked={masked} scale={scale}"
    assert rel(out, ref) <= tol, f"output {what}: rel err {rel(out, ref):.3g}"
    g = torch.randn_like(out)
    (gb,) = torch.autograd.grad((out * g).sum(), big)
    (gr,) = torch.autograd.grad((ref * g.to(ref.dtype)).sum(), big_r)
    D = H * de
    # q rows [3, 3+n) of the first D columns; k and v every row of their column blocks
    for name, sl in (("q", (slice(3, 3 + n), slice(0, D))), ("k", (slice(0, N), slice(D, 2 * D))),
                     ("v", (slice(0, N), slice(2 * D, 3 * D)))):
        if a > 1 or name == "v":  # a softmax over one key is constant: no gradient reaches q or k
            assert gr[sl].abs().max() > 0, f"grad {name} {what}: zero reference gradient (vacuous check)"
        assert rel(gb[sl], gr[sl]) <= tol, f"grad {name} {what}: rel err {rel(gb[sl], gr[sl]):.3g}"
    return out, km


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("scale", [True, False])
def test_matches_eager_attend(dtype, masked, scale):
    seed_for("attend", dtype, masked, scale)
    heads_dims = [(1, 8), (2, 12), (3, 8), (3, 12), (2, 8), (1, 12)]
    for a in range(1, 8):
        for H, de in (heads_dims[a % 6], heads_dims[(a + 3) % 6]):
            check_case(n=11, N=9, a=a, H=H, de=de, dtype=dtype, masked=masked, scale=scale)


def test_fully_masked_rows_are_uniform():
    seed_for("uniform")
    out, km = check_case(n=7, N=6, a=5, H=2, de=12, dtype=torch.float32, masked=True, scale=True)
    assert (km.sum(1) == 0).any()


@pytest.mark.parametrize("masked", [False, True])
def test_many_nodes_several_programs(masked):
    # n larger than one program's block of nodes (partial last block), heavy ancestor sharing (N << n*a)
    seed_for("many", masked)
    check_case(n=300, N=23, a=7, H=3, de=12, dtype=torch.float32, masked=masked, scale=True)


def test_trie_ancestors_and_contiguous_inputs():
    # real trie rows: ancestors are unique prefixes shared by many nodes; contiguous q/k/v; key mask dtype
    from seqpe_kernels.savings.dedup import build_prefix_trie
    from seqpe_kernels.reference.tokenize import tokenize

    seed_for("trie")
    digits, pad = tokenize(torch.arange(0, 240, 3), 3, 10, 1, True)
    trie = build_prefix_trie(digits.to(DEV), pad.to(DEV), 10, True)
    N, D, H = trie.num_token_states, 24, 2
    k, v = torch.randn(N, D, device=DEV, requires_grad=True), torch.randn(N, D, device=DEV, requires_grad=True)
    for j in range(trie.L + 1):
        q = torch.randn(trie.counts[j], D, device=DEV, requires_grad=True)
        out = pa.prefix_attention(q, k, v, trie.anc[j], trie.key_mask[j], H, True)
        ref = ref_attend(q, k, v, trie.anc[j], trie.key_mask[j], H, True)
        assert rel(out, ref) <= 1e-5
        g = torch.randn_like(ref)
        go = torch.autograd.grad((out * g).sum(), (q, k, v))
        gr = torch.autograd.grad((ref * g).sum(), (q, k, v))
        for x, y in zip(go, gr):
            assert rel(x, y) <= 1e-5


def test_empty_and_validation():
    q, k, q2 = torch.zeros(0, 8, device=DEV), torch.randn(4, 8, device=DEV), torch.randn(2, 8, device=DEV)
    idx = torch.zeros(2, 2, dtype=torch.long, device=DEV)
    assert pa.prefix_attention(q, k, k, idx[:0], None, 2, True).shape == (0, 8)
    with pytest.raises(ValueError, match="num_heads"):
        pa.prefix_attention(q2, k, k, idx, None, 3, True)
    with pytest.raises(ValueError, match="int64"):
        pa.prefix_attention(q2, k, k, idx.int(), None, 2, True)
    with pytest.raises(ValueError, match="key_mask"):
        pa.prefix_attention(q2, k, k, idx, torch.ones(2, 3, device=DEV), 2, True)


def test_opcheck():
    seed_for("opcheck")
    for masked, scale, dtype in ((False, True, torch.float32), (True, False, torch.float32),
                                 (True, True, torch.float64)):
        big, q, k, v, anc, km = make_inputs(5, 6, 3, 2, 12, dtype, masked)
        torch.library.opcheck(torch.ops.seqpe.prefix_attention.default, (q, k, v, anc, km, 2, scale))
    dout = torch.randn(5, 24, device=DEV)
    torch.library.opcheck(torch.ops.seqpe.prefix_attention_backward.default,
                          (dout, q.detach().float(), k.detach().float(), v.detach().float(), anc, km, 2, True))


def check_parity(m, pos, fn=prefix_shared_forward):
    """fn(m, pos) vs m(pos): output and every parameter gradient (test_dedup's check, on DEV)."""
    out, ref = fn(m, pos), m(pos)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert_close_rel(out, ref, "output")
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7)).to(ref.device)
    names, params = zip(*m.named_parameters())
    go = torch.autograd.grad((out * g).sum(), params)
    gr = torch.autograd.grad((ref * g).sum(), params)
    for name, x, y in zip(names, go, gr):
        assert y.abs().max() > 0 or name.startswith("transformers"), f"{name}: zero reference grad"
        assert_close_rel(x, y, f"grad {name}")


class _PrefixShared(torch.nn.Module):
    """``prefix_shared_forward(m, .)`` as a module (its parameters are m's): what test_fused.check_parity_vs_fp64
    compares with the reference."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, pos):
        return prefix_shared_forward(self.m, pos)


class _Spy:
    """Counts calls of the fused op made by prefix_shared_forward (which imports it at call time)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        orig = pa.prefix_attention

        def wrapped(*args):
            self.calls += 1
            return orig(*args)

        monkeypatch.setattr(pa, "prefix_attention", wrapped)


@pytest.mark.parametrize("d,K", [(1, 3), (2, 2)])
@pytest.mark.parametrize("mask_padding", [False, True])
def test_prefix_shared_forward_triton_path(monkeypatch, d, K, mask_padding):
    spy = _Spy(monkeypatch)
    m = make(D=24, H=3, K=K, d=d, mask_padding=mask_padding, layers=2,
             seed=seed_for_case("pfx", d, K, mask_padding)).to(DEV)
    check_parity(m, positions_for("mixed", K, d).to(DEV))
    # every level of both layers went through the op (in the checked forward only, not the plain one)
    assert spy.calls == K * d + 1 + 1


def test_prefix_shared_forward_eager_when_asked_or_dropout(monkeypatch):
    spy = _Spy(monkeypatch)
    pos = torch.cat([torch.arange(30), torch.tensor([999, 5])]).to(DEV)
    fus = make(cls=FusedSeqPE, D=16, H=2, K=3, layers=1).to(DEV)
    fus.backend = "torch"
    check_parity(fus, pos)  # plain forward is eager too; the spy sees neither
    assert spy.calls == 0
    monkeypatch.setenv("SEQPE_KERNELS_BACKEND", "torch")
    fus.backend = "auto"
    prefix_shared_forward(fus, pos)
    assert spy.calls == 0
    monkeypatch.delenv("SEQPE_KERNELS_BACKEND")
    prefix_shared_forward(fus, pos)
    assert spy.calls == 1
    # a C++ backend named (by the module or the override) runs no Triton kernel: the eager chain
    fus.backend = "torch"
    want = fus(pos)
    for how in ("module", "env"):
        spy.calls = 0
        if how == "module":
            fus.backend = "cuda"
        else:
            fus.backend = "auto"
            monkeypatch.setenv("SEQPE_KERNELS_BACKEND", "cpu")
        torch.testing.assert_close(prefix_shared_forward(fus, pos), want, rtol=1e-5, atol=1e-6)
        assert spy.calls == 0, how
    monkeypatch.delenv("SEQPE_KERNELS_BACKEND")
    # attention dropout active: the op has no dropout, so the eager attention runs
    m = make(D=16, H=2, K=3, layers=1, attn_pdrop=0.1).to(DEV).train()
    spy.calls = 0
    prefix_shared_forward(m, pos, allow_in_training=True)
    assert spy.calls == 0


def test_prefix_shared_forward_deterministic_mode(monkeypatch):
    """The op's backward scatters dk / dv with atomic adds (order varies between runs on a GPU): under
    torch.use_deterministic_algorithms a call that will be differentiated takes the eager chain (the spy sees
    no op call), results unchanged; a no-grad call (forward only, deterministic) keeps the op."""
    spy = _Spy(monkeypatch)
    m = make(D=16, H=2, K=3, layers=1, seed=3).to(DEV)
    pos = torch.cat([torch.arange(25), torch.tensor([999, 5, 5])]).to(DEV)
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        for warn in (False, True):
            torch.use_deterministic_algorithms(True, warn_only=warn)
            spy.calls = 0
            check_parity(m, pos)
            assert spy.calls == 0, warn
            with torch.no_grad():
                torch.testing.assert_close(prefix_shared_forward(m, pos), m(pos), rtol=1e-5, atol=1e-6)
            assert spy.calls == 1, warn  # one layer = the last block: its CLS rows' one call
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)
    spy.calls = 0
    check_parity(m, pos)  # deterministic mode off again: the op runs
    assert spy.calls > 0


@pytest.mark.gpu
def test_gpu_large():
    seed_for("gpu")
    for masked in (False, True):
        check_case(n=20000, N=5000, a=7, H=8, de=64, dtype=torch.float32, masked=masked, scale=True,
                   ref_dtype=torch.float64)
        check_case(n=3000, N=700, a=6, H=6, de=12, dtype=torch.float64, masked=masked, scale=False)
    # against the exact answer (the module in fp64), on test_fused.perturbed_pair's well-conditioned weights: at
    # 4000 sequences two fp32 runs are each up to ~1e-5 off it (make's 0.3 noise at D=128: the plain fp32 path
    # 0.7-1.9e-5 off fp64 on CPU, the prefix path 1.23e-5 off the plain one at this seed), so their difference
    # cannot be held to 1e-5; the prefix path's own error can (<= 4.2e-6 on CPU at this noise)
    m = make(D=128, H=4, K=5, mask_padding=True, layers=2, noise=0.1 * (64 / 128) ** 0.5).to(DEV)
    check_parity_vs_fp64(m, _PrefixShared(copy.deepcopy(m)), torch.randint(0, 10 ** 5, (4000,), device=DEV))


def _prefix_beyond_int32(R, H, de, a, dev="cuda", lp=torch.bfloat16, limit=2 ** 31, e=64):
    from test_fused import _lp_rtol, record_err, rows_around

    D = H * de
    big = torch.randn(R, 3 * D, device=dev, dtype=lp)  # one "c_attn output": q, k, v column slices
    q, k, v = big[:, :D], big[:, D:2 * D], big[:, 2 * D:]
    i = torch.arange(R, device=dev)
    anc = torch.stack([i - t for t in range(a)], 1).clamp_min(0)   # a chain of ancestors: rows i, i-1, ...
    anc[:e, 1] = R - 1 - torch.arange(e, device=dev)               # the first nodes read the last k/v rows
    anc[-e:, 2] = torch.arange(e, device=dev)                      # the last nodes read the first rows
    km = (torch.rand(R, a, device=dev) > 0.3).float()
    # q/k/v reads pass the limit at row limit // 3D, the output / dq / dk / dv writes at row limit // D
    sel = rows_around(R, limit // (3 * D), limit // D, e, R - e).to(dev)
    km[sel[::4]] = 0.0                                              # some fully masked nodes among the checked
    out = pa.prefix_attention(q, k, v, anc, km, H, True)
    out_s = out[sel]
    del out
    # dk/dv sum over every node that has the row as an ancestor: dout is zero except on the checked nodes
    dout = torch.zeros(R, D, device=dev, dtype=lp)
    dout[sel] = torch.randn(len(sel), D, device=dev, dtype=lp)
    dq, dk, dv = torch.ops.seqpe.prefix_attention_backward(dout, q, k, v, anc, km, H, True)
    uniq, inv = torch.unique(anc[sel], return_inverse=True)
    got = {"dq": dq[sel], "dk": dk[uniq], "dv": dv[uniq]}
    # every other row of dq / dk / dv must be exactly zero (no stray writes or atomics)
    stray = {n: int(t.count_nonzero()) - int(got[n].count_nonzero()) for n, t in (("dq", dq), ("dk", dk), ("dv", dv))}
    qs = q[sel].double().requires_grad_()
    kr, vr = k[uniq].double().requires_grad_(), v[uniq].double().requires_grad_()
    dout_s, km_s = dout[sel].double(), km[sel]
    del big, q, k, v, dq, dk, dv, dout
    o_ref = ref_attend(qs, kr, vr, inv, km_s, H, True)
    o_ref.backward(dout_s)
    errs = []
    record_err(errs, "output", out_s, o_ref, _lp_rtol(lp))
    for name, ref in (("dq", qs.grad), ("dk", kr.grad), ("dv", vr.grad)):
        record_err(errs, name, got[name], ref, _lp_rtol(lp))
    return errs, stray


@pytest.mark.gpu
def test_gpu_offsets_beyond_int32(gpu_bytes):
    """prefix_attention forward + backward with every indexed tensor past 2**31 elements: D=768 (12 heads of 64),
    bf16 q/k/v as column slices of one [R, 3D] buffer, R = 2 796 266 nodes and k/v rows, 4 ancestors each (rows
    near both ends and either side of both boundaries checked against ref_attend in fp64). Needs ~47 GB."""
    import gc

    from test_fused import assert_errs

    H, de, a = 12, 64, 4
    D = H * de
    R = 2 ** 31 // D + 64
    gpu_bytes(22 * R * D + (2 << 30))  # big (3D bf16) + dout + dq (bf16) + fp32 dk/dv buffers + their bf16 copies
    errs, stray = _prefix_beyond_int32(R, H, de, a)
    gc.collect()  # (the big tensors are gone before anything is asserted)
    assert stray == {"dq": 0, "dk": 0, "dv": 0}, f"nonzero gradient rows outside the checked nodes: {stray}"
    assert_errs(errs)


def test_offset_check_itself_small():
    """The GPU offset test's inputs, references and zero-elsewhere checks at a tiny size (fp32, limit at row 30
    of 61): they must pass here, so a GPU failure of that test means the offsets, not the test."""
    from test_fused import assert_errs

    errs, stray = _prefix_beyond_int32(61, 2, 8, 4, dev=DEV, lp=torch.float32, limit=30 * 3 * 16, e=5)
    assert stray == {"dq": 0, "dk": 0, "dv": 0}, stray
    assert_errs(errs)
