"""Layer 0's table gradient (seqpe_kernels.ops.table_grad) against ``embedding_dense_backward`` in fp64, over
positions of any base / digit count / dimension, widths crossing the kernel's column block, sequence counts
crossing its chunks, and every float dtype. The encoder-level parity (every parameter gradient against the
reference) is tests/test_encoder.py's."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqpe_kernels.encoder import table_rows
from seqpe_kernels.ops.table_grad import table_grad

from conftest import HAS_CUDA
from test_fused import rel

DEV = "cuda" if HAS_CUDA else "cpu"
# fp32 / fp64 sums against fp64: KERNEL_GUIDE §5; bf16 / fp16 outputs: one rounding of an fp32 sum
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -10}


@settings(max_examples=25, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
@given(M=st.integers(1, 60), K=st.integers(1, 4), base=st.integers(2, 12) | st.sampled_from([16, 32]),
       d=st.integers(1, 2),
       C=st.integers(1, 300), dt=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
       clamp=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_matches_embedding_backward(M, K, base, d, C, dt, clamp, seed):
    gen = torch.Generator().manual_seed(seed)
    L = K * d
    x = torch.randint(-5 if clamp else 0, base ** K + (5 if clamp else 0), (M, d), generator=gen)
    rows = table_rows(x.to(DEV), True, L, K, base, clamp)
    n = base * L + 1
    g = torch.randn(M, L + 1, C, generator=gen).to(DEV, dt)
    out = table_grad(g, rows, n, L)
    ref = torch.ops.aten.embedding_dense_backward(g.double(), rows, n, -1, False)
    assert out.shape == (n, C) and out.dtype == dt
    # error against the magnitude bound of each row's sum (a sum can cancel to ~0)
    scale = torch.ops.aten.embedding_dense_backward(g.double().abs(), rows, n, -1, False).max().clamp_min(1e-30)
    assert ((out.double() - ref).abs().max() / scale).item() <= TOL[dt]
    # acc_out (the encoders' call): the sums unrounded, in fp32 (fp64)
    acc = table_grad(g, rows, n, L, acc_out=True)
    acc_dt = torch.float64 if dt == torch.float64 else torch.float32
    assert acc.dtype == acc_dt and ((acc.double() - ref).abs().max() / scale).item() <= TOL[acc_dt]


def test_empty_and_shape_errors():
    rows = table_rows(torch.zeros(0, 1, dtype=torch.long, device=DEV), True, 3, 3, 10, False)
    out = table_grad(torch.zeros(0, 4, 7, device=DEV), rows, 31, 3)
    assert out.shape == (31, 7) and not out.any()
    with pytest.raises(ValueError, match="do not describe"):
        table_grad(torch.zeros(2, 4, 7, device=DEV), torch.zeros(2, 3, dtype=torch.long, device=DEV), 31, 3)


@settings(max_examples=30, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
@given(M=st.integers(0, 40), K=st.integers(1, 4), base=st.integers(2, 12), d=st.integers(1, 3),
       from_positions=st.booleans(), D=st.sampled_from([1, 8, 40]), transposed=st.booleans(),
       invalid=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_embedding_kernel_writes_the_table_rows(M, K, base, d, from_positions, D, transposed, invalid, seed):
    """The Triton encoder takes layer 0's table rows from the digit-embedding launch (with_rows) instead of
    table_rows' ~10 small ops: the same rows for every valid input (positions or digit ids, any strides), and
    rows in bounds for invalid ones (check_range=False; those sequences' embeddings are NaN). With with_table
    the same launch also writes the (digit, slot) table itself, bit for bit encoder.embedding_table's (whatever
    M: one program per sequence and at least one per table row)."""
    from seqpe_kernels.encoder import embedding_table
    from seqpe_kernels.ops.digit_embed import digit_embed_forward

    gen = torch.Generator().manual_seed(seed)
    L = K * d
    if from_positions:
        lo, hi = (-3, base ** K + 3) if invalid else (0, base ** K)
        x = torch.randint(lo, hi, (d, M) if transposed else (M, d), generator=gen)
    else:
        lo, hi = (-2, base + 2) if invalid else (0, base)
        x = torch.randint(lo, hi, (L, M) if transposed else (M, L), generator=gen)
    x = (x.t() if transposed else x).to(DEV)
    tok, pos, cls = (torch.randn(n, D, generator=gen).to(DEV) for n in (base, L, 1))
    dim = torch.randn(d, 1, D, generator=gen).to(DEV) if d > 1 else None
    h, rows = digit_embed_forward(x, tok, pos, dim, cls.view(1, 1, D), from_positions, K, with_rows=True)
    h_plain = digit_embed_forward(x, tok, pos, dim, cls.view(1, 1, D), from_positions, K)
    torch.testing.assert_close(h, h_plain, rtol=0, atol=0, equal_nan=True)
    h_t, rows_t, tab = digit_embed_forward(x, tok, pos, dim, cls.view(1, 1, D), from_positions, K, with_rows=True,
                                           with_table=True)
    torch.testing.assert_close(h_t, h, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(rows_t, rows) and torch.equal(tab, embedding_table(tok, pos, dim, cls, L, K, d))
    assert rows.shape == (M, L + 1) and rows.dtype == torch.int64
    ref = table_rows(x, from_positions, L, K, base, invalid)
    if from_positions:
        ok = ((x >= 0) & (x < base ** K)).all(1)
    else:
        ok = ((x >= 0) & (x < base)).all(1)
    assert torch.equal(rows[ok], ref[ok])
    assert ((rows >= 0) & (rows <= base * L)).all()
    assert torch.isnan(h[~ok]).all() and not torch.isnan(h[ok]).any()


@settings(max_examples=25, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
@given(M=st.integers(0, 9), K=st.integers(1, 3), base=st.integers(2, 10), H=st.sampled_from([1, 2, 3]),
       DH=st.sampled_from([4, 5, 8]), cls_only=st.booleans(), causal=st.booleans(), padded=st.booleans(),
       p=st.sampled_from([0.0, 0.3]), dt=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2 ** 31 - 1))
def test_attention_reads_layer0_table_by_index(M, K, base, H, DH, cls_only, causal, padded, p, dt, seed):
    """Layer 0's attention with q/k/v read from the (digit, slot) table by row index (rows=) gives exactly what
    it gives on the gathered [M, T, *] operands: the output, and per-token gradients of the same shapes (the
    full block's q/k/v and the CLS-only block's k/v; its q is a broadcast row either way)."""
    import torch.nn.functional as F

    from seqpe_kernels.ops.attention import tiny_attention_backward, tiny_attention_forward

    gen = torch.Generator().manual_seed(seed)
    L, D = K, H * DH
    T, n = L + 1, base * K + 1
    rows = table_rows(torch.randint(0, base ** K, (M, 1), generator=gen).to(DEV), True, L, K, base, False)
    pad = (torch.rand(M, T - 1, generator=gen) > 0.3).float().to(DEV) if padded else None
    seeds = torch.randint(0, 2 ** 31 - 1, (3,), generator=gen).to(DEV)
    sdiv = DH ** 0.5
    tab = torch.randn(n, (2 if cls_only else 3) * D, generator=gen).to(DEV, dt)
    gathered = F.embedding(rows, tab)
    q = torch.randn(1, 1, D, generator=gen).to(DEV, dt).expand(M, 1, D) if cls_only else None
    args_i = (q, tab) if cls_only else (tab, None)
    args_g = (q, gathered) if cls_only else (gathered, None)
    q_start, TQ = (T - 1, 1) if cls_only else (0, T)
    common = (pad, H, causal, q_start, sdiv, p, seeds, 1)
    out_i = tiny_attention_forward(*args_i, *common, rows=rows)
    out_g = tiny_attention_forward(*args_g, *common)
    assert out_i.shape == (M, TQ, D) and torch.equal(out_i, out_g)
    dout = torch.randn(M, TQ, D, generator=gen).to(DEV, dt)
    gi = tiny_attention_backward(dout, *args_i, *common, rows=rows)
    gg = tiny_attention_backward(dout, *args_g, *common)
    for a, b in zip(gi, gg):
        assert a.shape == b.shape and torch.equal(a, b)


@settings(max_examples=12, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
@given(M=st.integers(1, 5), K=st.integers(1, 4), H=st.integers(1, 2), DH=st.sampled_from([4, 5, 8]),
       dc=st.sampled_from([1, 2, 4, 8]), cls_only=st.booleans(), indexed=st.booleans(), causal=st.booleans(),
       padded=st.booleans(), p=st.sampled_from([0.0, 0.3]), dt=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2 ** 31 - 1))
def test_head_chunked_attention_variant_matches(M, K, H, DH, dc, cls_only, indexed, causal, padded, p, dt, seed):
    """benchmarks/tune_attention.py's experimental kernels (the head dimension walked in chunks of dc, to be timed
    against the package's on a GPU) compute what the package's kernels compute: outputs and gradients to the
    tolerance of a sum in another order, over full / CLS-only blocks, gathered or table-indexed operands, masks
    and dropout (the same Philox masks)."""
    import torch.nn.functional as F

    from conftest import benchmark_module
    from seqpe_kernels.ops.attention import tiny_attention_backward, tiny_attention_forward

    tune = benchmark_module("tune_attention")
    gen = torch.Generator().manual_seed(seed)
    base, L, D = 5, K, H * DH
    T, n = L + 1, base * K + 1
    rows = table_rows(torch.randint(0, base ** K, (M, 1), generator=gen).to(DEV), True, L, K, base, False)
    pad = (torch.rand(M, T - 1, generator=gen) > 0.3).float().to(DEV) if padded else None
    seeds = torch.randint(0, 2 ** 31 - 1, (3,), generator=gen).to(DEV)
    tab = torch.randn(n, (2 if cls_only else 3) * D, generator=gen).to(DEV, dt)
    first = tab if indexed else F.embedding(rows, tab)
    q = torch.randn(M, 1, D, generator=gen).to(DEV, dt) if cls_only else None
    args = (q, first) if cls_only else (first, None)
    kw = {"rows": rows} if indexed else {}
    common = (pad, H, causal, T - 1 if cls_only else 0, DH ** 0.5, p, seeds, 1)
    tol = 1e-5 if dt == torch.float32 else 1e-12
    out = tiny_attention_forward(*args, *common, **kw)
    out_dc = tune.forward_dc(dc, *args, *common, **kw)
    assert out_dc.shape == out.shape and rel(out_dc, out) <= tol
    dout = torch.randn(out.shape, generator=gen).to(DEV, dt)
    want = tiny_attention_backward(dout, *args, *common, **kw)
    for a, b in zip(tune.backward_dc(dc, dout, *args, *common, **kw), want):
        assert a.shape == b.shape and (b.numel() == 0 or rel(a, b) <= tol)


def test_tune_attention_sweep_runs(monkeypatch, capsys):
    """benchmarks/tune_attention.py's sweep (a device-call step) end to end at a tiny shape with its timer stubbed:
    the full block in the step's indexed form (q / k / v from the table by row), the CLS-only block, every warp
    setting, the chunked variant and the C++ kernels (when the extension loads) agree with each other."""
    from conftest import benchmark_module

    tune = benchmark_module("tune_attention")
    monkeypatch.setattr(tune, "DEVICE", DEV)
    monkeypatch.setattr(tune, "SHAPES", {"tiny": (3, 3, 8, 2, torch.float32, 7)})
    monkeypatch.setattr("triton.testing.do_bench", lambda fn, **kw: (fn(), 1e-3)[1])
    tune.main(["--shapes", "tiny", "--chunks", "4"])
    out = capsys.readouterr().out
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("tiny ")]
    kernels = {(r[1], r[2], r[3]) for r in rows}
    for block in ("full", "cls"):
        assert {(block, "pkg", w) for w in ("rule", "1", "2", "4", "8")} <= kernels, out
        assert {(block, "dc4", w) for w in ("1", "2")} <= kernels, out
        assert (block, "ext", "rule") in kernels or "(no ext rows" in out, out


def test_tune_attention_sweep_without_the_extensions_device_kernels(monkeypatch, capsys):
    """A library without kernels for the sweep's device (on the GPU: the CUDA sources did not build, so _ext.load()
    gives the CPU kernels alone, and a CUDA tensor makes each op raise NotImplementedError) drops the "ext" rows
    with the reason instead of ending the sweep at the first of them (the rest of both blocks unmeasured)."""
    from conftest import benchmark_module

    from seqpe_kernels import _ext

    class NoKernels:
        def __getattr__(self, name):
            def op(*a, **k):
                raise NotImplementedError(f"Could not run 'seqpe_ext::{name}' with arguments from this backend")
            return op

    tune = benchmark_module("tune_attention")
    monkeypatch.setattr(tune, "DEVICE", DEV)
    monkeypatch.setattr(tune, "SHAPES", {"tiny": (3, 3, 8, 2, torch.float32, 7)})
    monkeypatch.setattr("triton.testing.do_bench", lambda fn, **kw: (fn(), 1e-3)[1])
    monkeypatch.setattr(_ext, "load", lambda: NoKernels())
    monkeypatch.setattr(_ext, "status", lambda device_type="cpu": (False, "the C++ extension has no CUDA kernels"))
    tune.main(["--shapes", "tiny", "--chunks"])
    out = capsys.readouterr().out
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("tiny ")]
    assert "(no ext rows: the C++ extension has no CUDA kernels" in out, out
    for block in ("full", "cls"):
        assert {(r[1], r[2]) for r in rows if r[1] == block} == {(block, "pkg")}, out


def test_indexed_attention_rejects_bad_operands():
    from seqpe_kernels.ops.attention import tiny_attention_forward

    rows = table_rows(torch.tensor([[5], [17]], device=DEV), True, 2, 2, 10, False)
    tab = torch.randn(21, 3 * 8, device=DEV)
    with pytest.raises(ValueError, match="rows must be a contiguous int64"):
        tiny_attention_forward(tab, None, None, 2, True, 0, 2.0, 0.0, None, 0, rows=rows.int())
    with pytest.raises(ValueError, match="indexed q must be a"):
        tiny_attention_forward(tab.view(1, 21, 24), None, None, 2, True, 0, 2.0, 0.0, None, 0, rows=rows)
    with pytest.raises(ValueError, match="pad_mask must be"):
        tiny_attention_forward(tab, None, torch.ones(2, 3, device=DEV), 2, True, 0, 2.0, 0.0, None, 0, rows=rows)
    with pytest.raises(ValueError, match="does not divide"):
        tiny_attention_forward(tab, None, None, 3, True, 0, 2.0, 0.0, None, 0, rows=rows)


@settings(max_examples=40, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
@given(M=st.integers(0, 30), K=st.integers(1, 5), base=st.integers(2, 16), d=st.integers(1, 3),
       from_positions=st.booleans(), clamp=st.booleans(), transposed=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_extension_table_rows_match(M, K, base, d, from_positions, clamp, transposed, seed):
    """seqpe_ext::table_rows (the C++/CUDA encoder's layer-0 rows: a loop on CPU, one kernel on CUDA, both from
    csrc/seqpe_ext.h's table_row) equals encoder.table_rows' ATen ops: positions or digit ids, any strides,
    negative and too-large inputs (clamped when unvalidated, as the encoder passes clamp)."""
    from conftest import require_ext

    from seqpe_kernels import _ext

    require_ext(torch.device(DEV).type)
    ops = _ext.load()
    gen = torch.Generator().manual_seed(seed)
    L = K * d
    n_cols = d if from_positions else L
    if from_positions:
        lo, hi = (-3 * base ** K, 3 * base ** K) if clamp else (0, base ** K)
    else:
        lo, hi = (-3, base + 3) if clamp else (0, base)
    x = torch.randint(lo, hi, (n_cols, M) if transposed else (M, n_cols), generator=gen)
    x = (x.t() if transposed else x).to(DEV)
    got = ops.table_rows(x, L, K, base, from_positions, clamp)
    assert torch.equal(got, table_rows(x, from_positions, L, K, base, clamp))


@settings(max_examples=25, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
@given(M=st.integers(0, 70), K=st.integers(1, 3), base=st.sampled_from([2, 10, 16, 60]), d=st.integers(1, 2),
       C=st.sampled_from([1, 7, 128, 200]), dt=st.sampled_from([torch.float32, torch.float64, torch.bfloat16,
                                                                  torch.float16]), seed=st.integers(0, 2 ** 31 - 1))
def test_extension_table_grad_matches_embedding_backward(M, K, base, d, C, dt, seed):
    """seqpe_ext::table_grad (the C++/CUDA encoder's layer-0 table gradient on CUDA: one pass over g in its own
    dtype, per-digit accumulators in shared memory, chunks added in order) against embedding_dense_backward in
    fp64, as the Triton kernel is held above: bases up to 60 (the shared-memory path; larger ones fall back to
    ATen), column counts crossing its 128-column blocks, sequence counts crossing its chunks, every dtype."""
    from conftest import require_ext

    from seqpe_kernels import _ext

    require_ext(torch.device(DEV).type)
    ops = _ext.load()
    gen = torch.Generator().manual_seed(seed)
    L = K * d
    rows = table_rows(torch.randint(0, base ** K, (M, d), generator=gen).to(DEV), True, L, K, base, False)
    n = base * L + 1
    g = torch.randn(M, L + 1, C, generator=gen).to(DEV, dt)
    out = ops.table_grad(g, rows, n, L)
    ref = torch.ops.aten.embedding_dense_backward(g.double().view(-1, C), rows.view(-1), n, -1, False)
    assert out.shape == (n, C) and out.dtype == dt
    scale = torch.ops.aten.embedding_dense_backward(g.double().abs().view(-1, C), rows.view(-1), n, -1,
                                                    False).max().clamp_min(1e-30)
    assert ((out.double() - ref).abs().max() / scale).item() <= TOL[dt]
    acc = ops.table_grad(g, rows, n, L, True)  # acc_out: the encoder's call, sums unrounded in fp32 (fp64)
    acc_dt = torch.float64 if dt == torch.float64 else torch.float32
    assert acc.dtype == acc_dt and ((acc.double() - ref).abs().max() / scale).item() <= TOL[acc_dt]


@pytest.mark.parametrize("impl", ["triton", "ext"])
@settings(max_examples=25, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
@given(M=st.integers(0, 80), K=st.integers(1, 3), base=st.sampled_from([2, 10, 16]), d=st.integers(1, 3),
       D=st.sampled_from([1, 7, 130, 300]), from_positions=st.booleans(), with_tab=st.booleans(),
       dt=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), seed=st.integers(0, 2 ** 31 - 1))
def test_embedding_backward_folds_the_table_gradient(impl, M, K, base, d, D, from_positions, with_tab, dt, seed):
    """The digit-embedding backward with table_grad (both encoders' last backward step: layer 0's table gradient
    folded into the token / slot / dimension / CLS gradients inside the op -- Triton: in its output launch;
    C++/CUDA: seqpe_ext::digit_embed_bwd, one kernel writing all four on CUDA, both devices from csrc/seqpe_ext.h's
    embed_grad_out) against the same sums in fp64 with ATen ops: digit ids or positions, 1-3 dimensions,
    sequence counts crossing the partial chunks, widths crossing the column blocks, and without a table
    gradient."""
    gen = torch.Generator().manual_seed(seed)
    L, T = K * d, K * d + 1
    if from_positions:
        x = torch.randint(0, base ** K, (M, d), generator=gen)
        digits = torch.stack([(x[:, a:a + 1] // base ** torch.arange(K - 1, -1, -1)) % base for a in range(d)],
                             1).reshape(M, L)
    else:
        x = digits = torch.randint(0, base, (M, L), generator=gen)
    g = torch.randn(M, T, D, generator=gen).to(dt)
    tg = torch.randn(base * L + 1, D, generator=gen) if with_tab else None
    if impl == "ext":
        from conftest import require_ext

        from seqpe_kernels import _ext

        require_ext(torch.device(DEV).type)
        fn = _ext.load().digit_embed_bwd
    else:
        from seqpe_kernels.ops.digit_embed import digit_embed_backward as fn
    got = fn(g.to(DEV), x.to(DEV), from_positions, K, base, d, tg.to(DEV) if with_tab else None)
    g64 = g.double()
    want_tok = torch.zeros(base, D, dtype=torch.float64).index_add_(0, digits.reshape(-1),
                                                                    g64[:, :L].reshape(-1, D))
    want_pos = g64[:, :L].sum(0)
    want_cls = g64[:, L].sum(0).view(1, 1, D)
    if with_tab:
        body = tg.double()[:-1].view(base, L, D)
        want_tok += body.sum(1)
        want_pos += body.sum(0)
        want_cls += tg.double()[-1].view(1, 1, D)
    want_dim = want_pos.view(d, K, D).sum(1, keepdim=True)
    dtok, dpos, ddim, dcls = got
    assert dtok.shape == (base, D) and dpos.shape == (L, D) and dcls.shape == (1, 1, D)
    assert ddim.shape == ((d, 1, D) if d > 1 else (0,))
    assert all(t.dtype == dt and t.device.type == torch.device(DEV).type for t in got)
    scale = max(g64.abs().sum((0, 1)).max().item() + (tg.abs().sum(0).max().item() if with_tab else 0), 1e-30)
    pairs = [(dtok, want_tok), (dpos, want_pos), (dcls, want_cls)] + ([(ddim, want_dim)] if d > 1 else [])
    for out, want in pairs:
        assert ((out.cpu().double() - want).abs().max() / scale).item() <= TOL[dt], (impl, out.shape)


@pytest.mark.parametrize("impl", ["triton", "ext"])
def test_layer0_ops_refuse_inconsistent_shapes(impl):
    """table_rows / table_grad / the digit-embedding backward with a table gradient refuse shapes that do not
    describe a (digit, slot) table, with the reason. Apart from the correctness tests above on purpose: on the
    leased GPU machines (H100, H200) an error raised inside the C++/CUDA extension has ended the process with
    SIGSEGV (benchmarks/results/NOTES.md), which must not stop the correctness checks from running."""
    K, base, d, M, D = 2, 10, 1, 5, 8
    L, T = K * d, K * d + 1
    x = torch.randint(0, base ** K, (M, d), device=DEV)
    g = torch.randn(M, T, D, device=DEV)
    tg = torch.randn(base * L + 1, D, device=DEV)
    if impl == "ext":
        from conftest import require_ext

        from seqpe_kernels import _ext

        require_ext(torch.device(DEV).type)
        ops = _ext.load()
        rows = ops.table_rows(x, L, K, base, True, False)
        with pytest.raises(RuntimeError, match="columns for L"):
            ops.table_rows(x, L + 1, K, base, True, False)
        with pytest.raises(RuntimeError, match="do not describe a"):
            ops.table_grad(g, rows, base * L + 1, L + 1)
        with pytest.raises(RuntimeError, match="table_grad must be"):
            ops.digit_embed_bwd(g, x, True, K, base, d, tg[1:])
    else:
        from seqpe_kernels.ops.digit_embed import digit_embed_backward

        rows = table_rows(x, True, L, K, base, False)
        with pytest.raises(ValueError, match="do not describe"):
            table_grad(g, rows, base * L + 1, L + 1)
        with pytest.raises(ValueError, match="table_grad must be"):
            digit_embed_backward(g, x, True, K, base, d, tg[1:])


# ----------------------------------------------------------------- the backward reductions' tiles and chunks
# On CPU num_sms() is 2, so the launchers make one chunk of one tile: these tests shrink the tiles and pretend to
# have more SMs, so sequences / rows cross tiles inside a program and chunks across programs, and columns cross
# the column blocks (sizes not multiples of any block). A kernel's own fp32 -> bf16 store rounds to nearest on the
# GPU (error <= 2^-8 of the value) but truncates under the interpreter (its bf16 cast, < 2^-7): HALF_TOL says so.
HALF_TOL = {torch.bfloat16: 2 ** -8 if HAS_CUDA else 2 ** -7, torch.float16: 2 ** -10}
def _small_blocks(monkeypatch, module, sms, **blocks):
    import importlib

    mod = importlib.import_module(f"seqpe_kernels.ops.{module}")
    monkeypatch.setattr(mod, "num_sms", lambda device: sms)
    for k, v in blocks.items():
        monkeypatch.setattr(mod, k, v)


@settings(max_examples=25, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(M=st.sampled_from([0, 1, 15, 16, 17, 33, 70]), K=st.integers(1, 3), base=st.sampled_from([2, 10, 17]),
       d=st.integers(1, 2), C=st.sampled_from([1, 15, 17, 40]), sms=st.sampled_from([1, 3, 40]),
       dt=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2 ** 31 - 1))
def test_table_grad_across_tiles_and_chunks(monkeypatch, M, K, base, d, C, sms, dt, seed):
    """_table_grad's one-hot product per [BLOCK_M, BLOCK_C] tile, several tiles per chunk and several chunks
    (16-sequence tiles, 16-column blocks, up to 40 'SMs'), against embedding_dense_backward in fp64; bases
    whose digit rows plus CLS need 32 one-hot rows (17)."""
    _small_blocks(monkeypatch, "table_grad", sms, _BLOCK_M=16, _BLOCK_C=16)
    gen = torch.Generator().manual_seed(seed)
    L = K * d
    rows = table_rows(torch.randint(0, base ** K, (M, d), generator=gen).to(DEV), True, L, K, base, False)
    n = base * L + 1
    g = torch.randn(M, L + 1, C, generator=gen).to(DEV, dt)
    ref = torch.ops.aten.embedding_dense_backward(g.double().view(-1, C), rows.view(-1), n, -1, False)
    scale = torch.ops.aten.embedding_dense_backward(g.double().abs().view(-1, C), rows.view(-1), n, -1,
                                                    False).max().clamp_min(1e-30)
    for acc_out in (False, True):
        out = table_grad(g, rows, n, L, acc_out=acc_out)
        want = (torch.float64 if dt == torch.float64 else torch.float32) if acc_out else dt
        assert out.shape == (n, C) and out.dtype == want
        assert ((out.double() - ref).abs().max() / scale).item() <= TOL[want]


def _embed_grads64(g, x, from_positions, K, base, d, tab):
    """The digit embedding's parameter gradients in fp64 by plain indexing: token digit b sums the valid tokens
    with digit b, slot j all tokens at j, CLS the last token, dimension a its K slots; plus the table gradient
    tab [base * L + 1, D] (row b * L + j, CLS last) folded in as the encoder does."""
    M, T, D = g.shape
    L = T - 1
    g = g.double()
    if from_positions:
        pw = base ** torch.arange(K - 1, -1, -1)
        xx = x.cpu().long().reshape(M, d)
        ok = ((xx >= 0) & (xx < base ** K)).repeat_interleave(K, 1)  # [M, L]
        dig = (xx.clamp(0, base ** K - 1)[:, :, None] // pw % base).reshape(M, L)
    else:
        dig = x.cpu().long()
        ok = (dig >= 0) & (dig < base)
    gc = g.cpu()
    dtok = torch.zeros(base, D, dtype=torch.float64)
    for j in range(L):
        sel = ok[:, j]
        dtok.index_add_(0, dig[sel, j], gc[sel, j])
    dpos = gc[:, :L].sum(0)
    dcls = gc[:, L].sum(0)
    if tab is not None:
        tb = tab.double().cpu()
        dtok += tb[:-1].view(base, L, D).sum(1)
        dpos += tb[:-1].view(base, L, D).sum(0)
        dcls += tb[-1]
    ddim = dpos.view(d, K, D).sum(1) if d > 1 else None
    return dtok, dpos, ddim, dcls


@settings(max_examples=25, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(M=st.sampled_from([0, 1, 15, 17, 40]), K=st.integers(1, 3), base=st.sampled_from([2, 10, 16]),
       d=st.integers(1, 2), D=st.sampled_from([1, 17, 40]), sms=st.sampled_from([1, 5, 40]),
       from_positions=st.booleans(), with_tab=st.booleans(), invalid=st.booleans(),
       dt=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2 ** 31 - 1))
def test_digit_embed_backward_across_tiles_and_chunks(monkeypatch, M, K, base, d, D, sms, from_positions, with_tab,
                                                       invalid, dt, seed):
    """_embed_bwd's per-slot one-hot product (digit rows and an all-ones row) over 16-sequence tiles, several per
    chunk and several chunks, 16-column blocks, and _embed_bwd_out's 4-row steps over the partials and the folded
    table gradient; positions or digit ids, out-of-range inputs (check_range=False: not in the token rows, still
    in the slot sums), every dtype; against fp64 indexing sums."""
    from seqpe_kernels.ops.digit_embed import digit_embed_backward

    _small_blocks(monkeypatch, "digit_embed", sms, _BWD_BM=16, _BWD_BD=16, _OUT_QB=4)
    gen = torch.Generator().manual_seed(seed)
    L = K * d
    if not from_positions:
        d = 1  # digit ids: the reference's one-dimensional layout
    if from_positions:
        lo, hi = (-3, base ** K + 3) if invalid else (0, base ** K)
        x = torch.randint(lo, hi, (M, d), generator=gen)
    else:
        lo, hi = (-2, base + 2) if invalid else (0, base)
        x = torch.randint(lo, hi, (M, L), generator=gen)
    g = torch.randn(M, L + 1, D, generator=gen).to(DEV, dt)
    tab = torch.randn(base * L + 1, D, generator=gen).to(DEV) if with_tab else None
    got = digit_embed_backward(g, x.to(DEV), from_positions, K, base, d, tab)
    ref = _embed_grads64(g, x, from_positions, K, base, d, tab)
    # error against each output's magnitude bound (the same sums of |g| and |tab|)
    bound = _embed_grads64(g.abs(), x, from_positions, K, base, d, tab.abs() if with_tab else None)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, **HALF_TOL}[dt]
    for name, a, r, s in zip(("tok", "pos", "dim", "cls"), got, ref, bound):
        if r is None:
            assert a.numel() == 0
            continue
        assert a.dtype == dt and a.numel() == r.numel(), name
        err = ((a.double().cpu().view_as(r) - r).abs().max() / s.max().clamp_min(1e-30)).item() if r.numel() else 0
        assert err <= tol, (name, err)


@settings(max_examples=20, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(R=st.sampled_from([1, 2, 15, 33, 100]), C=st.sampled_from([1, 15, 17, 40]), sms=st.sampled_from([1, 3, 40]),
       dt=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2 ** 31 - 1))
def test_gelu_bias_grad_across_tiles_and_programs(monkeypatch, R, C, sms, dt, seed):
    """_gelu_bwd_db's [BLOCK_R, BLOCK_C] tiles (8 rows in half / 4 in fp32 and fp64 here, 16 columns), several per
    program and several programs per column block: dz and the column sums of the unrounded dz against fp64
    (tests/test_bias_grads.py holds the kernel at its real blocks)."""
    from seqpe_kernels.ops.gelu import gelu_backward

    _small_blocks(monkeypatch, "gelu", sms, _DB_BLOCK_R=8, _DB_BLOCK_C=16)
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(R, C, generator=gen) * 2).to(DEV, dt)
    du = torch.randn(R, C, generator=gen).to(DEV, dt)
    dz, db = gelu_backward(du, z, True)
    z64, du64 = z.double(), du.double()
    t = torch.tanh(0.7978845608028654 * (z64 + 0.044715 * z64 ** 3))
    ref = du64 * (0.5 * (1 + t) + 0.5 * z64 * (1 - t * t) * 0.7978845608028654 * (1 + 3 * 0.044715 * z64 ** 2))
    acc_dt = torch.float64 if dt == torch.float64 else torch.float32
    assert dz.dtype == dt and db.dtype == acc_dt and db.shape == (C,)
    # |dz| <= 1.13 |du| (gelu' in [-0.17, 1.13]): one rounding of dz, relative to max |du| * 1.13
    tol_dz = {torch.float32: 1e-5, torch.float64: 1e-12, **HALF_TOL}[dt]
    assert ((dz.double() - ref).abs().max() / (1.13 * du64.abs().max())).item() <= tol_dz
    # the bias gradient sums the unrounded dz in fp32 (fp64): the accumulation dtype's tolerance
    assert ((db.double() - ref.sum(0)).abs().max() / du64.abs().sum(0).max()).item() <= TOL[acc_dt]
