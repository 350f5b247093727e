"""SeqPECache: equals recomputation, in sparse and dense mode, 1-D and 2-D, across every event that changes
the encoder (optimizer steps incl. fused ones, in-place edits, load_state_dict, dtype changes, train/eval
toggles, autocast) and across evictions."""
import pytest
import torch

from seqpe_kernels import SeqPE
from seqpe_kernels.savings.cache import SeqPECache
from seqpe_kernels.savings.dedup import prefix_shared_forward

RTOL = 1e-5


def make(d=1, K=3, D=32, H=4, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("resid_pdrop", 0.0)  # so train-mode toggles are cacheable
    m = SeqPE(D, H, K, data_dim=d, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m.eval()


def queries(d, seed=1):
    g = torch.Generator().manual_seed(seed)
    if d == 1:
        p = torch.randint(0, 1000, (120,), generator=g)
        return torch.cat([torch.arange(150, 260), p, p[:17]])  # inside and outside the dense box, dups
    p = torch.randint(0, 100, (60, 2), generator=g)
    return torch.cat([torch.cartesian_prod(torch.arange(8, 16), torch.arange(8, 16)), p, p[:9]])


def box(d):
    return range(0, 200) if d == 1 else (range(12), range(12))


def setup(mode, d, **kw):
    m = make(d=d)
    c = SeqPECache(m, mode=mode, **kw)
    with torch.no_grad():
        c.precompute(box(d))
    return m, c, queries(d)


def check(c, m, pos):
    with torch.no_grad():
        ref = m(pos)
        out = c(pos)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
    assert err <= RTOL, f"cache differs from recomputation: {err:.3g}"
    return out


MODES = [("sparse", 1), ("sparse", 2), ("dense", 1), ("dense", 2)]


@pytest.mark.parametrize("mode,d", MODES)
def test_equals_recompute_and_hits(mode, d):
    m, c, pos = setup(mode, d)
    check(c, m, pos)
    s1 = c.stats()
    assert s1["misses"] > 0 and s1["invalidations"] == 0
    check(c, m, pos)
    s2 = c.stats()
    assert s2["hits"] > s1["hits"]
    if mode == "sparse":  # every position is cached now: the second call computes nothing
        assert s2["computed"] == s1["computed"] and s2["misses"] == s1["misses"]
        # a 1-D encoder also takes [M, 1]
        if d == 1:
            check(c, m, pos.unsqueeze(1))
    else:  # dense: positions outside the box are recomputed each time (not stored)
        assert s2["misses"] - s1["misses"] == s1["misses"]
    # all-hit call: one gather
    inside = torch.arange(0, 200, 3) if d == 1 else torch.cartesian_prod(torch.arange(12), torch.arange(5))
    check(c, m, inside)
    before = c.stats()["computed"]
    check(c, m, inside)
    assert c.stats()["computed"] == before


def _opt_step(m, opt_cls, **kw):
    opt = opt_cls(m.parameters(), lr=1e-2, **kw)
    out = m(queries(m.data_dim, seed=3))
    (out ** 2).sum().backward()
    opt.step()
    opt.zero_grad()


def _inplace(m):
    with torch.no_grad():
        m.transformers[0].attn.c_attn.weight.mul_(1.3)


def _load(m):
    other = make(d=m.data_dim, seed=5)
    m.load_state_dict(other.state_dict())


def _load_assign(m):
    other = make(d=m.data_dim, seed=6)
    m.load_state_dict(other.state_dict(), assign=True)


def _set_data(m):
    m.out_proj.weight.data = torch.randn_like(m.out_proj.weight)


def _reset(m):
    m.reset_parameters()


EVENTS = {
    "adamw_foreach": lambda m: _opt_step(m, torch.optim.AdamW, foreach=True),
    "adam_fused": lambda m: _opt_step(m, torch.optim.Adam, fused=True),  # does not bump _version
    "sgd_fused": lambda m: _opt_step(m, torch.optim.SGD, fused=True, momentum=0.9),
    "sgd_plain": lambda m: _opt_step(m, torch.optim.SGD, foreach=False),
    "inplace_no_grad": _inplace,
    "load_state_dict": _load,
    "load_state_dict_assign": _load_assign,
    "param_data_assign": _set_data,
    "reset_parameters": _reset,
    "to_float64": lambda m: m.to(torch.float64),
    "temperature": lambda m: setattr(m, "temperature", 2.5),
    "forward_hook_added": lambda m: m.register_forward_hook(lambda mod, args, out: out * 2),
    "forward_pre_hook_added": lambda m: m.register_forward_pre_hook(lambda mod, args: (args[0] // 2,)),
}


@pytest.mark.parametrize("event", sorted(EVENTS))
@pytest.mark.parametrize("mode,d", MODES)
def test_invalidation_events(event, mode, d):
    m, c, pos = setup(mode, d)
    old = check(c, m, pos)
    check(c, m, pos)
    inv = c.stats()["invalidations"]
    EVENTS[event](m)
    with torch.no_grad():
        new_ref = m(pos)
    assert not torch.allclose(old.to(new_ref.dtype), new_ref), "event did not change the encoder"
    check(c, m, pos)
    assert c.stats()["invalidations"] == inv + 1
    check(c, m, pos)  # and caches again under the new state
    assert c.stats()["invalidations"] == inv + 1


@pytest.mark.parametrize("mode,d", MODES)
def test_replacement_at_the_freed_address_with_the_same_version(mode, d):
    """A parameter replaced by a new tensor that lands where the old one was freed, at the same version (the CUDA
    caching allocator hands a same-sized block straight back): data_ptr, _version, shape and dtype all equal, so
    the key matched and stale rows came back (0.58 off in the audit's repro). Deterministic here: both parameters
    are numpy-owned views of one buffer, the old one dropped before new values are written into the buffer."""
    import numpy as np

    m, c, pos = setup(mode, d)
    buf = m.out_proj.weight.detach().numpy().copy()
    m.out_proj.weight = torch.nn.Parameter(torch.from_numpy(buf))
    old = check(c, m, pos)
    check(c, m, pos)
    addr, ver = m.out_proj.weight.data_ptr(), m.out_proj.weight._version
    inv = c.stats()["invalidations"]
    m.out_proj.weight = None  # the old parameter and its storage are freed
    buf[:] = np.random.default_rng(0).standard_normal(buf.shape).astype(buf.dtype)
    m.out_proj.weight = torch.nn.Parameter(torch.from_numpy(buf))
    assert (m.out_proj.weight.data_ptr(), m.out_proj.weight._version) == (addr, ver)
    with torch.no_grad():
        assert not torch.allclose(old, m(pos))
    check(c, m, pos)
    assert c.stats()["invalidations"] == inv + 1


@pytest.mark.parametrize("mode,d", MODES)
def test_train_eval_toggle(mode, d):
    m, c, pos = setup(mode, d)
    check(c, m, pos)
    m.train()  # dropout probabilities are 0, so training mode is deterministic and cacheable
    check(c, m, pos)
    assert c.stats()["invalidations"] == 1
    m.eval()
    check(c, m, pos)
    assert c.stats()["invalidations"] == 2
    m.transformers[1].train()  # a submodule alone
    check(c, m, pos)
    assert c.stats()["invalidations"] == 3


@pytest.mark.parametrize("mode,d", [("sparse", 1), ("dense", 2)])
def test_autocast_changes_key(mode, d):
    m, c, pos = setup(mode, d)
    check(c, m, pos)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        ref = m(pos)
        out = c(pos)
    assert out.dtype == ref.dtype == torch.bfloat16
    # the bug this guards: the fp32 rows served cast to bf16. Those are ~1e-2 off the autocast recomputation; a
    # cache that recomputed under autocast is within a few bf16 roundings of it (0 on the dev CPU)
    with torch.no_grad():
        stale = m(pos).to(torch.bfloat16)
    err = lambda a: (a.double() - ref.double()).abs().max().item()  # noqa: E731
    assert err(stale) > 0 and err(out) <= 0.25 * err(stale), (err(out), err(stale))
    check(c, m, pos)  # and back in fp32
    assert c.stats()["invalidations"] == 2


@pytest.mark.parametrize("mode,d", MODES)
def test_data_edits_need_invalidate_or_verify(mode, d):
    # writes through `param.data` use a detached alias with its own version counter (documented)
    m, c, pos = setup(mode, d)
    check(c, m, pos)
    m.out_proj.bias.data.add_(1.0)
    c.invalidate()
    check(c, m, pos)
    m2, c2, _ = setup(mode, d, verify_values=True)
    check(c2, m2, pos)
    m2.out_proj.bias.data.add_(1.0)
    check(c2, m2, pos)
    assert c2.stats()["invalidations"] == 1


_DATA_EDITS = {  # edits through .data (no version bump) that keep a plain sum and sum of |x|
    "swap_rows": lambda m: m.token_of_seqpe_embed.weight.data.index_copy_(
        0, torch.tensor([0, 1]), m.token_of_seqpe_embed.weight.data[[1, 0]]),
    "permute": lambda m: m.out_proj.weight.data.copy_(m.out_proj.weight.data.flip(0).clone()),
    "transpose_square": lambda m: m.transformers[0].attn.c_proj.weight.data.copy_(
        m.transformers[0].attn.c_proj.weight.data.t().clone()),
}


@pytest.mark.parametrize("edit", list(_DATA_EDITS))
@pytest.mark.parametrize("mode,d", MODES)
def test_verify_values_sees_moved_entries(edit, mode, d):
    """verify_values fingerprinted with a sum and a sum of |x|, which any permutation keeps."""
    m, c, pos = setup(mode, d, verify_values=True)
    check(c, m, pos)
    before = c.stats()["invalidations"]
    w0 = [p.detach().clone() for p in m.parameters()]
    _DATA_EDITS[edit](m)
    assert any(not torch.equal(a, p) for a, p in zip(w0, m.parameters()))  # the edit changed a weight
    check(c, m, pos)
    assert c.stats()["invalidations"] == before + 1


@pytest.mark.parametrize("mode,d", MODES)
def test_inference_tensor_parameters_are_fingerprinted(mode, d):
    """Parameters made under inference_mode have no version counter: in-place updates (a checkpoint loaded, an
    add_) showed in no key."""
    with torch.inference_mode():
        m, c, pos = setup(mode, d)
        assert m.out_proj.weight.is_inference()
        check(c, m, pos)
        m.load_state_dict({k: v * 1.5 for k, v in m.state_dict().items()})
        check(c, m, pos)
        m.out_proj.bias.add_(1.0)
        check(c, m, pos)


def test_fingerprint_vectors_are_freed_with_the_cache():
    """verify_values' fingerprint vectors (float64, two per parameter size: 1.3x the parameters) lived in a
    module-level table for the life of the process, after every cache using them was gone."""
    import gc
    import weakref

    m, c, pos = setup("sparse", 1)
    c.verify_values = True
    check(c, m, pos)
    vectors = [weakref.ref(w) for w in c._fp_weights.values()]
    assert vectors and all(r() is not None for r in vectors)
    del c
    gc.collect()
    assert all(r() is None for r in vectors)


def test_dense_rows_wider_than_the_parameters_keep_the_bound_and_the_rows():
    """compute= returning float64 rows of an fp32 module: max_bytes was checked against the parameters' row size
    (exceeded silently), and a lookup whose compute re-laid out the table gathered with stale row indices."""
    m = make(K=3)
    row = m.out_dim * 8  # float64 rows
    c = SeqPECache(m, mode="dense", max_bytes=row * 120, compute=lambda mod, p: mod(p).double())
    with torch.no_grad():
        for box_ in (range(500, 550), range(0, 100), range(300, 320), range(0, 100)):
            c.precompute(box_)
            assert c.nbytes <= c.max_bytes
        m.out_proj.bias.add_(0.1)  # every box stale
        for pos in (torch.tensor([10, 20, 510, 520, 310]), torch.arange(0, 120), torch.tensor([999, 5, 315])):
            out, ref = c(pos), m(pos).double()
            assert out.dtype == torch.float64 and (out - ref).abs().max() <= RTOL * ref.abs().max()
            assert c.nbytes <= c.max_bytes


def test_sparse_eviction_bounded_and_correct():
    m = make()
    row = m.out_dim * 4 + 24
    c = SeqPECache(m, mode="sparse", max_bytes=100 * row)
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        pos = torch.randint(0, 1000, (70,), generator=g)
        check(c, m, pos)
        check(c, m, pos[:40])  # recently used rows are hits
        assert c.stats()["bytes"] <= c.max_bytes
    s = c.stats()
    assert s["evictions"] > 0 and 0 < s["entries"] <= 100
    # more unique misses than the capacity in one call: still correct
    check(c, m, torch.arange(0, 1000, 4))
    assert c.stats()["bytes"] <= c.max_bytes
    # LRU: the most recent rows survive
    c2 = SeqPECache(m, mode="sparse", max_bytes=100 * row)
    with torch.no_grad():
        c2(torch.arange(0, 60))
        c2(torch.arange(0, 10))          # touch 0..9
        c2(torch.arange(100, 160))       # forces an eviction of the least recently used
        before = c2.stats()["misses"]
        c2(torch.arange(0, 10))
    assert c2.stats()["misses"] == before


def test_dense_eviction_and_oversize():
    m = make(d=2, K=2)
    row = m.out_dim * 4
    c = SeqPECache(m, mode="dense", max_bytes=150 * row)
    with torch.no_grad():
        c.precompute((range(10), range(10)))          # 100 rows
        c.precompute([(range(10, 20), (0, 10, 2))])   # 50 rows, fits
        assert c.stats()["entries"] == 150
        c(torch.tensor([[0, 0]]))                     # touch the first box
        c.precompute((range(90, 100), range(0, 5)))   # 50 rows: evicts the LRU box (the second)
        assert c.stats()["evictions"] == 50 and c.stats()["bytes"] <= c.max_bytes
        with pytest.raises(ValueError, match="max_bytes"):
            c.precompute((range(100), range(100)))
    pos = torch.cat([torch.cartesian_prod(torch.arange(20), torch.arange(20)),
                     torch.cartesian_prod(torch.arange(90, 100), torch.arange(0, 7))])
    check(c, m, pos)


def test_dense_text_style_range_and_grid():
    m = make(K=4)
    c = SeqPECache(m, mode="dense")
    with torch.no_grad():
        c.precompute(range(2048))
        c.precompute([(5000, 5100), range(9000, 9999, 7)])
    pos = torch.cat([torch.arange(2048), torch.arange(5000, 5100), torch.arange(9000, 9999, 7)])
    before = c.stats()["computed"]
    check(c, m, pos)
    assert c.stats()["computed"] == before and c.stats()["misses"] == 0


def test_invalidated_dense_box_recomputed_lazily():
    m, c, pos = setup("dense", 1)
    check(c, m, pos)
    _inplace(m)
    s0 = c.stats()["computed"]
    check(c, m, torch.arange(0, 10))
    assert c.stats()["computed"] - s0 == 200  # the whole touched box, once
    check(c, m, torch.arange(0, 200))
    assert c.stats()["computed"] - s0 == 200


def test_grad_mode_rules():
    m, c, pos = setup("sparse", 1)
    with pytest.raises(RuntimeError, match="no_grad"):
        c(pos)
    with pytest.raises(RuntimeError, match="no_grad"):
        c.precompute(range(10))
    with torch.inference_mode():
        a = c(pos)
    # outputs created inside inference_mode are usable outside, and the cache keeps working outside it
    with torch.no_grad():
        assert torch.equal(c(pos), a)
    m.requires_grad_(False)
    out = c(pos)  # frozen encoder: fine with grad on
    assert not out.requires_grad
    m.requires_grad_(True)
    c2 = SeqPECache(m, allow_grad=True)
    out = c2(pos)
    assert not out.requires_grad


def test_training_with_dropout_refused():
    m = make(resid_pdrop=0.1).train()
    c = SeqPECache(m)
    with torch.no_grad(), pytest.raises(RuntimeError, match="dropout"):
        c(torch.arange(5))
    m.eval()
    with torch.no_grad():
        c(torch.arange(5))


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_validation(mode):
    m = make()
    c = SeqPECache(m, mode=mode)
    with torch.no_grad():
        with pytest.raises(ValueError, match="non-negative"):
            c(torch.tensor([-1, 2]))
        with pytest.raises(ValueError, match="max_digits"):
            c(torch.tensor([1000]))
        with pytest.raises(ValueError, match="data_dim"):
            c(torch.zeros(3, 2, dtype=torch.long))
        with pytest.raises(ValueError, match="shape"):
            c(torch.zeros(2, 2, 2, dtype=torch.long))
        with pytest.raises(TypeError):
            c(torch.tensor([1.5]))
        with pytest.raises(ValueError, match="max_digits"):
            c.precompute(range(990, 1001))
        m.check_range = False  # the cache always checks (keys must not alias)
        with pytest.raises(ValueError, match="max_digits"):
            c(torch.tensor([1000]))
        assert c(torch.zeros(0, dtype=torch.long)).shape == (0, m.out_dim)
    with pytest.raises(ValueError):
        SeqPECache(m, mode="lru")


def test_compute_hook_and_chunks():
    m = make(K=4)
    c = SeqPECache(m, compute=prefix_shared_forward, chunk_size=64)
    pos = torch.randint(0, 10000, (300,))
    check(c, m, pos)
    check(c, m, pos)


def test_unpackable_keys_fallback():
    # base**max_digits per axis packs into int64, but 4 axes of 10**5 do not: dict index path
    m = make(d=4, K=5, D=32, H=4)
    c = SeqPECache(m)
    assert not c._packable
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 100000, (40, 4), generator=g)
    pos = torch.cat([pos, pos[:10]])
    check(c, m, pos)
    check(c, m, pos)
    assert c.stats()["computed"] == 40


def test_threads_share_one_cache():
    """An evaluation server's threads filling and reading one cache: each call gets its own positions' rows, the
    index stays whole, and rows a thread computed while another changed the weights are not served afterwards
    (calls run one at a time). Without the lock ~450 of 540 calls got other positions' rows, and the index stayed
    corrupt for later single-threaded calls."""
    import threading
    import time

    from conftest import race

    m = make(d=1, D=16, H=2)
    with torch.no_grad():
        truth = m(torch.arange(1000))
    c = SeqPECache(m)
    wrong, errors = [], []

    def work(r, t, bar):
        g = torch.Generator().manual_seed(r * 100 + t)
        pos = torch.randint(0, 1000, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g)
        bar.wait()
        with torch.no_grad():  # (grad mode is per thread)
            try:
                for _ in range(3):
                    if not (c(pos) - truth[pos]).abs().max().item() < 1e-5:
                        wrong.append(pos)
            except Exception as e:  # noqa: BLE001 - counted, reported below
                errors.append(repr(e))

    race(work, rounds=15, threads=6)
    assert not wrong and not errors, (len(wrong), errors[:3])
    with torch.no_grad():
        torch.testing.assert_close(c(torch.arange(1000)), truth, rtol=1e-5, atol=1e-6)  # (GEMM rounding by batch)

    # thread A misses and encodes; meanwhile the weights change and thread B calls the cache
    entered, release = threading.Event(), threading.Event()

    def slow(mod, p):
        out = mod(p)
        if threading.current_thread().name == "A":
            entered.set()
            release.wait(10)
        return out

    c2 = SeqPECache(m, compute=slow)
    pos_a, pos_b = torch.tensor([1, 2, 3]), torch.tensor([500])

    def call(p):
        with torch.no_grad():
            c2(p)

    ta = threading.Thread(target=call, args=(pos_a,), name="A")
    ta.start()
    assert entered.wait(10)
    with torch.no_grad():
        m.out_proj.weight.add_(1.0)
    tb = threading.Thread(target=call, args=(pos_b,), name="B")
    tb.start()
    time.sleep(0.2)  # B's call waits for A's (without the lock: B refreshes the key, then A inserts old rows)
    release.set()
    ta.join(), tb.join()
    with torch.no_grad():
        torch.testing.assert_close(c2(pos_a), m(pos_a), rtol=1e-5, atol=1e-6)


def test_copied_and_pickled_cache_is_fresh_and_safe():
    """deepcopy / torch.save of a used cache: the copy works on its own module. The key's storage weak references
    are not copied (a copied StorageWeakRef frees one weak reference twice: 'corrupted double-linked list' at
    exit), so this runs in a subprocess whose exit status is checked."""
    import subprocess
    import sys

    code = """
import copy, io, gc, torch, seqpe_kernels as sk
from seqpe_kernels.savings.cache import SeqPECache
m = sk.SeqPE(16, 2, 3).eval(); c = SeqPECache(m)
with torch.no_grad():
    c(torch.arange(5))
    for c2 in (copy.deepcopy(c), None):
        if c2 is None:
            b = io.BytesIO(); torch.save(c, b); b.seek(0); c2 = torch.load(b, weights_only=False)
        assert c2.module is not m and torch.equal(c2(torch.arange(7)), c2.module(torch.arange(7)))
        # the copy is invalidated by a fused optimizer step on its module (no version bump: the hook's epoch)
        for p in c2.module.parameters():
            p.grad = torch.ones_like(p)
        with torch.enable_grad():
            torch.optim.Adam(c2.module.parameters(), lr=0.1, fused=True).step()
        assert torch.allclose(c2(torch.arange(7)), c2.module(torch.arange(7)), atol=1e-6), "stale copy"
        del c2
        gc.collect()
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stdout[-500:], r.stderr[-2000:])
