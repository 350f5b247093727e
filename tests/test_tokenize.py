"""Position -> digit sequence (SEQPE_SPEC §1): the spec's example tables, properties against a naive
string-based encoder, dtypes/devices, and every bad input."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqpe_kernels.reference import check_positions, max_digits_for, num_digits, tokenize

ALPHABET = "0123456789abcdef"



# --------------------------------------------------------------------------------------- naive encoder
def naive_pos2seq(p: int, K: int, base: int = 10):
    """One axis, the authors' way (§1.3): the digit string of p, left-padded with the digit 0."""
    s = str(p) if base == 10 else ""
    if base != 10:
        n = p
        while True:
            s = ALPHABET[n % base] + s
            n //= base
            if n == 0:
                break
    assert len(s) <= K
    z = K - len(s)
    return [0] * z + [int(c, 16) for c in s], [0.0] * z + [1.0] * len(s)


def naive_tokenize(rows, K: int, base: int = 10):
    digits, masks = [], []
    for row in rows:
        d, m = [], []
        for p in (row if isinstance(row, (list, tuple)) else [row]):
            dd, mm = naive_pos2seq(p, K, base)
            d += dd
            m += mm
        digits.append(d)
        masks.append(m)
    return digits, masks


# --------------------------------------------------------------------------------------- spec tables
@pytest.mark.parametrize("p, digits, mask", [
    (0, "00000", "00001"),
    (7, "00007", "00001"),
    (123, "00123", "00111"),
    (19999, "19999", "11111"),
])
def test_spec_table_1d_k5(p, digits, mask):
    d, m = tokenize(torch.tensor([p]), 5)
    assert d.tolist() == [[int(c) for c in digits]]
    assert m.tolist() == [[float(c) for c in mask]]


@pytest.mark.parametrize("pos, digits, mask", [
    ((3, 12), "0312", "0111"),
    ((99, 5), "9905", "1101"),
])
def test_spec_table_2d_k2(pos, digits, mask):
    d, m = tokenize(torch.tensor([pos]), 2, data_dim=2)
    assert d.tolist() == [[int(c) for c in digits]]
    assert m.tolist() == [[float(c) for c in mask]]
    # without data_dim the trailing dimension decides
    d2, m2 = tokenize(torch.tensor([pos]), 2)
    assert torch.equal(d, d2) and torch.equal(m, m2)


def test_spec_tables_batched_rows_keep_order():
    pos = torch.tensor([0, 7, 123, 19999])
    d, m = tokenize(pos, 5)
    assert ["".join(map(str, r)) for r in d.tolist()] == ["00000", "00007", "00123", "19999"]
    assert ["".join(str(int(x)) for x in r) for r in m.tolist()] == ["00001", "00001", "00111", "11111"]


@pytest.mark.parametrize("max_position, data_dim, K", [
    (20000, 1, 5),   # "19999"
    (10000, 2, 2),   # sqrt = 100 -> "99"
    (10000, 1, 4),   # "9999"
    (10001, 1, 5),   # "10000"
    (1, 1, 1),       # "0"
    (11, 1, 2),      # "10"
    (10, 1, 1),      # "9"
    (10201, 2, 3),   # sqrt = 101 -> "100"
    (9999, 2, 2),    # isqrt(9999) = 99 -> "98"
])
def test_max_digits_table(max_position, data_dim, K):
    assert max_digits_for(max_position, data_dim) == K
    # the authors' rule written out
    top = max_position - 1 if data_dim == 1 else int(max_position ** 0.5) - 1
    assert K == len(str(top))


def test_max_digits_other_base_and_num_digits():
    assert max_digits_for(256, 1, base=16) == 2      # 255 = "ff"
    assert max_digits_for(257, 1, base=16) == 3      # 256 = "100"
    assert max_digits_for(16, 1, base=2) == 4        # 15 = "1111"
    assert num_digits(0) == 1 and num_digits(9) == 1 and num_digits(10) == 2 and num_digits(99999) == 5
    assert num_digits(7, base=2) == 3 and num_digits(8, base=2) == 4


def test_max_digits_bad_inputs():
    with pytest.raises(ValueError, match="max_position must be >= 1"):
        max_digits_for(0)
    with pytest.raises(ValueError, match="data_dim 1 or 2"):
        max_digits_for(1000, 3)
    with pytest.raises(ValueError, match="non-negative"):
        num_digits(-1)


# --------------------------------------------------------------------------------------- properties
@st.composite
def _cases(draw):
    base = draw(st.integers(2, 16))
    K = draw(st.integers(1, 6))
    data_dim = draw(st.integers(1, 3))
    M = draw(st.integers(0, 12))
    top = base ** K
    # mix: uniform positions, short ones (many pad digits), and the boundaries base^k - 1, base^k
    edge = st.sampled_from(sorted({0, top - 1} | {base ** k for k in range(K)} | {base ** k - 1 for k in range(1, K + 1)}))
    short = st.integers(0, K).flatmap(lambda k: st.integers(0, base ** k - 1))
    coord = st.one_of(st.integers(0, top - 1), short, edge)
    rows = draw(st.lists(st.lists(coord, min_size=data_dim, max_size=data_dim), min_size=M, max_size=M))
    as_1d = data_dim == 1 and draw(st.booleans())
    return base, K, data_dim, rows, as_1d


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_cases())
def test_tokenize_matches_naive_string_encoder(case):
    base, K, data_dim, rows, as_1d = case
    M = len(rows)
    if as_1d:
        pos = torch.tensor([r[0] for r in rows], dtype=torch.int64).reshape(M)
    else:
        pos = torch.tensor(rows, dtype=torch.int64).reshape(M, data_dim)
    d, m = tokenize(pos, K, base=base, data_dim=data_dim)
    nd, nm = naive_tokenize([tuple(r) for r in rows], K, base)
    assert d.shape == (M, data_dim * K) and m.shape == (M, data_dim * K)
    assert d.dtype == torch.int64 and m.dtype == torch.float32
    assert d.tolist() == nd
    assert m.tolist() == nm
    # invariants: digits in range; mask is 0...0 1...1 per axis with at least one real digit;
    # with padding unmasked the digits are the fixed-width representation (value reconstructs)
    if M:
        assert int(d.min()) >= 0 and int(d.max()) < base
        ax = m.reshape(M, data_dim, K)
        assert bool((ax[..., -1] == 1).all())
        assert bool((ax[..., 1:] >= ax[..., :-1]).all())
        weights = base ** torch.arange(K - 1, -1, -1)
        values = (d.reshape(M, data_dim, K) * weights).sum(-1)
        assert torch.equal(values, pos.reshape(M, data_dim))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 99999), min_size=1, max_size=30))
def test_base10_equals_authors_str_padding(ps):
    d, m = tokenize(torch.tensor(ps), 5)
    for row, mrow, p in zip(d.tolist(), m.tolist(), ps):
        assert "".join(map(str, row)) == str(p).zfill(5)
        assert sum(mrow) == len(str(p))


# --------------------------------------------------------------------------------------- dtypes / devices / M=0
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64])
def test_integer_input_dtypes(dtype):
    pos = torch.tensor([0, 5, 42, 99], dtype=dtype)
    d, m = tokenize(pos, 3)
    assert d.dtype == torch.int64 and m.dtype == torch.float32
    assert d.tolist() == [[0, 0, 0], [0, 0, 5], [0, 4, 2], [0, 9, 9]]
    assert m.tolist() == [[0, 0, 1], [0, 0, 1], [0, 1, 1], [0, 1, 1]]


def test_non_contiguous_input():
    base = torch.tensor([[3, 12], [99, 5]])
    strided = torch.tensor([[3, 0, 12], [99, 0, 5]])[:, ::2]
    assert not strided.is_contiguous()
    d1, m1 = tokenize(strided, 2, data_dim=2)
    d2, m2 = tokenize(base, 2, data_dim=2)
    assert torch.equal(d1, d2) and torch.equal(m1, m2)
    expanded = torch.tensor([[7, 42]]).expand(3, 2)  # stride-0 rows
    d3, _ = tokenize(expanded, 2, data_dim=2)
    assert d3.tolist() == [[0, 7, 4, 2]] * 3


def _check_device(device):
    pos = torch.tensor([[1, 22], [333, 4]], device=device)
    d, m = tokenize(pos, 3, data_dim=2)
    assert d.device == pos.device and m.device == pos.device
    assert d.cpu().tolist() == [[0, 0, 1, 0, 2, 2], [3, 3, 3, 0, 0, 4]]
    assert m.cpu().tolist() == [[0, 0, 1, 0, 1, 1], [1, 1, 1, 0, 0, 1]]


def test_output_device_follows_input_cpu():
    _check_device("cpu")


@pytest.mark.gpu
def test_output_device_follows_input_cuda():
    _check_device("cuda")


def test_output_device_follows_input_meta():
    # the meta device has no values: range checks must be switched off, shapes/dtypes/devices still follow
    pos = torch.empty(7, 2, dtype=torch.int64, device="meta")
    d, m = tokenize(pos, 4, data_dim=2, check_range=False)
    assert d.device.type == "meta" and m.device.type == "meta"
    assert d.shape == (7, 8) and d.dtype == torch.int64 and m.dtype == torch.float32


@pytest.mark.parametrize("shape, data_dim, K", [((0,), 1, 5), ((0, 1), 1, 3), ((0, 2), 2, 2), ((0, 3), 3, 4)])
def test_empty_batch(shape, data_dim, K):
    d, m = tokenize(torch.zeros(shape, dtype=torch.int64), K, data_dim=data_dim)
    assert d.shape == (0, data_dim * K) and m.shape == (0, data_dim * K)
    assert d.dtype == torch.int64 and m.dtype == torch.float32


def test_check_range_off_gives_same_result_on_valid_input():
    pos = torch.randint(0, 10 ** 4, (50, 2))
    a = tokenize(pos, 4, data_dim=2)
    b = tokenize(pos, 4, data_dim=2, check_range=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_check_positions_normalises_to_int64_2d():
    out = check_positions(torch.tensor([1, 2, 3], dtype=torch.int16), 2)
    assert out.dtype == torch.int64 and out.shape == (3, 1)


# --------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("positions, kwargs, exc, match", [
    (torch.tensor([1.0, 2.0]), {}, TypeError, r"integer dtype.*float32"),
    (torch.tensor([1.5]), {}, TypeError, "integer dtype"),
    (torch.tensor([1, 2], dtype=torch.float64), {}, TypeError, "integer dtype"),
    (torch.tensor([True, False]), {}, TypeError, r"integer dtype.*bool"),
    ([1, 2, 3], {}, TypeError, "must be a torch.Tensor"),
    (torch.tensor([3, -1]), {}, ValueError, r"non-negative.*-1"),
    (torch.tensor([[0, -5]]), {"data_dim": 2}, ValueError, "non-negative"),
    (torch.tensor([1000]), {}, ValueError, r"position 1000 needs more than max_digits=3"),
    (torch.tensor([[5, 1000]]), {"data_dim": 2}, ValueError, r"0\.\.999"),
    (torch.tensor([16]), {"base": 16, "max_digits": 1}, ValueError, "base-16"),
    (torch.tensor([[1, 2, 3]]), {"data_dim": 2}, ValueError, r"3 coordinate\(s\).*data_dim=2"),
    (torch.tensor([1, 2, 3]), {"data_dim": 2}, ValueError, r"1 coordinate\(s\).*data_dim=2"),
    (torch.tensor([[1, 2]]), {"data_dim": 1}, ValueError, r"data_dim=1"),
    (torch.zeros(2, 2, 2, dtype=torch.long), {}, ValueError, r"shape \[M\] or \[M, d\].*\(2, 2, 2\)"),
    (torch.tensor(5), {}, ValueError, r"shape \[M\] or \[M, d\]"),
    (torch.tensor([1]), {"base": 1}, ValueError, "base must be >= 2"),
    (torch.tensor([1]), {"max_digits": 0}, ValueError, "max_digits must be >= 1"),
    (torch.tensor([1]), {"max_digits": 40}, ValueError, "does not fit in int64"),
])
def test_bad_inputs(positions, kwargs, exc, match):
    kwargs = dict(kwargs)
    K = kwargs.pop("max_digits", 3)
    with pytest.raises(exc, match=match):
        tokenize(positions, K, **kwargs)


@settings(max_examples=100, deadline=None)
@given(_cases(), st.sampled_from(["list", "tuples", "numpy", "range"]))
def test_prepare_seqpe_data_takes_python_lists_as_tensors(case, form):
    """A Python list (ints, or tuples of ints for n-D; converted through numpy) gives what the same positions
    as an int64 tensor give."""
    import numpy as np

    from seqpe_kernels.reference.tokenize import prepare_seqpe_data

    base, K, data_dim, rows, _ = case
    if not rows:
        return
    t = torch.tensor(rows, dtype=torch.int64)
    if data_dim == 1:
        t = t.reshape(-1)
        raw = {"list": [r[0] for r in rows], "tuples": [r[0] for r in rows], "numpy": t.numpy(),
               "range": range(rows[0][0], rows[0][0] + 1)}[form]
        if form == "range":
            t = torch.tensor([rows[0][0]])
    else:
        raw = {"list": [list(r) for r in rows], "tuples": [tuple(r) for r in rows],
               "numpy": np.asarray(rows), "range": [tuple(r) for r in rows]}[form]
    want = prepare_seqpe_data(t, K, base=base)
    got = prepare_seqpe_data(raw, K, base=base)
    assert got[0].dtype == torch.int64 and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("raw", [[1.5, 2], [True, False], [(1, 2), (3,)], [2 ** 70], [-1, 2], ["7"]],
                         ids=["float", "bool", "ragged", "huge", "negative", "str"])
def test_prepare_seqpe_data_refuses_what_is_not_a_position(raw):
    from seqpe_kernels.reference.tokenize import prepare_seqpe_data

    with pytest.raises((TypeError, ValueError)):
        prepare_seqpe_data(raw, 5)
