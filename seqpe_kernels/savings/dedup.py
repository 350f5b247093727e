"""Exact deduplication of SeqPE encoder work (SEQPE_SPEC §2.8).

Two levels, both exact with dropout off (``module.eval()``, or ``resid_pdrop = attn_pdrop = 0``):

``dedup_forward(module, positions)``
    Identical positions in one call are encoded once (``torch.unique(..., return_inverse=True)``) through
    the module's own ``forward`` (so it works for any ``SeqPE`` subclass, fused or not), and the rows are
    gathered back. The gather's backward is an index-add, so gradients of duplicated rows are summed
    exactly as the reference's per-row gradients would be (up to fp32 summation order).
    Valid for causal and bi attention.

``prefix_shared_forward(module, positions)``
    Causal encoders only. A token's state at digit j depends only on digits 0..j (and their pad mask,
    which left padding makes a function of the same prefix), in every layer. The unique decimal prefixes
    form a trie; every unique token-state is computed once per layer, with attention over the node's
    ancestors (node at level j attends to its ancestors at levels 0..j; the CLS token of each unique
    position attends to its whole path and itself). Written in plain PyTorch from the module's weights
    (GEMMs over the unique nodes only, the last block computes only K/V for digit nodes and the full block
    for CLS rows), with ordinary autograd backward; where Triton runs (CUDA, or the interpreter) the ancestor
    attention is the fused seqpe::prefix_attention op (seqpe_kernels/ops/prefix_attention.py). For
    positions 0..32767 at K = 5 this is 69 178 token-states instead of 196 608.

Why training with dropout is refused by default: the reference draws independent dropout masks for every
sequence and every token, including for two copies of the same position in one call (§2.5). Deduplication
computes a shared state once, so the copies (and, for prefix sharing, every position that shares a prefix)
receive the *same* mask. Each sequence's marginal distribution is unchanged, but the masks become
correlated across sequences, which changes the joint noise that e.g. the contrastive and transfer losses see.
That is a different training procedure, so it must be asked for explicitly with ``allow_in_training=True``.
Training mode with all dropout probabilities at 0 is exact and needs no option.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import backend as _backend
from ..reference.seqpe import gelu_new as _gelu_new
from ..reference.tokenize import check_positions, tokenize

__all__ = ["dedup_forward", "prefix_shared_forward", "build_prefix_trie", "PrefixTrie", "prefix_trie_stats",
           "dropout_active", "unique_positions"]


# ---------------------------------------------------------------------------------------------- helpers
def _dropout_sites(module: nn.Module):
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) or (
                "dropout" in type(m).__name__.lower() and isinstance(getattr(m, "p", None), (int, float))):
            yield m


def dropout_active(module: nn.Module) -> bool:
    """True when a forward of ``module`` would draw random dropout masks (some dropout layer in training
    mode with p > 0)."""
    return any(m.training and float(m.p) > 0 for m in _dropout_sites(module))


def _check_training(module: nn.Module, allow_in_training: bool, what: str):
    if dropout_active(module) and not allow_in_training:
        raise RuntimeError(
            f"{what}: the encoder is in training mode with active dropout. The reference draws independent "
            "dropout masks per sequence and per token; deduplication shares one computed state (and so one "
            "mask) between identical positions" + (" and shared prefixes" if "prefix" in what else "") +
            ", which correlates the masks and is NOT equivalent to the reference (only each sequence's "
            "marginal is unchanged). Call module.eval(), set the dropout probabilities to 0, or pass "
            "allow_in_training=True to accept the correlated masks explicitly.")


def _param_device_dtype(module: nn.Module):
    p = module.token_of_seqpe_embed.weight
    return p.device, p.dtype


def unique_positions(pos: torch.Tensor, radix: int):
    """``torch.unique(pos, dim=0, sorted=True, return_inverse=True)`` for positions [M, d] (int64), by a 1-D
    unique over one int64 key per row. Why: the row-wise unique sorts rows with a comparator and costs ~70x the
    1-D one (2-core dev CPU, M = 1552: 1.3 ms against 18 us; M = 8720: 9.4 ms against 0.33 ms), and every eval
    call of a FusedSeqPE (``dedup="auto"``) paid it. ``radix`` = base ** max_digits, the per-dimension range.

    d = 1: the column itself. d > 1: key = the row's digits in base ``radix`` (the same order as the row-wise
    sort), where that fits in int64. A row outside [0, radix) in some dimension (positions not validated:
    ``check_range=False``) gets a key of its own (negative, one per row), so it is never merged with another row
    (packing it could alias a valid one); each unique row is read back from its first occurrence. Returns
    (unique rows [U, d], inverse [M]); the unique in-range rows come in lexicographic order, as the row-wise
    unique's."""
    M, d = pos.shape
    if d == 1:
        u, inv = torch.unique(pos[:, 0], sorted=True, return_inverse=True)
        return u.unsqueeze(1), inv
    if radix ** d > 2 ** 63 - 1:  # no int64 key: the row-wise unique
        return torch.unique(pos, dim=0, sorted=True, return_inverse=True)
    ok = ((pos >= 0) & (pos < radix)).all(1)
    key = pos[:, 0].clamp(0, radix - 1)
    for a in range(1, d):
        key = key * radix + pos[:, a].clamp(0, radix - 1)
    idx = torch.arange(M, device=pos.device)
    key = torch.where(ok, key, -1 - idx)
    uk, inv = torch.unique(key, sorted=True, return_inverse=True)
    first = torch.full((uk.shape[0],), M, dtype=torch.int64, device=pos.device)
    first.scatter_reduce_(0, inv, idx, "amin")
    return pos[first], inv


# ---------------------------------------------------------------------------------------------- (a) dedup
def dedup_forward(module: nn.Module, positions: torch.Tensor, allow_in_training: bool = False) -> torch.Tensor:
    """``module(positions)`` with identical positions encoded once and gathered back.

    Exact (outputs and every parameter gradient, up to fp32 summation order) whenever dropout is off.
    Positions are validated the way the module validates them (shape, integer dtype, range).
    """
    _check_training(module, allow_in_training, "dedup_forward")
    check_range = getattr(module, "check_range", True)
    pos = check_positions(positions, module.max_digits, getattr(module, "base", 10), module.data_dim, check_range)
    M = pos.shape[0]
    if M == 0:
        return module(positions)
    uniq_in, inverse = unique_positions(pos, getattr(module, "base", 10) ** module.max_digits)
    if positions.dim() == 1:
        uniq_in = uniq_in[:, 0]
    if uniq_in.shape[0] == M:  # nothing to share: keep the plain call (no extra gather)
        return module(positions)
    out = module(uniq_in)
    return out.index_select(0, inverse.to(out.device))


# ---------------------------------------------------------------------------------------------- (b) prefix trie
@dataclass
class PrefixTrie:
    """Unique token-states of a batch of digit strings under causal attention.

    Nodes are stored level by level (level j = digit j) in one global index space, then the CLS nodes (one
    per unique full string). ``anc[j]`` ([n_j, j+1], global indices) lists each level-j node's ancestors at
    levels 0..j (itself last); ``anc[L]`` ([n_cls, L+1]) lists each CLS node's path plus itself.
    ``key_mask[j]`` is the 0/1 key mask over those ancestors (None when padding is not masked).
    ``leaf`` ([M]) maps each input sequence to its CLS node.
    """
    L: int
    counts: List[int]                      # n_j for j = 0..L-1, then n_cls
    offsets: List[int]                     # global start of each level (len L+2, last = total)
    node_digit: List[torch.Tensor]         # [n_j] digit id of each level-j node
    anc: List[torch.Tensor]                # L+1 index tensors, see above
    key_mask: List[Optional[torch.Tensor]]
    leaf: torch.Tensor                     # [M]

    @property
    def num_digit_nodes(self) -> int:
        return self.offsets[self.L]

    @property
    def num_token_states(self) -> int:
        return self.offsets[-1]


def build_prefix_trie(digits: torch.Tensor, pad_mask: Optional[torch.Tensor] = None, base: int = 10,
                      mask_padding: bool = False) -> PrefixTrie:
    """Vectorised trie of the unique prefixes of ``digits`` ([M, L] ids).

    The prefix of length j+1 is identified by an integer key built level by level,
    ``key_j = id_{j-1} * base + digit_j`` with ``id_{j-1}`` the index of the parent prefix among the
    unique prefixes of length j; ``torch.unique(return_inverse=True)`` per level gives the node ids. Keys
    stay below M * base, so there is no overflow whatever L is.
    """
    M, L = digits.shape
    device = digits.device
    digits = digits.long()
    node_digit, parents, inverses, node_pad = [], [], [], []
    ids = None
    for j in range(L):
        dj = digits[:, j]
        key = dj if j == 0 else ids * base + dj
        uk, ids = torch.unique(key, sorted=True, return_inverse=True)
        node_digit.append(uk % base)
        parents.append(None if j == 0 else torch.div(uk, base, rounding_mode="floor"))
        inverses.append(ids)
        if mask_padding:
            pj = torch.zeros(uk.shape[0], dtype=torch.float32, device=device)
            pj[ids] = pad_mask[:, j].to(device=device, dtype=torch.float32)  # a function of the prefix
            node_pad.append(pj)
    counts = [int(nd.shape[0]) for nd in node_digit]
    n_cls = counts[-1]
    counts.append(n_cls)
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)

    anc, key_mask = [], []
    for j in range(L + 1):
        top = min(j, L - 1)
        cur = torch.arange(counts[top], device=device)
        cols, mcols = [None] * (top + 1), [None] * (top + 1)
        for i in range(top, -1, -1):
            cols[i] = offsets[i] + cur
            if mask_padding:
                mcols[i] = node_pad[i].index_select(0, cur)
            if i > 0:
                cur = parents[i].index_select(0, cur)
        if j == L:  # CLS: its path plus itself (never masked)
            cols.append(offsets[L] + torch.arange(n_cls, device=device))
            if mask_padding:
                mcols.append(torch.ones(n_cls, dtype=torch.float32, device=device))
        anc.append(torch.stack(cols, dim=1))
        key_mask.append(torch.stack(mcols, dim=1) if mask_padding else None)
    return PrefixTrie(L=L, counts=counts, offsets=offsets, node_digit=node_digit, anc=anc, key_mask=key_mask,
                      leaf=inverses[-1])


def prefix_trie_stats(module: nn.Module, positions: torch.Tensor) -> dict:
    """Token-state counts with and without prefix sharing for ``positions`` (no encoder call)."""
    digits, pad = tokenize(positions, module.max_digits, getattr(module, "base", 10), module.data_dim,
                           getattr(module, "check_range", True))
    M, L = digits.shape
    if M == 0:
        return dict(levels=[0] * L, cls=0, token_states=0, reference_token_states=0)
    trie = build_prefix_trie(digits, pad, getattr(module, "base", 10), False)
    return dict(levels=trie.counts[:-1], cls=trie.counts[-1], token_states=trie.num_token_states,
                reference_token_states=M * (L + 1))


def _site_dropout(module: nn.Module, sub: Optional[nn.Module], attr: str):
    """(p, training) of a dropout site, read from its submodule when present."""
    if sub is not None and hasattr(sub, "p"):
        return float(sub.p), bool(sub.training)
    return float(getattr(module, attr, 0.0)), bool(module.training)


def _drop(x, site):
    p, training = site
    return F.dropout(x, p, True) if (training and p > 0) else x


def _fused_prefix_attention(module: nn.Module, device: torch.device) -> bool:
    """Whether prefix_shared_forward runs its ancestor attention with the seqpe::prefix_attention Triton op:
    where seqpe_kernels.backend says Triton can run (CUDA tensors, or the interpreter on CPU) and the module
    asks for Triton or "auto" (itself, or ``SEQPE_KERNELS_BACKEND`` under ``"auto"``). ``backend="torch"``,
    ``"cuda"`` or ``"cpu"`` run the eager chain: the C++ backends have no prefix attention op, and a user who
    names one (for instance because Triton misbehaves on their machine) gets no Triton kernel."""
    requested = _backend.requested_backend(getattr(module, "backend", "auto"))
    return requested in ("auto", "triton") and _backend.triton_status(torch.device(device))[0]


def prefix_shared_forward(module: nn.Module, positions: torch.Tensor, allow_in_training: bool = False, *,
                          validated: bool = False) -> torch.Tensor:
    """``module(positions)`` for a causal SeqPE, computing each unique token-state once (see module doc).
    ``validated``: the positions' range check (a host sync) already ran; not again.

    Equals ``module.forward`` (outputs and all parameter gradients, fp32 rounding) with dropout off, for
    1-D and n-D positions, mask_padding on or off. Reads the module's weights directly, so any ``SeqPE``
    subclass with the reference parameter layout works. Raises for bi-directional attention (a token then
    depends on later digits and nothing is shared) and, unless ``allow_in_training=True``, in training mode
    with active dropout (see the module doc for why).
    """
    direction = getattr(module, "attn_direction", "causal")
    if direction != "causal":
        raise ValueError(f"prefix_shared_forward needs attn_direction='causal' (got {direction!r}): with "
                         "bi-directional attention every token depends on every digit, so prefixes share "
                         "nothing; use dedup_forward for exact deduplication of identical positions")
    _check_training(module, allow_in_training, "prefix_shared_forward")
    device, _ = _param_device_dtype(module)
    base = getattr(module, "base", 10)
    K, d = module.max_digits, module.data_dim
    # the range is always checked (the trie syncs with the host anyway): with check_range=False an out-of-range
    # position would be tokenized to its low digits, i.e. share a valid position's row
    digits, pad = tokenize(positions, K, base, d, not validated)
    M, L = digits.shape
    if M == 0:
        return module(positions)
    digits, pad = digits.to(device), pad.to(device)
    mask_padding = bool(module.mask_padding)
    trie = build_prefix_trie(digits, pad, base, mask_padding)

    D, Hh = module.embed_dim, module.num_heads
    de = D // Hh
    scale = bool(getattr(module, "scale_attn_weights", True))

    # ---- embeddings, level by level, then the CLS rows
    tok_w = module.token_of_seqpe_embed.weight
    pos_w = module.pos_of_seqpe_embed.weight
    parts = []
    for j in range(L):
        x = F.embedding(trie.node_digit[j], tok_w) + pos_w[j]
        if d > 1:
            x = x + module.dim_token_embed[j // K, 0]
        parts.append(x)
    n_cls = trie.counts[-1]
    parts.append(module.cls_token_embed.reshape(1, D).expand(n_cls, D))
    h = torch.cat(parts, dim=0)  # [N, D]
    n_dig = trie.num_digit_nodes

    fused_attn = _fused_prefix_attention(module, device)
    if fused_attn:
        from ..ops import prefix_attention as _pa  # module attribute lookup at call time (tests spy on it)

    def attend(q, k, v, j, attn_site):
        """Rows of level j (q: [n_j, D]) over their ancestors' keys/values (global k, v: [*, D])."""
        if fused_attn and not (attn_site[1] and attn_site[0] > 0) and not (
                torch.are_deterministic_algorithms_enabled() and torch.is_grad_enabled()
                and (q.requires_grad or k.requires_grad or v.requires_grad)):
            # one fused Triton op (forward and backward) instead of the gather/matmul/softmax chain below;
            # it has no attention dropout, so the eager path keeps that case. Its backward scatters dk / dv
            # with atomic adds (summation order varies run to run): under torch.use_deterministic_algorithms
            # a backward goes through the eager chain, deterministic wherever PyTorch's index_select backward
            # is (and PyTorch's own alert where it is not)
            return _pa.prefix_attention(q, k, v, trie.anc[j], trie.key_mask[j], Hh, scale)
        idx = trie.anc[j]
        n, a = idx.shape
        flat = idx.reshape(-1)
        qh = q.view(n, 1, Hh, de).permute(0, 2, 1, 3)                       # [n, H, 1, de]
        kh = k.index_select(0, flat).view(n, a, Hh, de).permute(0, 2, 1, 3)  # [n, H, a, de]
        vh = v.index_select(0, flat).view(n, a, Hh, de).permute(0, 2, 1, 3)
        w = torch.matmul(qh, kh.transpose(-1, -2))                          # [n, H, 1, a]
        if scale:
            w = w / torch.full([], vh.size(-1) ** 0.5, dtype=w.dtype, device=w.device)
        km = trie.key_mask[j]
        if km is not None:
            w = w + torch.finfo(w.dtype).min * (1 - km.to(w.dtype)[:, None, None, :])  # fp32 mask * fp64 min = -inf
        w = F.softmax(w, dim=-1).type(vh.dtype)
        w = _drop(w, attn_site)
        o = torch.matmul(w, vh)                                             # [n, H, 1, de]
        return o.permute(0, 2, 1, 3).reshape(n, D)

    nl = len(module.transformers)
    for li, blk in enumerate(module.transformers):
        last = li == nl - 1
        ln1, ln2 = blk.layernorm_1, blk.layernorm_2
        ca, cp = blk.attn.c_attn, blk.attn.c_proj
        fc, fp = blk.mlp.c_fc, blk.mlp.c_proj
        attn_site = _site_dropout(module, getattr(blk.attn, "attn_dropout", None), "attn_pdrop")
        res_a_site = _site_dropout(module, getattr(blk.attn, "resid_dropout", None), "resid_pdrop")
        res_m_site = _site_dropout(module, getattr(blk.mlp, "dropout", None), "resid_pdrop")

        a = F.layer_norm(h, (D,), ln1.weight, ln1.bias, ln1.eps)
        if not last:
            q, k, v = torch.addmm(ca.bias, a, ca.weight).split(D, dim=1)
            o = torch.cat([attend(q[trie.offsets[j]:trie.offsets[j + 1]], k, v, j, attn_site)
                           for j in range(L + 1)], dim=0)
            h = _drop(torch.addmm(cp.bias, o, cp.weight), res_a_site) + h
            a2 = F.layer_norm(h, (D,), ln2.weight, ln2.bias, ln2.eps)
            u = _gelu_new(torch.addmm(fc.bias, a2, fc.weight))
            h = h + _drop(torch.addmm(fp.bias, u, fp.weight), res_m_site)
        else:
            # last block: digit rows only feed K/V of the CLS rows; only CLS rows run the whole block
            kv_dig = torch.addmm(ca.bias[D:], a[:n_dig], ca.weight[:, D:])
            q_c, k_c, v_c = torch.addmm(ca.bias, a[n_dig:], ca.weight).split(D, dim=1)
            k = torch.cat([kv_dig[:, :D], k_c], dim=0)
            v = torch.cat([kv_dig[:, D:], v_c], dim=0)
            o = attend(q_c, k, v, L, attn_site)
            hc = h[n_dig:]
            hc = _drop(torch.addmm(cp.bias, o, cp.weight), res_a_site) + hc
            a2 = F.layer_norm(hc, (D,), ln2.weight, ln2.bias, ln2.eps)
            u = _gelu_new(torch.addmm(fc.bias, a2, fc.weight))
            h = hc + _drop(torch.addmm(fp.bias, u, fp.weight), res_m_site)
    x = h  # [n_cls, D]
    if getattr(module, "use_last_layernorm", False):
        x = F.layer_norm(x, (D,), module.layernorm.weight, module.layernorm.bias, module.layernorm.eps)
    y = F.linear(x, module.out_proj.weight, module.out_proj.bias) * (1 / module.temperature)
    return y.index_select(0, trie.leaf)

