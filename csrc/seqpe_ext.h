// Shared declarations of the seqpe_ext operators (CPU in ops_cpu.cpp, CUDA in ops_cuda.cu).
//
// The operator contracts mirror the Python launchers in seqpe_kernels/ops/*.py (`*_forward` / `*_backward`):
// same argument order, output shapes and dtypes, the same empty (0,)-tensors for absent outputs, and
// outputs that never alias inputs or each other. The seqpe:: custom ops call these when impl == 1.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

#include <optional>
#include <tuple>

namespace seqpe {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using Tensor2 = std::tuple<Tensor, Tensor>;
using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Tensor5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// dtype codes carried through the schemas (seqpe_kernels/ops/_common.py DTYPES)
inline at::ScalarType dtype_from_code(int64_t code) {
  switch (code) {
    case 0: return at::kFloat;
    case 1: return at::kHalf;
    case 2: return at::kBFloat16;
    case 3: return at::kDouble;
    default: TORCH_CHECK(false, "seqpe_ext: unknown dtype code ", code, " (0 fp32, 1 fp16, 2 bf16, 3 fp64)");
  }
}

inline bool has(const OptTensor& t) { return t.has_value() && t->defined(); }

// The indexed attention operands (tiny_attention_fwd / _bwd's rows=, both devices), validated: rows [M, T] int64
// (made contiguous) and the table (a contiguous last dim): qkv is the [n, 3D] table (q_table; every row a query,
// so q_start 0), or q [M, TQ, D] is given with kv the [n, 2D] table. The row values are the device op's to check.
struct AttnTable {
  Tensor rows, tab;
  int64_t M, T, D;
  bool q_table;
};
inline AttnTable attn_table(const Tensor& qkv, const OptTensor& kv, const Tensor& rows, int64_t q_start,
                            const char* op) {
  TORCH_CHECK(rows.dim() == 2 && rows.scalar_type() == at::kLong,
              "seqpe_ext::", op, ": rows must be an int64 [M, T] tensor of table rows");
  AttnTable t;
  t.q_table = !has(kv);
  const Tensor& tab = t.q_table ? qkv : *kv;
  const int64_t parts = t.q_table ? 3 : 2;
  TORCH_CHECK(tab.dim() == 2 && tab.size(1) % parts == 0, "seqpe_ext::", op, ": with rows, ",
              t.q_table ? "qkv must be a [n, 3D] table" : "kv must be a [n, 2D] table");
  t.rows = rows.to(tab.device()).contiguous();
  t.tab = tab.stride(1) == 1 ? tab : tab.contiguous();
  t.M = rows.size(0), t.T = rows.size(1), t.D = tab.size(1) / parts;
  if (t.q_table) {
    TORCH_CHECK(q_start == 0, "seqpe_ext::", op, ": a q table takes every row as a query (q_start 0, not ", q_start,
                ")");
  } else {
    TORCH_CHECK(qkv.dim() == 3 && qkv.size(0) == t.M && qkv.size(2) == t.D, "seqpe_ext::", op,
                ": q must be [M, TQ, D] with M = rows' ", t.M, " and D = kv's width/2 = ", t.D);
  }
  return t;
}

// residual_layernorm_bwd's dh against ln_in [R, D]: the same shape, or [R / dh_every, D] with dh_every > 0
inline void check_ln_dh(const Tensor& dh, const Tensor& x, int64_t dh_every) {
  TORCH_CHECK(dh_every >= 0, "seqpe_ext::residual_layernorm_bwd: dh_every must be >= 0, got ", dh_every);
  if (dh_every == 0) {
    TORCH_CHECK(dh.sizes() == x.sizes(), "seqpe_ext::residual_layernorm_bwd: dh must match ln_in");
    return;
  }
  TORCH_CHECK(x.size(0) % dh_every == 0 && dh.dim() == 2 && dh.size(0) == x.size(0) / dh_every &&
                  dh.size(1) == x.size(1),
              "seqpe_ext::residual_layernorm_bwd: with dh_every = ", dh_every, ", dh must be [R / ", dh_every,
              ", D] = [", x.size(0) / dh_every, ", ", x.size(1), "] (R = ", x.size(0), " a multiple), got ",
              dh.sizes());
}

// The residual + LayerNorm backward of one device (its last arguments: also return dy's column sums, the bias
// gradient of the GEMM before the branch; dh_every > 0: dh holds only the rows r with r % dh_every ==
// dh_every - 1, densely as [R / dh_every, D], the others being zero), registered twice: residual_layernorm_bwd
// (four outputs, the seqpe:: operator's contract) and residual_layernorm_bwd_bias (five, and dh_every; only
// csrc/encoder.cpp calls it)
using RlnBwdImpl = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> (*)(
    const OptTensor&, const OptTensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&, double,
    const OptTensor&, int64_t, bool, int64_t, bool, int64_t);

template <RlnBwdImpl impl>
std::tuple<Tensor, Tensor, Tensor, Tensor> rln_bwd_op(const OptTensor& da, const OptTensor& dh, const Tensor& ln_in,
                                                      const OptTensor& w, const Tensor& mean, const Tensor& rstd,
                                                      double p, const OptTensor& seeds, int64_t seed_idx, bool has_y,
                                                      int64_t y_dtype) {
  auto r = impl(da, dh, ln_in, w, mean, rstd, p, seeds, seed_idx, has_y, y_dtype, false, 0);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
}

template <RlnBwdImpl impl>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rln_bwd_bias_op(const OptTensor& da, const OptTensor& dh,
                                                                   const Tensor& ln_in, const OptTensor& w,
                                                                   const Tensor& mean, const Tensor& rstd, double p,
                                                                   const OptTensor& seeds, int64_t seed_idx,
                                                                   bool has_y, int64_t y_dtype, int64_t dh_every) {
  return impl(da, dh, ln_in, w, mean, rstd, p, seeds, seed_idx, has_y, y_dtype, true, dh_every);
}

inline void check_float_dtype(const Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, "seqpe_ext::", op,
              ": ", name, " must be float32, float64, float16 or bfloat16, got ", st);
}

// t in dtype dt, without a dispatcher call when it already is (a no-op .to() still dispatches, ~1 us of host
// time per call); as_dtype: also contiguous
inline Tensor cast(const Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }
inline Tensor as_dtype(const Tensor& t, at::ScalarType dt) { return cast(t, dt).contiguous(); }

// A new uninitialised contiguous tensor. On CPU straight from at::detail::empty_cpu, which is what at::empty's
// CPU kernel calls: at::empty itself goes through the dispatcher and its profiler hooks first (~2.4k
// instructions a call; ~90 calls per tiny training step of the C++ encoder). Elsewhere at::empty.
inline Tensor alloc(at::IntArrayRef sizes, const at::TensorOptions& o) {
  if (o.device().is_cpu() && o.layout() == at::kStrided)
    return at::detail::empty_cpu(sizes, at::typeMetaToScalarType(o.dtype()), false, at::MemoryFormat::Contiguous);
  return at::empty(sizes, o);
}

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

#if defined(__CUDACC__)
#define SEQPE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SEQPE_HOST_DEVICE inline
#endif

// Layer 0's (digit, slot) table row of token j < L of one sequence, whose inputs start at xm (column stride sxc):
// digit * L + j, with the digit of the position for slot j (floor division and a non-negative remainder, as
// torch's div / % give) or the digit id itself; clamped to [0, base) when the inputs were not validated. The
// CLS token's row is base * L. One definition for the CPU loop and the CUDA kernel of seqpe_ext::table_rows.
SEQPE_HOST_DEVICE int64_t table_row(const int64_t* xm, int64_t sxc, int64_t j, int64_t L, int64_t K, int64_t base,
                                    bool from_positions, bool clamp) {
  int64_t d;
  if (from_positions) {
    const int64_t p = xm[(j / K) * sxc];
    int64_t q = 1;
    for (int64_t s = j % K; s < K - 1; ++s) q *= base;  // base ** (K - 1 - slot)
    int64_t f = p / q;
    if ((p % q != 0) && (p < 0)) --f;
    d = f % base;
    if (d < 0) d += base;
  } else {
    d = xm[j * sxc];
  }
  if (clamp) d = d < 0 ? 0 : (d >= base ? base - 1 : d);
  return d * L + j;
}

// seqpe_ext::digit_embed_bwd's output element (row r of [d_tok: base rows; d_pos: L; d_cls: 1; d_dim: data_dim rows
// when data_dim > 1], column c): the per-chunk partials summed in chunk order (part [n_chunks, rows, D], internal
// rows [token digits: base; slots 0..L-1; CLS]; the CPU passes its total with n_chunks = 1), plus, when tab is
// given, layer 0's (digit, slot) table gradient folded in (row v * L + s: digit v at slot s; row base * L: CLS;
// [base * L + 1, D], accumulator dtype). One definition for the CPU loop and the CUDA kernel.
template <typename acc_t>
SEQPE_HOST_DEVICE acc_t embed_grad_out(int64_t r, int64_t c, int64_t D, int64_t base, int64_t L, int64_t K,
                                       const acc_t* part, int64_t n_chunks, int64_t rows, const acc_t* tab) {
  auto sum = [&](int64_t r2) {
    acc_t s = 0;
    for (int64_t ch = 0; ch < n_chunks; ++ch) s += part[(ch * rows + r2) * D + c];
    return s;
  };
  auto t = [&](int64_t row) { return tab[row * D + c]; };
  acc_t s = 0;
  if (r < base) {  // token digit r: every slot's table row of that digit
    s = sum(r);
    if (tab)
      for (int64_t j = 0; j < L; ++j) s += t(r * L + j);
  } else if (r < base + L) {  // slot r - base: every digit's row at that slot
    s = sum(r);
    if (tab)
      for (int64_t v = 0; v < base; ++v) s += t(v * L + (r - base));
  } else if (r == base + L) {  // CLS
    s = sum(r);
    if (tab) s += t(base * L);
  } else {  // dimension dd: its K slots
    const int64_t dd = r - base - L - 1;
    for (int64_t k = 0; k < K; ++k) s += sum(base + dd * K + k);
    if (tab)
      for (int64_t v = 0; v < base; ++v)
        for (int64_t k = 0; k < K; ++k) s += t(v * L + dd * K + k);
  }
  return s;
}

// seqpe_ext::digit_embed_bwd's optional table_grad (either device): [base * L + 1, D] float on g's device, as a
// contiguous tensor in the accumulator dtype (undefined when absent)
inline Tensor table_grad_in(const OptTensor& tg, const Tensor& g, int64_t base, int64_t L, int64_t D,
                            at::ScalarType acc) {
  if (!has(tg)) return Tensor();
  check_float_dtype(*tg, "digit_embed_bwd", "table_grad");
  TORCH_CHECK(tg->dim() == 2 && tg->size(0) == base * L + 1 && tg->size(1) == D && tg->device() == g.device(),
              "seqpe_ext::digit_embed_bwd: table_grad must be [base * L + 1, D] = [", base * L + 1, ", ", D,
              "] on ", g.device(), ", got ", tg->sizes(), " on ", tg->device());
  return cast(*tg, acc).contiguous();
}

// seqpe_ext::table_grad (either device): checks g [M, T, C] float, rows [M, T] int64, T = L + 1, n_rows = base *
// L + 1; returns base
inline int64_t table_grad_args(const Tensor& g, const Tensor& rows, int64_t n_rows, int64_t L) {
  check_float_dtype(g, "table_grad", "g");
  TORCH_CHECK(g.dim() == 3 && rows.dim() == 2 && rows.size(0) == g.size(0) && rows.size(1) == g.size(1) &&
                  rows.scalar_type() == at::kLong && L >= 1 && g.size(1) == L + 1 && n_rows >= 1 &&
                  (n_rows - 1) % L == 0,
              "seqpe_ext::table_grad: g ", g.sizes(), ", rows ", rows.sizes(), " (", rows.scalar_type(), "), n_rows ",
              n_rows, ", L ", L, " do not describe a (digit, slot) table");
  return (n_rows - 1) / L;
}

// seqpe_ext::table_rows: [M, L + 1] int64 rows of positions [M, d] / digit ids [M, L] (any strides, int64)
inline void table_rows_args(const Tensor& x, int64_t L, int64_t K, int64_t base, bool from_positions) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kLong, "seqpe_ext::table_rows: x must be int64 [M, d] / [M, L]");
  TORCH_CHECK(L >= 1 && K >= 1 && base >= 2 && (from_positions ? x.size(1) * K == L : x.size(1) == L),
              "seqpe_ext::table_rows: x has ", x.size(1), " columns for L = ", L, ", K = ", K);
}

// gelu_new_bwd_bias (either device): the checked, contiguous inputs (z, du) and the dz output
inline std::tuple<Tensor, Tensor, Tensor> gelu_bwd_bias_args(const Tensor& du, const Tensor& z) {
  check_float_dtype(z, "gelu_new_bwd_bias", "z");
  TORCH_CHECK(z.dim() == 2, "seqpe_ext::gelu_new_bwd_bias: z must be [R, C]");
  TORCH_CHECK(du.sizes() == z.sizes(), "seqpe_ext::gelu_new_bwd_bias: du must have z's shape");
  Tensor zc = z.contiguous();
  return {zc, du.contiguous(), alloc(zc.sizes(), zc.options())};
}

// Philox seed of a dropout site: seeds[seed_idx] (int64 tensor of per-call seeds)
inline void check_seeds(const OptTensor& seeds, int64_t seed_idx, const char* op) {
  TORCH_CHECK(has(seeds), "seqpe_ext::", op, ": dropout p > 0 needs a seeds tensor");
  TORCH_CHECK(seeds->scalar_type() == at::kLong, "seqpe_ext::", op, ": seeds must be int64, got ",
              seeds->scalar_type());
  TORCH_CHECK(seed_idx >= 0 && seed_idx < seeds->numel(), "seqpe_ext::", op, ": seed_idx ", seed_idx,
              " out of range for ", seeds->numel(), " seeds");
}

inline double drop_scale(double p) { return p < 1.0 ? 1.0 / (1.0 - p) : 0.0; }

// seeds[seed_idx] on the host (CPU tensors only: a pointer read instead of select + item, ~2 us per call)
inline uint64_t host_seed(const OptTensor& seeds, int64_t seed_idx) {
  const Tensor& s = *seeds;
  return static_cast<uint64_t>(s.is_contiguous() ? s.const_data_ptr<int64_t>()[seed_idx]
                                                 : s.select(0, seed_idx).item<int64_t>());
}

}  // namespace seqpe
