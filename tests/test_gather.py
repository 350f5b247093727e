"""The cache's Triton row gather (seqpe_kernels/ops/gather.py) equals index_select, bit for bit."""
import pytest
import torch

from seqpe_kernels.ops.gather import gather_rows

from conftest import HAS_CUDA

DEV = "cuda" if HAS_CUDA else "cpu"


@pytest.mark.parametrize("n_tab,D,M", [(7, 5, 13), (50, 384, 37), (33, 1030, 3), (4, 16, 0), (1, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gather_equals_index_select(n_tab, D, M, dtype):
    g = torch.Generator().manual_seed(n_tab * 1000 + D + M)
    tab = torch.randn(n_tab, D, generator=g).to(DEV, dtype)
    idx = torch.randint(0, n_tab, (M,), generator=g).to(DEV)
    out = gather_rows(tab, idx)
    assert out.shape == (M, D) and out.dtype == dtype
    assert torch.equal(out, tab.index_select(0, idx))


def test_gather_strided_table_rows():
    # a column slice of a wider table: row stride != D, column stride 1 (no copy expected)
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(20, 48, generator=g).to(DEV)
    tab = wide[:, 8:40]
    idx = torch.tensor([19, 0, 7, 7, 3], device=DEV)
    assert torch.equal(gather_rows(tab, idx), tab.index_select(0, idx))


def test_gather_opcheck():
    g = torch.Generator().manual_seed(2)
    tab = torch.randn(9, 24, generator=g).to(DEV)
    idx = torch.randint(0, 9, (11,), generator=g).to(DEV)
    torch.library.opcheck(torch.ops.seqpe.gather_rows.default, (tab, idx),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
def test_cache_uses_triton_gather_on_cuda(monkeypatch):
    from seqpe_kernels import SeqPE
    from seqpe_kernels.savings import cache as cache_mod
    from seqpe_kernels.ops import gather as gather_mod

    calls = []
    real = gather_mod.gather_rows
    monkeypatch.setattr(gather_mod, "gather_rows", lambda t, r: calls.append(r.numel()) or real(t, r))
    torch.manual_seed(0)
    m = SeqPE(64, 4, 4, num_layers=2).cuda().eval()
    c = cache_mod.SeqPECache(m, mode="dense", max_bytes=1 << 28)
    pos = torch.randint(0, 5000, (20000,), device="cuda")
    with torch.no_grad():
        c.precompute(range(5000))
        torch.testing.assert_close(c(pos), m(pos), rtol=1e-5, atol=1e-6)
    assert calls and calls[-1] == 20000


@pytest.mark.gpu
def test_gpu_gather_offsets_beyond_int32(gpu_bytes):
    """Table and output both past 2**31 elements (D=768 bf16, 2 796 266 table rows, 64 more output rows): rows at
    both ends and around the 2**31 boundaries of table and output, including table rows past the boundary
    gathered into the first output rows and vice versa, equal index_select bit for bit. Needs ~9 GB."""
    D = 768
    N = 2 ** 31 // D + 64
    M = N + 64
    gpu_bytes((N + M) * D * 2 + (1 << 30))
    equal = _gather_beyond_int32(N, M, D)  # the big tensors are gone before anything is asserted
    assert equal


def _gather_beyond_int32(N, M, D, dev="cuda", dtype=torch.bfloat16, limit=2 ** 31, k=256):
    edge = limit // D  # first row whose last element passes the limit (table and output alike)
    tab = torch.randn(N, D, device=dev, dtype=dtype)
    rows = torch.randint(0, N, (M,), device=dev)
    rows[:k] = torch.arange(N - k, N, device=dev)                 # table rows past the limit into the first out rows
    rows[-k:] = torch.arange(k, device=dev)                        # the first table rows into out rows past it
    rows[k:k + 9] = torch.arange(edge - 4, edge + 5, device=dev)  # either side of the table's boundary
    out = gather_rows(tab, rows)
    sel = torch.cat([torch.arange(0, 4 * k), torch.arange(M - 4 * k, M), torch.arange(edge - 4 * k, edge + 4 * k),
                     torch.randint(0, M, (16 * k,))]).clamp(0, M - 1).to(dev)
    return torch.equal(out[sel], tab.index_select(0, rows[sel]))


def test_offset_check_itself_small():
    """The GPU offset test's gather and row choice at a tiny size (limit 20 rows): its check must pass here."""
    assert _gather_beyond_int32(40, 48, 24, dev=DEV, dtype=torch.float32, limit=20 * 24, k=2)
