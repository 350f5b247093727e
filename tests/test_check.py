"""`seqpe-kernels check`'s verdicts and report (seqpe_kernels/check.py), against kernels broken by small amounts.

The CLI tests break kernels by 1e-2; a mutation campaign (2026-12-02) showed that left check's tolerances, its
max-abs error, its inference-mode comparison, its missing-gradient check and its table unguarded. Each test here
fails on one such mutant (a check that would pass a wrong kernel or report the wrong quantity). CPU, seconds."""
import io

import torch

from conftest import current_seed
from seqpe_kernels import check
from seqpe_kernels.check import CheckCase, CheckRow, ErrStats, Quantity, format_check_table, judge_two_error

# one tiny case (M prime, causal, no dropout): a run_check of it with the torch backend takes well under a second
TINY = CheckCase("tiny", dict(embed_dim=16, num_heads=2, max_digits=3, data_dim=1, out_dim=8,
                              attn_direction="causal", resid_pdrop=0.0, attn_pdrop=0.0), 7)


def _check_with_broken_fused(monkeypatch, wrap=None, edit=None):
    """run_check (torch backend, TINY) with the fused module's output passed through ``wrap`` / the module edited
    by ``edit``; returns (ok, printed table)."""
    real = check._fused_from

    def broken(ref, backend):
        m = real(ref, backend)
        if edit is not None:
            edit(m)
        if wrap is not None:
            fwd = m.forward
            m.forward = lambda pos, *a, **k: wrap(fwd(pos, *a, **k))
        return m

    monkeypatch.setattr(check, "_fused_from", broken)
    return _run_tiny()


def _run_tiny():
    """run_check of TINY on the torch backend: (ok, printed table)."""
    buf = io.StringIO()
    ok = check.run_check(device="cpu", backends=["torch"], cases=[TINY], seed=current_seed() % 2 ** 31, file=buf)
    return ok, buf.getvalue()


def test_check_clean_tiny_case_passes(monkeypatch):
    ok, table = _check_with_broken_fused(monkeypatch)
    assert ok, table


def test_check_fails_a_fused_output_5e_5_off(monkeypatch):
    """FP32_RTOL is 1e-5 of max|ref| (KERNEL_GUIDE §5): a fused path 5e-5 off in every element is a defect
    (mutant: FP32_RTOL 1e-4 passed it; the suite's own broken kernels were 1e-2 off)."""
    ok, table = _check_with_broken_fused(monkeypatch, wrap=lambda y: y * (1 + 5e-5))
    assert not ok and "check FAILED" in table, table


def test_check_fails_a_reference_5e_5_off_its_fp64_run(monkeypatch):
    """The reference-fp64 rows hold the fp32 reference to FP64_RTOL = 1e-5 (mutant: 1e-4 passed a reference
    5e-5 off its fp64 run). The perturbation is a forward hook on fp32 outputs only (the fp64 copy is exact)."""
    real = check._random_module

    def perturbed(case, device, gen):
        ref = real(case, device, gen)
        ref.register_forward_hook(lambda m, i, out: out * (1 + 5e-5) if out.dtype == torch.float32 else out)
        return ref

    monkeypatch.setattr(check, "_random_module", perturbed)
    ok, table = _run_tiny()
    rows = [ln for ln in table.splitlines() if ln.startswith("reference-fp64")]
    assert not ok and rows and all(" FAIL" in ln for ln in rows), table


def test_check_fails_one_wrong_element(monkeypatch):
    """The error is the max-abs error: one output element 2e-4 x max|ref| off must fail (mutant: mean-abs error
    averaged it away over the M x O elements)."""
    def one_off(y):
        bump = torch.zeros_like(y)
        bump[0, 0] = 2e-4 * float(y.detach().abs().max())  # 20x the bound; / 56 elements: 0.36x
        return y + bump

    ok, table = _check_with_broken_fused(monkeypatch, wrap=one_off)
    assert not ok and "failing: out" in table, table


def test_check_fails_a_wrong_inference_mode_output(monkeypatch):
    """The eval inference_mode forward is compared with the reference's (mutant: compared with itself, so an
    inference-only defect passed)."""
    ok, table = _check_with_broken_fused(monkeypatch,
                                         wrap=lambda y: y * 1.001 if torch.is_inference_mode_enabled() else y)
    assert not ok and "failing: nograd" in table, table


def test_check_fails_a_missing_parameter_gradient(monkeypatch):
    """A parameter that gets no gradient from the fused path fails the row (mutant: it was silently skipped)."""
    ok, table = _check_with_broken_fused(monkeypatch, edit=lambda m: m.out_proj.bias.requires_grad_(False))
    assert not ok and "no gradient for out_proj.bias" in table, table


def _judged(neg_spike: float):
    dtype = torch.bfloat16
    eps = torch.finfo(dtype).eps
    gen = torch.Generator().manual_seed(current_seed())
    st = {}
    for q in range(4):
        ref = torch.randn(64, generator=gen, dtype=torch.float64)
        unit = eps * ref.abs().max().item()
        t = (torch.rand(64, generator=gen, dtype=torch.float64) * 2 - 1) * 0.3 * unit
        f = (torch.rand(64, generator=gen, dtype=torch.float64) * 2 - 1) * 0.3 * unit
        if q == 0:
            f[7] = -neg_spike * unit
        st[f"q{q}"] = ErrStats.of(ref + f, ref + t, ref)
    return {q.name: q for q in judge_two_error(st, dtype)}


def test_two_error_judgement_sees_a_negative_error():
    """A fused element 10 eps x max|ref| BELOW the reference fails like one above it (mutant: ErrStats.of without
    abs: the signed maximum never saw a negative error)."""
    q = _judged(10.0)["q0"]
    assert not q.ok and q.err >= 9.0 * torch.finfo(torch.bfloat16).eps * q.scale, q


def test_err_stats_merge_keeps_the_worst_draw_either_order():
    """Pooling draws keeps the maxima of every draw (mutant: merge kept only the last draw's fused max, so
    check_two_error_rule's pooled judgement forgot an earlier bad draw)."""
    gen = torch.Generator().manual_seed(current_seed())
    ref = torch.randn(32, generator=gen, dtype=torch.float64)
    big = ErrStats.of(ref + 1e-2 * torch.randn(32, generator=gen, dtype=torch.float64),
                      ref + 1e-2 * torch.randn(32, generator=gen, dtype=torch.float64), ref)
    small = ErrStats.of(ref + 1e-6, ref + 1e-6, ref)
    for m in (big.merge(small), small.merge(big)):
        assert m.f_max == big.f_max and m.t_max == big.t_max and m.n == 64
        assert abs(m.f_sq - (big.f_sq + small.f_sq)) <= 1e-12 * big.f_sq


def test_table_worst_grad_column_is_the_worst_gradient():
    """The 'worst grad err' column reports the gradient with the largest err / bound (mutants: the worst
    non-gradient quantity, or the smallest ratio)."""
    qs = [Quantity("out", 1e-7, 1e-5, 1.0), Quantity("nograd", 3e-7, 1e-5, 1.0),
          Quantity("grad:small", 1e-8, 1e-5, 1.0), Quantity("grad:bad", 4e-5, 2e-5, 2.0),
          Quantity("grad:mid", 5e-6, 1e-5, 1.0)]
    row = CheckRow("cpu", "tiny", "fp32", "FAIL", qs)
    assert row.worst(grads=True).name == "grad:bad" and row.worst(grads=False).name == "nograd"
    line = next(ln for ln in format_check_table([row], torch.device("cpu"), 1, {}, 0.1).splitlines()
                if ln.startswith("cpu "))
    f = line.split()
    # backend case dtype out-err bound nograd worst-grad-err bound (parameter) result
    assert f[3:9] == ["1.00e-07", "1.00e-05", "3.00e-07", "4.00e-05", "2.00e-05", "bad"], line


def test_table_counts_a_failed_comparison_as_a_comparison():
    """'backends compared against the reference' counts FAIL rows as comparisons (mutant: as skipped)."""
    rows = [CheckRow("torch", "a", "fp32", "FAIL", [Quantity("out", 1.0, 0.5, 1.0)]),
            CheckRow("torch", "b", "fp32", "pass", [Quantity("out", 0.1, 0.5, 1.0)]),
            CheckRow("torch", "c", "-", "skipped", note="n/a")]
    table = format_check_table(rows, torch.device("cpu"), 1, {}, 0.1)
    assert "torch (2 comparisons, 1 skipped)" in table and "1 passed, 1 failed, 1 skipped" in table, table


def test_mask_rates_hold_each_site_to_its_own_p():
    """Attention masks are held to attn_pdrop and residual masks to resid_pdrop (mutant: swapped; every default
    check case has both at 0.1, so only a module with different rates shows it)."""
    from seqpe_kernels import SeqPE

    m = SeqPE(32, 2, 3, num_layers=2, resid_pdrop=0.1, attn_pdrop=0.3)
    g = torch.Generator().manual_seed(current_seed())
    M, T, D, H = 64, 4, 32, 2
    masks = {}
    for i in range(2):
        masks[f"attn{i}"] = (torch.rand(M, H, T, T, generator=g) >= 0.3).float()
        for site in ("resid_attn", "resid_mlp"):
            masks[f"{site}{i}"] = (torch.rand(M, T, D, generator=g) >= 0.1).float()
    assert check._mask_rates(m, masks) == ""
    masks["attn0"] = (torch.rand(M, H, T, T, generator=g) >= 0.1).float()  # attention dropping resid's rate
    assert "attn0 drops" in check._mask_rates(m, masks)
