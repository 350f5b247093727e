// C++ CPU implementations of the seqpe_ext operators, and the operator schemas (TORCH_LIBRARY).
//
// Every op is one at::parallel_for over sequences (or rows / fixed row chunks); the width loops are plain
// loops over contiguous rows that the compiler vectorises (-O3, `omp simd` for the reductions). Inputs in
// fp32 / fp16 / bf16 accumulate in fp32, fp64 in fp64 (gradcheck); a row in another dtype than the
// accumulator is converted once into a small per-thread buffer (L1-resident: D <= a few thousand).
// Reductions into parameter gradients go through fixed chunks and an ordered final sum, so results do
// not depend on the thread count. Dropout keep-masks are Triton's tl.rand (philox.h) at the same offsets.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "philox.h"
#include "seqpe_ext.h"

namespace seqpe {
namespace {

using at::ScalarType;

// ------------------------------------------------------------------------------------ row conversion
template <typename dst_t, typename src_t>
inline void convert(const src_t* __restrict s, dst_t* __restrict d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<dst_t>(static_cast<float>(s[i]));
}
template <>
inline void convert<double, double>(const double* __restrict s, double* __restrict d, int64_t n) {
  std::memcpy(d, s, n * sizeof(double));
}
template <>
inline void convert<float, double>(const double* __restrict s, float* __restrict d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<float>(s[i]);
}
template <>
inline void convert<double, float>(const float* __restrict s, double* __restrict d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<double>(s[i]);
}
template <>
inline void convert<c10::Half, double>(const double* __restrict s, c10::Half* __restrict d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<c10::Half>(static_cast<float>(s[i]));
}
template <>
inline void convert<c10::BFloat16, double>(const double* __restrict s, c10::BFloat16* __restrict d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<c10::BFloat16>(static_cast<float>(s[i]));
}
template <>
inline void convert<double, c10::Half>(const c10::Half* __restrict s, double* __restrict d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<double>(static_cast<float>(s[i]));
}
template <>
inline void convert<double, c10::BFloat16>(const c10::BFloat16* __restrict s, double* __restrict d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<double>(static_cast<float>(s[i]));
}

template <typename acc_t>
constexpr ScalarType acc_scalar_type() {
  return std::is_same<acc_t, double>::value ? ScalarType::Double : ScalarType::Float;
}

// A row of `n` elements of dtype `st` at `p`, as acc_t: the pointer itself when the dtypes agree, else a
// converted copy in `buf`.
template <typename acc_t>
inline const acc_t* read_row(const void* p, ScalarType st, acc_t* buf, int64_t n) {
  if (st == acc_scalar_type<acc_t>()) return static_cast<const acc_t*>(p);
  switch (st) {
    case ScalarType::Float: convert(static_cast<const float*>(p), buf, n); break;
    case ScalarType::Double: convert(static_cast<const double*>(p), buf, n); break;
    case ScalarType::Half: convert(static_cast<const c10::Half*>(p), buf, n); break;
    case ScalarType::BFloat16: convert(static_cast<const c10::BFloat16*>(p), buf, n); break;
    default: TORCH_CHECK(false, "seqpe_ext: unsupported dtype ", st);
  }
  return buf;
}

template <typename acc_t>
inline void write_row(void* p, ScalarType st, const acc_t* src, int64_t n) {
  if (static_cast<const void*>(src) == p) return;
  switch (st) {
    case ScalarType::Float: convert(src, static_cast<float*>(p), n); break;
    case ScalarType::Double: convert(src, static_cast<double*>(p), n); break;
    case ScalarType::Half: convert(src, static_cast<c10::Half*>(p), n); break;
    case ScalarType::BFloat16: convert(src, static_cast<c10::BFloat16*>(p), n); break;
    default: TORCH_CHECK(false, "seqpe_ext: unsupported dtype ", st);
  }
}

// Where to compute an output row: straight into the output when the dtypes agree, else into `buf`
// (then write_row converts it; write_row is a no-op for the direct case).
template <typename acc_t>
inline acc_t* out_row(void* p, ScalarType st, acc_t* buf) {
  return st == acc_scalar_type<acc_t>() ? static_cast<acc_t*>(p) : buf;
}

inline char* byte_ptr(const Tensor& t) { return static_cast<char*>(t.data_ptr()); }

// ------------------------------------------------------------------------------------ math helpers
// Vectorisable expf for |x| <= 88 (Cephes polynomial, ~1 ulp); used by tanh for gelu_new.
// (Vectorises with -fno-trapping-math, which the build sets, as PyTorch's own build does.)
inline float exp_vec(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // n = round(x * log2(e)) with the 1.5 * 2^23 trick (no float -> int conversion in the loop)
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float fn = shifted - 12582912.0f;
  const int32_t n = __builtin_bit_cast(int32_t, shifted) - 0x4B400000;
  float r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  return y * __builtin_bit_cast(float, bits);
}

// tanh as in the Triton kernel: 1 - 2 / (exp(2u) + 1), u clamped to [-20, 20]
inline float tanh_k(float u) {
  u = u < -20.0f ? -20.0f : u;
  u = u > 20.0f ? 20.0f : u;
  return 1.0f - 2.0f / (exp_vec(2.0f * u) + 1.0f);
}
inline double tanh_k(double u) {
  u = std::min(std::max(u, -20.0), 20.0);
  return 1.0 - 2.0 / (std::exp(2.0 * u) + 1.0);
}

constexpr double kGeluC = 0.7978845608028654;  // sqrt(2/pi)

// dropout scale as the Triton launchers pass it (fp32 argument); fp64 runs keep it in fp64
template <typename acc_t>
inline acc_t acc_scale(double p) {
  return static_cast<acc_t>(drop_scale(p));
}

// ------------------------------------------------------------------------------------ row kernels
// Small row functions with restrict-qualified arguments: each is one loop the compiler vectorises.

constexpr int64_t kKeepChunk = 256;  // keep flags drawn per block (philox.h dropout_keep_block)

// f(c, keep) for c < n: keep = tl.rand(seed, off0 + c) > p, the flags drawn kKeepChunk at a time
template <typename F>
inline void for_each_keep(uint64_t seed, uint32_t off0, float p, int64_t n, F&& f) {
  uint32_t keep[kKeepChunk];
  for (int64_t c0 = 0; c0 < n; c0 += kKeepChunk) {
    const int64_t m = std::min<int64_t>(kKeepChunk, n - c0);
    dropout_keep_block(seed, off0 + static_cast<uint32_t>(c0), p, m, keep);
    for (int64_t i = 0; i < m; ++i) f(c0 + i, keep[i] != 0);
  }
}

// h = x + dropout(y): keep iff tl.rand(seed, off0 + c) > p, kept values scaled (as the Triton kernel). A multiply
// by 0 / scale, not a select, as F.dropout: a NaN / inf in a dropped element stays NaN (divergence shows as the
// reference shows it)
template <typename acc_t>
inline void dropout_add_row(const acc_t* __restrict x, const acc_t* __restrict y, acc_t* __restrict h, int64_t n,
                            uint64_t seed, uint32_t off0, float p, acc_t scale) {
  for_each_keep(seed, off0, p, n, [&](int64_t c, bool keep) {
    h[c] = x[c] + y[c] * (keep ? scale : acc_t(0));
  });
}

// o = dropout(g) with the same masks
template <typename acc_t>
inline void dropout_row(const acc_t* __restrict g, acc_t* __restrict o, int64_t n, uint64_t seed, uint32_t off0,
                        float p, acc_t scale) {
  for_each_keep(seed, off0, p, n, [&](int64_t c, bool keep) {
    o[c] = g[c] * (keep ? scale : acc_t(0));
  });
}

template <typename acc_t>
inline void add_row(const acc_t* __restrict x, const acc_t* __restrict y, acc_t* __restrict h, int64_t n) {
  for (int64_t c = 0; c < n; ++c) h[c] = x[c] + y[c];
}

// LayerNorm statistics of a row: mean and 1/sqrt(var + eps), biased variance (as the Triton kernel). The two row
// sums accumulate in double: a float sum over the row in sequence was up to 2.2e-6 off at D = 12300 (6e-7 at 4100)
// where the GPU kernels' tree sums stay at 1.4e-7 (a sanitizer run's emulated-CUDA comparison failed on it)
template <typename acc_t>
inline void ln_stats_row(const acc_t* __restrict h, int64_t n, acc_t eps, acc_t& mean, acc_t& rstd) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < n; ++c) s += static_cast<double>(h[c]);
  const acc_t mu = static_cast<acc_t>(s / static_cast<double>(n));
  double sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t c = 0; c < n; ++c) {
    const double d = static_cast<double>(h[c] - mu);
    sq += d * d;
  }
  mean = mu;
  rstd = static_cast<acc_t>(1.0 / std::sqrt(sq / static_cast<double>(n) + static_cast<double>(eps)));
}

template <typename acc_t>
inline void ln_apply_row(const acc_t* __restrict h, const acc_t* __restrict w, const acc_t* __restrict b, acc_t mu,
                         acc_t rs, acc_t* __restrict o, int64_t n) {
  for (int64_t c = 0; c < n; ++c) o[c] = (h[c] - mu) * rs * w[c] + b[c];
}

// LayerNorm backward of a row: g += (dxhat - (xhat * c1 + c2)) * rstd, with dxhat = da * w and
// c1 = mean(dxhat * xhat), c2 = mean(dxhat); dw += da * xhat, db += da
template <typename acc_t>
inline void ln_bwd_row(const acc_t* __restrict h, const acc_t* __restrict da, const acc_t* __restrict w, acc_t mu,
                       acc_t rs, acc_t* __restrict g, acc_t* __restrict dw, acc_t* __restrict db, int64_t n) {
  acc_t c1 = 0, c2 = 0;
#pragma omp simd reduction(+ : c1, c2)
  for (int64_t c = 0; c < n; ++c) {
    const acc_t xh = (h[c] - mu) * rs;
    const acc_t dxh = da[c] * w[c];
    c1 += dxh * xh;
    c2 += dxh;
  }
  const acc_t k1 = c1 / static_cast<acc_t>(n), k2 = c2 / static_cast<acc_t>(n);
  for (int64_t c = 0; c < n; ++c) {
    const acc_t xh = (h[c] - mu) * rs;
    const acc_t dxh = da[c] * w[c];
    g[c] += (dxh - (xh * k1 + k2)) * rs;
    dw[c] += da[c] * xh;
    db[c] += da[c];
  }
}

// ==================================================================================== digit embedding
inline std::vector<int64_t> digit_powers(int64_t K, int64_t base) {
  std::vector<int64_t> pw(K);
  int64_t v = 1;
  for (int64_t s = K - 1; s >= 0; --s) {
    pw[s] = v;
    v *= base;
  }
  return pw;
}

struct DigitArgs {
  const int64_t* x;  // positions [M, d] or digit ids [M, L], contiguous
  int64_t sxm, M, L, T, D, K, base;
  bool from_positions;
  const int64_t* pw;  // base^(K-1-slot)
  // digit j of sequence m, or -1 when the input lies outside the encodable range (a position < 0 or >=
  // base**K, a digit id outside [0, base))
  inline int64_t digit(int64_t m, int64_t j) const {
    if (from_positions) {
      const int64_t p = x[m * sxm + j / K];
      if (p < 0 || p / pw[0] >= base) return -1;
      return (p / pw[j % K]) % base;
    }
    const int64_t d = x[m * sxm + j];
    return (d < 0 || d >= base) ? -1 : d;
  }
};

// h0[m, j] = (tok[digit] + pos[j]) + dim[j / K] (the reference's order, in the table dtype); h0[m, L] = cls
template <typename scalar_t>
bool embed_fwd_kernel(const DigitArgs& a, const scalar_t* tok, const scalar_t* pos, const scalar_t* dim,
                      const scalar_t* cls, scalar_t* out) {
  std::atomic<bool> bad{false};
  const int64_t D = a.D, L = a.L, T = a.T;
  at::parallel_for(0, a.M, std::max<int64_t>(1, 16384 / (T * D) + 1), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      scalar_t* o = out + m * T * D;
      for (int64_t j = 0; j < L; ++j) {
        int64_t dig = a.digit(m, j);
        if (dig < 0) {
          bad.store(true, std::memory_order_relaxed);
          dig = 0;
        }
        const scalar_t* __restrict tr = tok + dig * D;
        const scalar_t* __restrict pr = pos + j * D;
        scalar_t* __restrict orow = o + j * D;
        if (dim != nullptr) {
          const scalar_t* __restrict dr = dim + (j / a.K) * D;
          for (int64_t c = 0; c < D; ++c) orow[c] = (tr[c] + pr[c]) + dr[c];
        } else {
          for (int64_t c = 0; c < D; ++c) orow[c] = tr[c] + pr[c];
        }
      }
      std::memcpy(o + L * D, cls, D * sizeof(scalar_t));
    }
  });
  return !bad.load();
}

Tensor digit_embed_fwd_cpu(const Tensor& x_, const Tensor& tok_, const Tensor& pos_, const OptTensor& dim_,
                           const Tensor& cls_, bool from_positions, int64_t max_digits) {
  TORCH_CHECK(x_.dim() == 1 || x_.dim() == 2, "seqpe_ext::digit_embed_fwd: x must be [M] or [M, d|L]");
  TORCH_CHECK(!x_.is_floating_point() && !x_.is_complex(), "seqpe_ext::digit_embed_fwd: x must be integer");
  TORCH_CHECK(tok_.dim() == 2 && pos_.dim() == 2, "seqpe_ext::digit_embed_fwd: tok [base, D], pos [L, D]");
  check_float_dtype(tok_, "digit_embed_fwd", "tok");
  const int64_t M = x_.size(0);
  const int64_t base = tok_.size(0), D = tok_.size(1), L = pos_.size(0), T = L + 1, K = max_digits;
  TORCH_CHECK(K >= 1, "seqpe_ext::digit_embed_fwd: max_digits must be >= 1");
  TORCH_CHECK(pos_.size(1) == D && cls_.numel() == D, "seqpe_ext::digit_embed_fwd: width mismatch");
  const Tensor x = as_dtype(x_, at::kLong);
  const int64_t sxm = x.dim() == 2 ? x.size(1) : 1;
  if (from_positions) {
    TORCH_CHECK(sxm * K == L, "seqpe_ext::digit_embed_fwd: positions [M, ", sxm, "] with max_digits ", K,
                " do not match L = ", L);
  } else {
    TORCH_CHECK(sxm == L, "seqpe_ext::digit_embed_fwd: digits must be [M, ", L, "]");
  }
  const auto st = tok_.scalar_type();
  const Tensor tok = tok_.contiguous(), pos = as_dtype(pos_, st), cls = as_dtype(cls_, st).view({D});
  const bool has_dim = has(dim_);
  const Tensor dim = has_dim ? as_dtype(*dim_, st).view({-1, D}) : Tensor();
  if (has_dim) TORCH_CHECK(dim.size(0) * K == L, "seqpe_ext::digit_embed_fwd: dim table has ", dim.size(0), " rows");
  Tensor out = alloc({M, T, D}, tok.options());
  if (M == 0 || D == 0) return out;
  const std::vector<int64_t> pw = digit_powers(K, base);
  const DigitArgs args{x.data_ptr<int64_t>(), sxm, M, L, T, D, K, base, from_positions, pw.data()};
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "seqpe_digit_embed_fwd", [&] {
    ok = embed_fwd_kernel<scalar_t>(args, tok.data_ptr<scalar_t>(), pos.data_ptr<scalar_t>(),
                                    has_dim ? dim.data_ptr<scalar_t>() : nullptr, cls.data_ptr<scalar_t>(),
                                    out.data_ptr<scalar_t>());
  });
  TORCH_CHECK(ok, "seqpe_ext::digit_embed_fwd: ", from_positions ? "a position" : "a digit id",
              " is outside the encodable range (digits must lie in [0, ", base, "))");
  return out;
}

// Table gradients, deterministic: fixed chunks of sequences (independent of the thread count) accumulate
// into partial tables [base token rows | L digit-position rows | CLS row], summed in chunk order.
template <typename acc_t>
bool embed_bwd_kernel(const DigitArgs& a, const char* g, ScalarType gst, int64_t gsz, acc_t* part, int64_t per,
                      int64_t n_chunks, acc_t* total) {
  std::atomic<bool> bad{false};
  const int64_t D = a.D, T = a.T, L = a.L, rows = a.base + T;
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> buf(D);
    for (int64_t ch = c0; ch < c1; ++ch) {
      acc_t* P = part + ch * rows * D;
      const int64_t m_end = std::min(a.M, (ch + 1) * per);
      for (int64_t m = ch * per; m < m_end; ++m) {
        for (int64_t j = 0; j < T; ++j) {
          const acc_t* __restrict gr = read_row<acc_t>(g + ((m * T + j) * D) * gsz, gst, buf.data(), D);
          acc_t* __restrict pr = P + (a.base + j) * D;
          for (int64_t c = 0; c < D; ++c) pr[c] += gr[c];
          if (j < L) {
            const int64_t dig = a.digit(m, j);
            if (dig < 0) {
              bad.store(true, std::memory_order_relaxed);
              continue;
            }
            acc_t* __restrict tr = P + dig * D;
            for (int64_t c = 0; c < D; ++c) tr[c] += gr[c];
          }
        }
      }
    }
  });
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      acc_t* __restrict o = total + r * D;
      std::fill(o, o + D, acc_t(0));
      for (int64_t ch = 0; ch < n_chunks; ++ch) {
        const acc_t* __restrict pr = part + (ch * rows + r) * D;
        for (int64_t c = 0; c < D; ++c) o[c] += pr[c];
      }
    }
  });
  return !bad.load();
}

Tensor4 digit_embed_bwd_cpu(const Tensor& g_, const Tensor& x_, bool from_positions, int64_t max_digits,
                            int64_t base, int64_t data_dim, const OptTensor& table_grad) {
  TORCH_CHECK(g_.dim() == 3, "seqpe_ext::digit_embed_bwd: g must be [M, T, D]");
  check_float_dtype(g_, "digit_embed_bwd", "g");
  const int64_t M = g_.size(0), T = g_.size(1), D = g_.size(2), L = T - 1, K = max_digits;
  TORCH_CHECK(K >= 1 && L == data_dim * K, "seqpe_ext::digit_embed_bwd: T-1 must equal data_dim*max_digits");
  const Tensor g = g_.contiguous();  // incoming gradients may be strided or expanded
  const Tensor x = as_dtype(x_, at::kLong);
  const int64_t sxm = x.dim() == 2 ? x.size(1) : 1;
  const auto st = g.scalar_type();
  const auto acc_dt = st == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor tg = table_grad_in(table_grad, g, base, L, D, acc_dt);
  const int64_t per = std::max<int64_t>(16, cdiv(M, 64));
  const int64_t n_chunks = std::max<int64_t>(1, cdiv(M, per));
  const int64_t rows = base + T, n_out = base + T + (data_dim > 1 ? data_dim : 0);
  Tensor part = at::zeros({n_chunks, rows, D}, g.options().dtype(acc_dt));
  Tensor total = alloc({rows, D}, g.options().dtype(acc_dt));
  Tensor out = alloc({n_out, D}, g.options().dtype(acc_dt));
  const std::vector<int64_t> pw = digit_powers(K, base);
  const DigitArgs args{x.data_ptr<int64_t>(), sxm, M, L, T, D, K, base, from_positions, pw.data()};
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES(acc_dt, "seqpe_digit_embed_bwd", [&] {
    ok = embed_bwd_kernel<scalar_t>(args, byte_ptr(g), st, g.element_size(), part.data_ptr<scalar_t>(), per,
                                    n_chunks, total.data_ptr<scalar_t>());
    const scalar_t* tot = total.data_ptr<scalar_t>();
    const scalar_t* tab = tg.defined() ? tg.data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t r = 0; r < n_out; ++r)
      for (int64_t c = 0; c < D; ++c) o[r * D + c] = embed_grad_out<scalar_t>(r, c, D, base, L, K, tot, 1, rows, tab);
  });
  TORCH_CHECK(ok, "seqpe_ext::digit_embed_bwd: a digit is outside [0, ", base, ")");
  Tensor d_tok = out.narrow(0, 0, base).to(st, /*non_blocking=*/false, /*copy=*/true);
  Tensor d_pos = out.narrow(0, base, L).to(st, false, true);
  Tensor d_cls = out.narrow(0, base + L, 1).to(st, false, true).view({1, 1, D});
  Tensor d_dim = data_dim > 1 ? out.narrow(0, base + T, data_dim).to(st, false, true).view({data_dim, 1, D})
                              : alloc({0}, g.options());
  return {d_tok, d_pos, d_dim, d_cls};
}

// ==================================================================================== residual + LN
struct LnFwdArgs {
  const char *x, *y;  // rows of x (dtype xst) and y (dtype yst)
  char *h, *a;        // outputs: h (x dtype, when y), a (a dtype, when LN)
  ScalarType xst, yst, ast;
  int64_t xs, ys, as;  // element sizes
  int64_t R, D;
  bool has_y, has_ln, dropout;
  uint64_t seed;
  float p;
};

template <typename acc_t>
void ln_fwd_kernel(const LnFwdArgs& a, const acc_t* w, const acc_t* b, acc_t eps, acc_t scale, acc_t* mean,
                   acc_t* rstd) {
  const int64_t D = a.D;
  at::parallel_for(0, a.R, std::max<int64_t>(1, 8192 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> xbuf(D), ybuf(D), hbuf(D), obuf(D);
    for (int64_t row = r0; row < r1; ++row) {
      const acc_t* __restrict xr = read_row<acc_t>(a.x + row * D * a.xs, a.xst, xbuf.data(), D);
      const acc_t* __restrict hv = xr;
      if (a.has_y) {
        const acc_t* __restrict yr = read_row<acc_t>(a.y + row * D * a.ys, a.yst, ybuf.data(), D);
        acc_t* __restrict hr = hbuf.data();
        if (a.dropout) {
          // offsets row * D + c as int32 (wrapped), as the Triton kernel's (row * D + cols).to(tl.int32)
          dropout_add_row<acc_t>(xr, yr, hr, D, a.seed, static_cast<uint32_t>(static_cast<uint64_t>(row * D)), a.p,
                                 scale);
        } else {
          add_row<acc_t>(xr, yr, hr, D);
        }
        write_row<acc_t>(a.h + row * D * a.xs, a.xst, hr, D);
        hv = hr;
      }
      if (a.has_ln) {
        acc_t mu, rs;
        ln_stats_row<acc_t>(hv, D, eps, mu, rs);
        acc_t* __restrict o = out_row<acc_t>(a.a + row * D * a.as, a.ast, obuf.data());
        ln_apply_row<acc_t>(hv, w, b, mu, rs, o, D);
        write_row<acc_t>(a.a + row * D * a.as, a.ast, o, D);
        mean[row] = mu;
        rstd[row] = rs;
      }
    }
  });
}

Tensor4 residual_layernorm_fwd_cpu(const Tensor& x_, const OptTensor& y_, const OptTensor& w_, const OptTensor& b_,
                                   double eps, double p, const OptTensor& seeds, int64_t seed_idx,
                                   int64_t out_dtype) {
  TORCH_CHECK(x_.dim() == 2, "seqpe_ext::residual_layernorm_fwd: x must be [R, D]");
  check_float_dtype(x_, "residual_layernorm_fwd", "x");
  const Tensor x = x_.contiguous();
  const int64_t R = x.size(0), D = x.size(1);
  const bool has_y = has(y_), has_ln = has(w_);
  Tensor y;
  if (has_y) {
    TORCH_CHECK(y_->sizes() == x.sizes(), "seqpe_ext::residual_layernorm_fwd: y must have x's shape ", x.sizes(),
                ", got ", y_->sizes());
    check_float_dtype(*y_, "residual_layernorm_fwd", "y");
    y = y_->contiguous();
  }
  const bool f64 = x.scalar_type() == at::kDouble;
  const auto stat_dt = f64 ? at::kDouble : at::kFloat;
  Tensor w, b;
  if (has_ln) {
    TORCH_CHECK(w_->numel() == D, "seqpe_ext::residual_layernorm_fwd: w must have D = ", D, " elements");
    w = as_dtype(*w_, stat_dt);
    b = has(b_) ? as_dtype(*b_, stat_dt) : at::zeros({D}, x.options().dtype(stat_dt));
    TORCH_CHECK(b.numel() == D, "seqpe_ext::residual_layernorm_fwd: b must have D = ", D, " elements");
  }
  Tensor h = has_y ? alloc(x.sizes(), x.options()) : alloc({0}, x.options());
  Tensor a = has_ln ? alloc({R, D}, x.options().dtype(dtype_from_code(out_dtype))) : alloc({0}, x.options());
  Tensor mean = has_ln ? alloc({R}, x.options().dtype(stat_dt)) : at::zeros({R}, x.options().dtype(stat_dt));
  Tensor rstd = has_ln ? alloc({R}, x.options().dtype(stat_dt)) : at::zeros({R}, x.options().dtype(stat_dt));
  const bool dropout = has_y && p > 0.0;
  uint64_t seed = 0;
  if (dropout) {
    check_seeds(seeds, seed_idx, "residual_layernorm_fwd");
    seed = host_seed(seeds, seed_idx);
  }
  if (R == 0 || D == 0 || (!has_y && !has_ln)) return {h, a, mean, rstd};
  const LnFwdArgs args{byte_ptr(x), has_y ? byte_ptr(y) : nullptr, has_y ? byte_ptr(h) : nullptr,
                       has_ln ? byte_ptr(a) : nullptr, x.scalar_type(), has_y ? y.scalar_type() : x.scalar_type(),
                       has_ln ? a.scalar_type() : x.scalar_type(), x.element_size(), has_y ? y.element_size() : 0,
                       has_ln ? a.element_size() : 0, R, D, has_y, has_ln, dropout, seed, static_cast<float>(p)};
  AT_DISPATCH_FLOATING_TYPES(stat_dt, "seqpe_residual_layernorm_fwd", [&] {
    // eps and the dropout scale are fp32 kernel arguments in Triton; fp64 keeps them in fp64
    const scalar_t epsv = static_cast<scalar_t>(f64 ? eps : static_cast<double>(static_cast<float>(eps)));
    ln_fwd_kernel<scalar_t>(args, has_ln ? w.data_ptr<scalar_t>() : nullptr, has_ln ? b.data_ptr<scalar_t>() : nullptr,
                            epsv, acc_scale<scalar_t>(p), mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>());
  });
  return {h, a, mean, rstd};
}

struct LnBwdArgs {
  const char *x, *da, *dh;  // ln_in rows, incoming gradients
  char *dx, *dy;
  ScalarType xst, dast, dhst, yst;
  int64_t xs, das, dhs, ys;
  int64_t R, D, per, n_chunks;
  bool has_dh, has_ln, has_y, dropout;
  uint64_t seed;
  float p;
  int64_t dh_every;  // > 0: dh holds rows r % dh_every == dh_every - 1 only, densely (check_ln_dh)
};

// dyb_part (may be null): per-chunk column sums of dy (after dropout, before rounding to y's dtype)
template <typename acc_t>
void ln_bwd_kernel(const LnBwdArgs& a, const acc_t* w, const acc_t* mean, const acc_t* rstd, acc_t scale,
                   acc_t* dw_part, acc_t* db_part, acc_t* dyb_part) {
  const int64_t D = a.D;
  at::parallel_for(0, a.n_chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> gbuf(D), hbuf(D), abuf(D), ybuf(D);
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t r_end = std::min(a.R, (ch + 1) * a.per);
      for (int64_t row = ch * a.per; row < r_end; ++row) {
        acc_t* __restrict g = gbuf.data();
        if (a.has_dh && (a.dh_every == 0 || row % a.dh_every == a.dh_every - 1)) {
          const int64_t dr = a.dh_every ? row / a.dh_every : row;
          const acc_t* src = read_row<acc_t>(a.dh + dr * D * a.dhs, a.dhst, g, D);
          if (src != g) std::memcpy(g, src, D * sizeof(acc_t));
        } else {
          std::fill(g, g + D, acc_t(0));
        }
        if (a.has_ln) {
          const acc_t* __restrict hr = read_row<acc_t>(a.x + row * D * a.xs, a.xst, hbuf.data(), D);
          const acc_t* __restrict dar = read_row<acc_t>(a.da + row * D * a.das, a.dast, abuf.data(), D);
          ln_bwd_row<acc_t>(hr, dar, w, mean[row], rstd[row], g, dw_part + ch * D, db_part + ch * D, D);
        }
        write_row<acc_t>(a.dx + row * D * a.xs, a.xst, g, D);
        if (a.has_y) {
          const acc_t* yrow = g;
          if (a.dropout) {
            acc_t* __restrict o = out_row<acc_t>(a.dy + row * D * a.ys, a.yst, ybuf.data());
            dropout_row<acc_t>(g, o, D, a.seed, static_cast<uint32_t>(static_cast<uint64_t>(row * D)), a.p, scale);
            write_row<acc_t>(a.dy + row * D * a.ys, a.yst, o, D);
            yrow = o;
          } else {
            write_row<acc_t>(a.dy + row * D * a.ys, a.yst, g, D);
          }
          if (dyb_part != nullptr) {
            acc_t* __restrict pb = dyb_part + ch * D;
            for (int64_t c = 0; c < D; ++c) pb[c] += yrow[c];
          }
        }
      }
    }
  });
}

// ordered sum over chunk partials [n, D] -> [D] (deterministic, independent of the thread count)
template <typename acc_t>
void sum_partials(const acc_t* part, int64_t n, int64_t D, acc_t* out) {
  std::fill(out, out + D, acc_t(0));
  for (int64_t ch = 0; ch < n; ++ch) {
    const acc_t* __restrict pr = part + ch * D;
    for (int64_t c = 0; c < D; ++c) out[c] += pr[c];
  }
}

// bias: also the column sums of dy (the bias gradient of the GEMM that produced y; empty without y)
Tensor5 rln_bwd_cpu(const OptTensor& da_, const OptTensor& dh_, const Tensor& ln_in_, const OptTensor& w_,
                    const Tensor& mean_, const Tensor& rstd_, double p, const OptTensor& seeds, int64_t seed_idx,
                    bool has_y, int64_t y_dtype, bool bias, int64_t dh_every) {
  TORCH_CHECK(ln_in_.dim() == 2, "seqpe_ext::residual_layernorm_bwd: ln_in must be [R, D]");
  check_float_dtype(ln_in_, "residual_layernorm_bwd", "ln_in");
  const Tensor x = ln_in_.contiguous();
  const int64_t R = x.size(0), D = x.size(1);
  const bool has_dh = has(dh_);
  const bool has_ln = has(w_) && has(da_);
  const auto acc_dt = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // incoming gradients may be expanded (stride 0, from .sum()) or otherwise strided
  const Tensor da = has_ln ? da_->contiguous() : Tensor();
  const Tensor dh = has_dh ? dh_->contiguous() : Tensor();
  if (has_ln) TORCH_CHECK(da.sizes() == x.sizes(), "seqpe_ext::residual_layernorm_bwd: da must match ln_in");
  if (has_dh) check_ln_dh(dh, x, dh_every);
  const Tensor w = has_ln ? as_dtype(*w_, acc_dt) : Tensor();
  const Tensor mean = has_ln ? as_dtype(mean_, acc_dt) : Tensor();
  const Tensor rstd = has_ln ? as_dtype(rstd_, acc_dt) : Tensor();
  if (has_ln) {
    TORCH_CHECK(w.numel() == D, "seqpe_ext::residual_layernorm_bwd: w must have D = ", D, " elements");
    TORCH_CHECK(mean.numel() == R && rstd.numel() == R, "seqpe_ext::residual_layernorm_bwd: mean/rstd must be [R]");
  }
  Tensor dx = alloc(x.sizes(), x.options());
  Tensor dy = has_y ? alloc({R, D}, x.options().dtype(dtype_from_code(y_dtype))) : alloc({0}, x.options());
  const bool dropout = has_y && p > 0.0;
  uint64_t seed = 0;
  if (dropout) {
    check_seeds(seeds, seed_idx, "residual_layernorm_bwd");
    seed = host_seed(seeds, seed_idx);
  }
  const int64_t per = std::max<int64_t>(8, cdiv(R, 128));
  const int64_t n_chunks = R > 0 ? cdiv(R, per) : 0;
  // chunk partials of dw, db (with the LN) and of dy (bias) in one buffer [k, n, D], zeroed in place (one
  // allocation, no fill_ dispatches)
  const int64_t n_parts = std::max<int64_t>(n_chunks, 1);
  const bool dyb = bias && has_y;
  const int64_t k_parts = 2 * has_ln + dyb;
  Tensor parts = k_parts ? alloc({k_parts, n_parts, D}, x.options().dtype(acc_dt)) : Tensor();
  if (k_parts) std::memset(parts.data_ptr(), 0, parts.nbytes());
  const LnBwdArgs args{byte_ptr(x), has_ln ? byte_ptr(da) : nullptr, has_dh ? byte_ptr(dh) : nullptr,
                       byte_ptr(dx), has_y ? byte_ptr(dy) : nullptr, x.scalar_type(),
                       has_ln ? da.scalar_type() : x.scalar_type(), has_dh ? dh.scalar_type() : x.scalar_type(),
                       dy.scalar_type(), x.element_size(), has_ln ? da.element_size() : 0,
                       has_dh ? dh.element_size() : 0, dy.element_size(), R, D, per, n_chunks, has_dh, has_ln, has_y,
                       dropout, seed, static_cast<float>(p), has_dh ? dh_every : 0};
  Tensor dw, db, dybs;
  AT_DISPATCH_FLOATING_TYPES(acc_dt, "seqpe_residual_layernorm_bwd", [&] {
    scalar_t* dyb_part = dyb ? parts.data_ptr<scalar_t>() + (k_parts - 1) * n_parts * D : nullptr;
    ln_bwd_kernel<scalar_t>(args, has_ln ? w.data_ptr<scalar_t>() : nullptr,
                            has_ln ? mean.data_ptr<scalar_t>() : nullptr, has_ln ? rstd.data_ptr<scalar_t>() : nullptr,
                            acc_scale<scalar_t>(p), has_ln ? parts.data_ptr<scalar_t>() : nullptr,
                            has_ln ? parts.data_ptr<scalar_t>() + n_parts * D : nullptr, dyb_part);
    if (dyb) {
      dybs = alloc({D}, x.options().dtype(acc_dt));
      sum_partials<scalar_t>(dyb_part, n_parts, D, dybs.data_ptr<scalar_t>());
    }
    if (has_ln) {  // summed straight into the outputs when the weight is in the accumulation dtype
      const bool same = w_->scalar_type() == acc_dt;
      Tensor dws = alloc(same ? w_->sizes() : at::IntArrayRef{D}, x.options().dtype(acc_dt));
      Tensor dbs = alloc(same ? w_->sizes() : at::IntArrayRef{D}, x.options().dtype(acc_dt));
      sum_partials<scalar_t>(parts.data_ptr<scalar_t>(), n_parts, D, dws.data_ptr<scalar_t>());
      sum_partials<scalar_t>(parts.data_ptr<scalar_t>() + n_parts * D, n_parts, D, dbs.data_ptr<scalar_t>());
      dw = same ? dws : dws.to(w_->scalar_type()).view(w_->sizes());
      db = same ? dbs : dbs.to(w_->scalar_type()).view(w_->sizes());
    }
  });
  if (!has_ln) {
    dw = alloc({0}, x.options());
    db = alloc({0}, x.options());
  }
  if (!dyb) dybs = alloc({0}, x.options());
  return {dx, dy, dw, db, dybs};
}

// ==================================================================================== gelu_new
constexpr int64_t kGeluBlock = 2048;

template <typename acc_t>
inline void gelu_fwd_block(const acc_t* __restrict z, acc_t* __restrict u, int64_t n) {
  const acc_t C = static_cast<acc_t>(kGeluC), A = static_cast<acc_t>(0.044715);
  for (int64_t i = 0; i < n; ++i) {
    const acc_t x = z[i];
    const acc_t t = tanh_k(C * (x + A * x * x * x));
    u[i] = acc_t(0.5) * x * (acc_t(1) + t);
  }
}

template <typename acc_t>
inline void gelu_bwd_block(const acc_t* __restrict du, const acc_t* __restrict z, acc_t* __restrict dz, int64_t n) {
  const acc_t C = static_cast<acc_t>(kGeluC), A = static_cast<acc_t>(0.044715);
  const acc_t A3 = static_cast<acc_t>(3.0 * 0.044715);
  for (int64_t i = 0; i < n; ++i) {
    const acc_t x = z[i];
    const acc_t t = tanh_k(C * (x + A * x * x * x));
    const acc_t dt = (acc_t(1) - t * t) * C * (acc_t(1) + A3 * x * x);
    dz[i] = du[i] * (acc_t(0.5) * (acc_t(1) + t) + acc_t(0.5) * x * dt);
  }
}

Tensor gelu_new_fwd_cpu(const Tensor& z_) {
  check_float_dtype(z_, "gelu_new_fwd", "z");
  const Tensor z = z_.contiguous();
  Tensor u = alloc(z.sizes(), z.options());
  const int64_t n = z.numel();
  if (n == 0) return u;
  const auto st = z.scalar_type();
  const int64_t es = z.element_size();
  AT_DISPATCH_FLOATING_TYPES(st == at::kDouble ? at::kDouble : at::kFloat, "seqpe_gelu_fwd", [&] {
    using acc_t = scalar_t;
    const char* zp = byte_ptr(z);
    char* up = byte_ptr(u);
    at::parallel_for(0, cdiv(n, kGeluBlock), 4, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> zb(kGeluBlock), ub(kGeluBlock);
      for (int64_t bi = b0; bi < b1; ++bi) {
        const int64_t i0 = bi * kGeluBlock, len = std::min(kGeluBlock, n - i0);
        const acc_t* zr = read_row<acc_t>(zp + i0 * es, st, zb.data(), len);
        acc_t* ur = out_row<acc_t>(up + i0 * es, st, ub.data());
        gelu_fwd_block<acc_t>(zr, ur, len);
        write_row<acc_t>(up + i0 * es, st, ur, len);
      }
    });
  });
  return u;
}

Tensor gelu_new_bwd_cpu(const Tensor& du_, const Tensor& z_) {
  check_float_dtype(z_, "gelu_new_bwd", "z");
  TORCH_CHECK(du_.sizes() == z_.sizes(), "seqpe_ext::gelu_new_bwd: du must have z's shape");
  const Tensor z = z_.contiguous();
  const Tensor du = du_.contiguous();
  Tensor dz = alloc(z.sizes(), z.options());
  const int64_t n = z.numel();
  if (n == 0) return dz;
  const auto st = z.scalar_type(), dst = du.scalar_type();
  const int64_t es = z.element_size(), des = du.element_size();
  AT_DISPATCH_FLOATING_TYPES(st == at::kDouble ? at::kDouble : at::kFloat, "seqpe_gelu_bwd", [&] {
    using acc_t = scalar_t;
    const char* zp = byte_ptr(z);
    const char* dup = byte_ptr(du);
    char* dzp = byte_ptr(dz);
    at::parallel_for(0, cdiv(n, kGeluBlock), 4, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> zb(kGeluBlock), gb(kGeluBlock), ob(kGeluBlock);
      for (int64_t bi = b0; bi < b1; ++bi) {
        const int64_t i0 = bi * kGeluBlock, len = std::min(kGeluBlock, n - i0);
        const acc_t* zr = read_row<acc_t>(zp + i0 * es, st, zb.data(), len);
        const acc_t* gr = read_row<acc_t>(dup + i0 * des, dst, gb.data(), len);
        acc_t* orow = out_row<acc_t>(dzp + i0 * es, st, ob.data());
        gelu_bwd_block<acc_t>(gr, zr, orow, len);
        write_row<acc_t>(dzp + i0 * es, st, orow, len);
      }
    });
  });
  return dz;
}

// dz = du * gelu_new'(z) over [R, C], and db = dz's column sums (the c_fc bias gradient) from the unrounded dz:
// row chunks in parallel, per-chunk partials summed in chunk order (deterministic, thread-count independent)
Tensor2 gelu_new_bwd_bias_cpu(const Tensor& du_, const Tensor& z_) {
  Tensor z, du, dz;
  std::tie(z, du, dz) = gelu_bwd_bias_args(du_, z_);
  const int64_t R = z.size(0), C = z.size(1);
  const auto st = z.scalar_type(), dst = du.scalar_type();
  const auto acc_dt = st == at::kDouble ? at::kDouble : at::kFloat;
  Tensor db = alloc({C}, z.options().dtype(acc_dt));
  const int64_t es = z.element_size(), des = du.element_size();
  const int64_t per = std::max<int64_t>(8, cdiv(R, 128));
  const int64_t n_chunks = R > 0 ? cdiv(R, per) : 0;
  AT_DISPATCH_FLOATING_TYPES(acc_dt, "seqpe_gelu_bwd_bias", [&] {
    using acc_t = scalar_t;
    std::vector<acc_t> part(static_cast<size_t>(std::max<int64_t>(n_chunks, 1) * C), acc_t(0));
    const char* zp = byte_ptr(z);
    const char* dup = byte_ptr(du);
    char* dzp = byte_ptr(dz);
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<acc_t> zb(C), gb(C), ob(C);
      for (int64_t ch = c0; ch < c1; ++ch) {
        acc_t* __restrict pc = part.data() + ch * C;
        for (int64_t row = ch * per; row < std::min(R, (ch + 1) * per); ++row) {
          const acc_t* zr = read_row<acc_t>(zp + row * C * es, st, zb.data(), C);
          const acc_t* gr = read_row<acc_t>(dup + row * C * des, dst, gb.data(), C);
          acc_t* orow = out_row<acc_t>(dzp + row * C * es, st, ob.data());
          gelu_bwd_block<acc_t>(gr, zr, orow, C);
          for (int64_t c = 0; c < C; ++c) pc[c] += orow[c];
          write_row<acc_t>(dzp + row * C * es, st, orow, C);
        }
      }
    });
    sum_partials<acc_t>(part.data(), std::max<int64_t>(n_chunks, 1), C, db.data_ptr<acc_t>());
  });
  return {dz, db};
}

// ==================================================================================== tiny attention
constexpr double kMaskedLogit = -3.0e38;  // the Triton kernel's stand-in for finfo.min

struct AttnGeom {
  int64_t M, TQ, T, D, H, DH, L;
  int64_t sqm, sqt, skm, skt, svm, svt;  // element strides of the q / k / v views
  int64_t q_off, k_off, v_off;           // element offsets of the views in their base tensors
  bool causal, has_mask, dropout;
  int64_t q_start;
  double sdiv, p;
  uint64_t seed;
  // indexed operands (layer 0: tokens are rows of a (digit, slot) table): token (m, t) is table row
  // rows[m * T + t]; q_rows: q too (from a [n, 3D] table), else only k / v (a [n, 2D] table)
  const int64_t* rows = nullptr;
  bool q_rows = false;
  // element offset of query row i / key row j of sequence m (add the view's offset and the head's column)
  int64_t qrow(int64_t m, int64_t i) const { return q_rows ? rows[m * T + i] * sqt : m * sqm + i * sqt; }
  int64_t krow(int64_t m, int64_t j) const { return rows ? rows[m * T + j] * skt : m * skm + j * skt; }
};

struct AttnViews {
  Tensor qbase, kvbase, rows;  // qbase holds q (and k, v when kvbase is undefined); rows: indexed operands
  AttnGeom g;
};

// (q, k, v) strided views, as the Python launcher's _views: from one [M, T, 3D] c_attn output, or
// q [M, TQ, D] + kv [M, T, 2D]. Views need a contiguous last dim; anything else is made contiguous.
void attn_views_strided(const Tensor& qkv_, const OptTensor& kv_, const char* op, AttnViews& v) {
  TORCH_CHECK(qkv_.dim() == 3, "seqpe_ext::", op, ": qkv must be [M, T, 3D] (or q [M, TQ, D] with kv)");
  AttnGeom& g = v.g;
  v.qbase = qkv_.stride(2) == 1 ? qkv_ : qkv_.contiguous();
  g.M = v.qbase.size(0);
  g.TQ = v.qbase.size(1);
  if (has(kv_)) {
    TORCH_CHECK(kv_->dim() == 3 && kv_->size(0) == g.M && kv_->size(2) % 2 == 0,
                "seqpe_ext::", op, ": kv must be [M, T, 2D]");
    v.kvbase = kv_->stride(2) == 1 ? *kv_ : kv_->contiguous();
    g.D = v.kvbase.size(2) / 2;
    TORCH_CHECK(v.qbase.size(2) == g.D, "seqpe_ext::", op, ": q width ", v.qbase.size(2), " != kv width/2 ", g.D);
    g.T = v.kvbase.size(1);
    g.sqm = v.qbase.stride(0), g.sqt = v.qbase.stride(1), g.q_off = 0;
    g.skm = g.svm = v.kvbase.stride(0), g.skt = g.svt = v.kvbase.stride(1);
    g.k_off = 0, g.v_off = g.D;
  } else {
    TORCH_CHECK(v.qbase.size(2) % 3 == 0, "seqpe_ext::", op, ": qkv width must be 3D");
    g.D = v.qbase.size(2) / 3;
    g.T = g.TQ;
    g.sqm = g.skm = g.svm = v.qbase.stride(0);
    g.sqt = g.skt = g.svt = v.qbase.stride(1);
    g.q_off = 0, g.k_off = g.D, g.v_off = 2 * g.D;
  }
}

// The indexed form (the Triton kernel's, layer 0: no [M, T, 3D] gather; attn_table in seqpe_ext.h): token (m, t)
// is table row rows[m, t], checked here to lie in the table (the CUDA op stages NaN instead).
void attn_views_indexed(const Tensor& qkv_, const OptTensor& kv_, const Tensor& rows_, int64_t q_start,
                        const char* op, AttnViews& v) {
  const AttnTable t = attn_table(qkv_, kv_, rows_, q_start, op);
  AttnGeom& g = v.g;
  v.rows = t.rows;
  g.M = t.M, g.T = t.T, g.D = t.D;
  const int64_t n = t.tab.size(0);
  g.rows = v.rows.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < v.rows.numel(); ++i)
    TORCH_CHECK(g.rows[i] >= 0 && g.rows[i] < n, "seqpe_ext::", op, ": table row ", g.rows[i], " outside [0, ", n,
                ")");
  g.skm = g.svm = 0, g.skt = g.svt = t.tab.stride(0);
  if (!t.q_table) {
    v.qbase = qkv_.stride(2) == 1 ? qkv_ : qkv_.contiguous();
    v.kvbase = t.tab;
    g.TQ = v.qbase.size(1);
    g.sqm = v.qbase.stride(0), g.sqt = v.qbase.stride(1), g.q_off = 0;
    g.k_off = 0, g.v_off = g.D;
  } else {
    v.qbase = t.tab;
    g.TQ = g.T;
    g.q_rows = true;
    g.sqm = 0, g.sqt = t.tab.stride(0);
    g.q_off = 0, g.k_off = g.D, g.v_off = 2 * g.D;
  }
}

AttnViews attn_views(const Tensor& qkv_, const OptTensor& kv_, const OptTensor& pad_mask, int64_t num_heads,
                     bool causal, int64_t q_start, double scale_div, double p, const OptTensor& seeds,
                     int64_t seed_idx, const char* op, const OptTensor& rows) {
  check_float_dtype(qkv_, op, "qkv");
  AttnViews v;
  AttnGeom& g = v.g;
  if (has(rows))
    attn_views_indexed(qkv_, kv_, *rows, q_start, op, v);
  else
    attn_views_strided(qkv_, kv_, op, v);
  if (v.kvbase.defined())
    TORCH_CHECK(v.kvbase.scalar_type() == v.qbase.scalar_type(), "seqpe_ext::", op,
                ": q and kv must share a dtype, got ", v.qbase.scalar_type(), " and ", v.kvbase.scalar_type());
  TORCH_CHECK(num_heads >= 1 && g.D % num_heads == 0, "seqpe_ext::", op, ": num_heads=", num_heads,
              " does not divide width ", g.D);
  g.H = num_heads;
  g.DH = g.D / num_heads;
  g.has_mask = has(pad_mask);
  g.L = g.has_mask ? pad_mask->size(1) : 0;
  if (g.has_mask)
    TORCH_CHECK(pad_mask->dim() == 2 && pad_mask->size(0) == g.M && pad_mask->size(1) == g.T - 1,
                "seqpe_ext::", op, ": pad_mask must be [M, T-1] (no entry for the CLS key)");
  g.causal = causal;
  g.q_start = q_start;
  g.sdiv = scale_div;
  g.p = p;
  g.dropout = p > 0.0;
  g.seed = 0;
  if (g.dropout) {
    check_seeds(seeds, seed_idx, op);
    g.seed = host_seed(seeds, seed_idx);
  }
  return v;
}

// dot product of two contiguous rows
template <typename acc_t>
inline acc_t dot_row(const acc_t* __restrict a, const acc_t* __restrict b, int64_t n) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

// y += a * x over a contiguous row
template <typename acc_t>
inline void axpy_row(acc_t a, const acc_t* __restrict x, acc_t* __restrict y, int64_t n) {
  for (int64_t d = 0; d < n; ++d) y[d] += a * x[d];
}

// may query row i (absolute row q_start + i) of sequence m attend to key j? (causal, key padding; the
// CLS key j = T-1 has no pad-mask entry and is never masked)
inline bool attn_allowed(const AttnGeom& g, const float* pad, int64_t m, int64_t i, int64_t j) {
  bool allowed = !g.causal || j <= g.q_start + i;
  if (g.has_mask && j < g.L) allowed = allowed && pad[m * g.L + j] != 0.0f;
  return allowed;
}

// softmax probabilities of query row i of sequence m (no dropout); s has T entries
template <typename acc_t, int DHC>
inline void attn_probs_row(const AttnGeom& g, const float* pad, int64_t m, int64_t i, const acc_t* q,
                           const acc_t* const* krows, acc_t* s) {
  const int64_t DH = DHC > 0 ? DHC : g.DH;
  const acc_t sdiv = static_cast<acc_t>(std::is_same<acc_t, double>::value ? g.sdiv
                                                                          : static_cast<float>(g.sdiv));
  const acc_t masked = static_cast<acc_t>(kMaskedLogit);
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < g.T; ++j) {
    const acc_t v = attn_allowed(g, pad, m, i, j) ? dot_row<acc_t>(q, krows[j], DH) / sdiv : masked;
    s[j] = v;
    mx = std::max(mx, v);
  }
  acc_t sum = 0;
  for (int64_t j = 0; j < g.T; ++j) {
    s[j] = std::exp(s[j] - mx);
    sum += s[j];
  }
  for (int64_t j = 0; j < g.T; ++j) s[j] = s[j] / sum;
}

// f(std::integral_constant<int, DHC>) with DHC = DH for the common head widths, else 0
template <typename F>
void with_head_dim(int64_t DH, F&& f) {
  switch (DH) {
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    default: f(std::integral_constant<int, 0>{});
  }
}

// DHC: the head width when it is one of the common compile-time widths (loops of known length unroll and
// vectorise fully: the row loops dominate at head widths of 8-64), else 0 (runtime g.DH)
template <typename acc_t, int DHC>
void attn_fwd_kernel(const AttnViews& V, const float* pad, Tensor& out) {
  const AttnGeom g = V.g;
  const int64_t DH = DHC > 0 ? DHC : g.DH;
  const auto st = V.qbase.scalar_type();
  const int64_t es = V.qbase.element_size();
  const char* qb = byte_ptr(V.qbase);
  const char* kb = V.kvbase.defined() ? byte_ptr(V.kvbase) : qb;
  char* ob = byte_ptr(out);
  const float pf = static_cast<float>(g.p);
  const acc_t scale = acc_scale<acc_t>(g.p);
  const int64_t grain = std::max<int64_t>(1, 2048 / (g.H * g.T * std::max<int64_t>(DH, 1)) + 1);
  at::parallel_for(0, g.M, grain, [&](int64_t m0, int64_t m1) {
    std::vector<acc_t> qbuf(g.TQ * DH), kbuf(g.T * DH), vbuf(g.T * DH), obuf(DH), s(g.T);
    std::vector<uint32_t> keep(g.dropout ? g.T : 0);
    std::vector<const acc_t*> qr(g.TQ), kr(g.T), vr(g.T);
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t h = 0; h < g.H; ++h) {
        const int64_t col = h * DH;
        for (int64_t i = 0; i < g.TQ; ++i)
          qr[i] = read_row<acc_t>(qb + (g.qrow(m, i) + g.q_off + col) * es, st, &qbuf[i * DH], DH);
        for (int64_t j = 0; j < g.T; ++j) {
          kr[j] = read_row<acc_t>(kb + (g.krow(m, j) + g.k_off + col) * es, st, &kbuf[j * DH], DH);
          vr[j] = read_row<acc_t>(kb + (g.krow(m, j) + g.v_off + col) * es, st, &vbuf[j * DH], DH);
        }
        for (int64_t i = 0; i < g.TQ; ++i) {
          attn_probs_row<acc_t, DHC>(g, pad, m, i, qr[i], kr.data(), s.data());
          if (g.dropout) {
            const uint64_t base = static_cast<uint64_t>(((m * g.H + h) * g.TQ + i) * g.T);
            dropout_keep_block(g.seed, static_cast<uint32_t>(base), pf, g.T, keep.data());
            for (int64_t j = 0; j < g.T; ++j) s[j] = s[j] * (keep[j] ? scale : acc_t(0));  // (NaN stays NaN)
          }
          acc_t* __restrict o = out_row<acc_t>(ob + ((m * g.TQ + i) * g.D + col) * es, st, obuf.data());
          std::fill(o, o + DH, acc_t(0));
          for (int64_t j = 0; j < g.T; ++j) axpy_row<acc_t>(s[j], vr[j], o, DH);
          write_row<acc_t>(ob + ((m * g.TQ + i) * g.D + col) * es, st, o, DH);
        }
      }
    }
  });
}

Tensor tiny_attention_fwd_cpu(const Tensor& qkv, const OptTensor& kv, const OptTensor& pad_mask, int64_t num_heads,
                              bool causal, int64_t q_start, double scale_div, double p, const OptTensor& seeds,
                              int64_t seed_idx, const OptTensor& rows) {
  AttnViews V = attn_views(qkv, kv, pad_mask, num_heads, causal, q_start, scale_div, p, seeds, seed_idx,
                           "tiny_attention_fwd", rows);
  const AttnGeom& g = V.g;
  Tensor out = alloc({g.M, g.TQ, g.D}, V.qbase.options());
  if (g.M == 0 || g.D == 0) return out;
  Tensor pad = g.has_mask ? as_dtype(*pad_mask, at::kFloat) : Tensor();
  const float* padp = g.has_mask ? pad.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(V.qbase.scalar_type() == at::kDouble ? at::kDouble : at::kFloat, "seqpe_attn_fwd",
                             [&] {
                               with_head_dim(g.DH, [&](auto dh) {
                                 attn_fwd_kernel<scalar_t, decltype(dh)::value>(V, padp, out);
                               });
                             });
  return out;
}

template <typename acc_t, int DHC>
void attn_bwd_kernel(const AttnViews& V, const float* pad, const Tensor& dout, Tensor& d_first, Tensor& d_kv) {
  const AttnGeom g = V.g;
  const auto st = V.qbase.scalar_type();
  const int64_t es = V.qbase.element_size();
  const char* qb = byte_ptr(V.qbase);
  const char* kb = V.kvbase.defined() ? byte_ptr(V.kvbase) : qb;
  const auto dost = dout.scalar_type();
  const int64_t does = dout.element_size();
  const char* dob = byte_ptr(dout);
  char* dqb = byte_ptr(d_first);
  const bool has_kv = V.kvbase.defined();
  char* dkb = has_kv ? byte_ptr(d_kv) : dqb;
  // element strides of the gradient views (contiguous outputs)
  const int64_t W1 = d_first.size(2);
  const int64_t dqm = g.TQ * W1, dqt = W1;
  const int64_t Wk = has_kv ? d_kv.size(2) : W1;
  const int64_t dkm = g.T * Wk, dkt = Wk;
  const int64_t dk_off = has_kv ? 0 : g.D, dv_off = has_kv ? g.D : 2 * g.D;
  const float pf = static_cast<float>(g.p);
  const acc_t scale = acc_scale<acc_t>(g.p);
  const acc_t sdiv = static_cast<acc_t>(std::is_same<acc_t, double>::value ? g.sdiv
                                                                          : static_cast<float>(g.sdiv));
  const int64_t grain = std::max<int64_t>(1, 1024 / (g.H * g.T * std::max<int64_t>(g.DH, 1)) + 1);
  at::parallel_for(0, g.M, grain, [&](int64_t m0, int64_t m1) {
    const int64_t TQ = g.TQ, T = g.T, DH = DHC > 0 ? DHC : g.DH;
    std::vector<acc_t> qbuf(TQ * DH), kbuf(T * DH), vbuf(T * DH), dobuf(TQ * DH);
    std::vector<acc_t> pr(TQ * T), pd(TQ * T), ds(TQ * T);
    std::vector<acc_t> dq(TQ * DH), dk(T * DH), dv(T * DH);
    std::vector<uint32_t> keep(g.dropout ? T : 0);
    std::vector<const acc_t*> qr(TQ), kr(T), vr(T), dor(TQ);
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t h = 0; h < g.H; ++h) {
        const int64_t col = h * DH;
        for (int64_t i = 0; i < TQ; ++i) {
          qr[i] = read_row<acc_t>(qb + (g.qrow(m, i) + g.q_off + col) * es, st, &qbuf[i * DH], DH);
          dor[i] = read_row<acc_t>(dob + ((m * TQ + i) * g.D + col) * does, dost, &dobuf[i * DH], DH);
        }
        for (int64_t j = 0; j < T; ++j) {
          kr[j] = read_row<acc_t>(kb + (g.krow(m, j) + g.k_off + col) * es, st, &kbuf[j * DH], DH);
          vr[j] = read_row<acc_t>(kb + (g.krow(m, j) + g.v_off + col) * es, st, &vbuf[j * DH], DH);
        }
        for (int64_t i = 0; i < TQ; ++i) {
          acc_t* P = &pr[i * T];
          attn_probs_row<acc_t, DHC>(g, pad, m, i, qr[i], kr.data(), P);
          acc_t* PD = &pd[i * T];
          acc_t* DS = &ds[i * T];
          const uint64_t base = static_cast<uint64_t>(((m * g.H + h) * TQ + i) * T);
          acc_t rowsum = 0;
          if (g.dropout) dropout_keep_block(g.seed, static_cast<uint32_t>(base), pf, T, keep.data());
          for (int64_t j = 0; j < T; ++j) {
            acc_t dp = dot_row<acc_t>(dor[i], vr[j], DH);
            acc_t pdv = P[j];
            if (g.dropout) {
              const acc_t kf = keep[j] ? scale : acc_t(0);
              pdv = P[j] * kf;
              dp = dp * kf;
            }
            PD[j] = pdv;
            DS[j] = dp;
            rowsum += P[j] * dp;
          }
          // masked logits are constants in the forward: no gradient reaches q/k through them (as the Triton
          // kernel; differs from the reference's autograd only on fully masked rows, which never reach the output)
          for (int64_t j = 0; j < T; ++j)
            DS[j] = attn_allowed(g, pad, m, i, j) ? P[j] * (DS[j] - rowsum) / sdiv : acc_t(0);
        }
        // dq_i = sum_j ds_ij k_j
        for (int64_t i = 0; i < TQ; ++i) {
          acc_t* __restrict dqi = dq.data() + i * DH;
          std::fill(dqi, dqi + DH, acc_t(0));
          for (int64_t j = 0; j < T; ++j) axpy_row<acc_t>(ds[i * T + j], kr[j], dqi, DH);
          write_row<acc_t>(dqb + (m * dqm + i * dqt + col) * es, st, dqi, DH);
        }
        // dv_j = sum_i pd_ij do_i ; dk_j = sum_i ds_ij q_i
        std::fill(dv.begin(), dv.end(), acc_t(0));
        std::fill(dk.begin(), dk.end(), acc_t(0));
        for (int64_t j = 0; j < T; ++j) {
          acc_t* __restrict dvj = dv.data() + j * DH;
          acc_t* __restrict dkj = dk.data() + j * DH;
          for (int64_t i = 0; i < TQ; ++i) {
            axpy_row<acc_t>(pd[i * T + j], dor[i], dvj, DH);
            axpy_row<acc_t>(ds[i * T + j], qr[i], dkj, DH);
          }
        }
        for (int64_t j = 0; j < T; ++j) {
          write_row<acc_t>(dkb + (m * dkm + j * dkt + dk_off + col) * es, st, &dk[j * DH], DH);
          write_row<acc_t>(dkb + (m * dkm + j * dkt + dv_off + col) * es, st, &dv[j * DH], DH);
        }
      }
    }
  });
}

Tensor2 tiny_attention_bwd_cpu(const Tensor& dout_, const Tensor& qkv, const OptTensor& kv, const OptTensor& pad_mask,
                               int64_t num_heads, bool causal, int64_t q_start, double scale_div, double p,
                               const OptTensor& seeds, int64_t seed_idx, const OptTensor& rows) {
  AttnViews V = attn_views(qkv, kv, pad_mask, num_heads, causal, q_start, scale_div, p, seeds, seed_idx,
                           "tiny_attention_bwd", rows);
  const AttnGeom& g = V.g;
  check_float_dtype(dout_, "tiny_attention_bwd", "dout");
  TORCH_CHECK(dout_.dim() == 3 && dout_.size(0) == g.M && dout_.size(1) == g.TQ && dout_.size(2) == g.D,
              "seqpe_ext::tiny_attention_bwd: dout must be [M, TQ, D]");
  const Tensor dout = dout_.contiguous();
  // per token, also for indexed operands (as the Triton kernel: a table's gradient is the caller's table_grad)
  Tensor d_first = V.g.q_rows ? alloc({g.M, g.T, 3 * g.D}, qkv.options()) : alloc(qkv.sizes(), qkv.options());
  Tensor d_kv = !has(kv)           ? alloc({0}, qkv.options())
                 : V.rows.defined() ? alloc({g.M, g.T, 2 * g.D}, kv->options())
                                    : alloc(kv->sizes(), kv->options());
  if (g.M == 0 || g.D == 0) {
    d_first.zero_();
    if (has(kv)) d_kv.zero_();
    return {d_first, d_kv};
  }
  Tensor pad = g.has_mask ? as_dtype(*pad_mask, at::kFloat) : Tensor();
  const float* padp = g.has_mask ? pad.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(V.qbase.scalar_type() == at::kDouble ? at::kDouble : at::kFloat, "seqpe_attn_bwd",
                             [&] {
                               with_head_dim(g.DH, [&](auto dh) {
                                 attn_bwd_kernel<scalar_t, decltype(dh)::value>(V, padp, dout, d_first, d_kv);
                               });
                             });
  return {d_first, d_kv};
}

Tensor table_rows_cpu(const Tensor& x, int64_t L, int64_t K, int64_t base, bool from_positions, bool clamp) {
  table_rows_args(x, L, K, base, from_positions);
  const int64_t M = x.size(0), T = L + 1, sxm = x.stride(0), sxc = x.stride(1);
  Tensor rows = alloc({M, T}, x.options());
  const int64_t* px = x.const_data_ptr<int64_t>();
  int64_t* pr = rows.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < L; ++j) pr[m * T + j] = table_row(px + m * sxm, sxc, j, L, K, base, from_positions, clamp);
    pr[m * T + L] = base * L;
  }
  return rows;
}

// the reference semantics of the CUDA kernel (the C++ encoder keeps its own CPU paths): sums in fp32 (fp64)
Tensor table_grad_cpu(const Tensor& g_, const Tensor& rows_, int64_t n_rows, int64_t L, bool acc_out) {
  table_grad_args(g_, rows_, n_rows, L);
  const auto gst = g_.scalar_type();
  const auto acc_dt = gst == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor g = as_dtype(g_, acc_dt), rows = rows_.contiguous();
  const int64_t N = rows.numel(), C = g.size(2);
  Tensor out = at::zeros({n_rows, C}, g.options());
  const int64_t* r = rows.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(acc_dt, "seqpe_table_grad_cpu", [&] {
    const scalar_t* src = g.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < N; ++i) {
      TORCH_CHECK(r[i] >= 0 && r[i] < n_rows, "seqpe_ext::table_grad: row ", r[i], " outside [0, ", n_rows, ")");
      for (int64_t c = 0; c < C; ++c) dst[r[i] * C + c] += src[i * C + c];
    }
  });
  return acc_out ? out : cast(out, gst);
}

// test hook: the keep-mask (1.0 = kept) of offsets start .. start+n-1, each wrapped to int32 as the kernels'
// offsets are, i.e. tl.rand(seed, offset) > p
Tensor dropout_keep_mask_host(int64_t seed, int64_t n, double p, int64_t start) {
  TORCH_CHECK(n >= 0, "seqpe_ext::dropout_keep_mask: n must be >= 0");
  Tensor out = alloc({n}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const float pf = static_cast<float>(p);
  const uint64_t s = static_cast<uint64_t>(seed);
  at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    for_each_keep(s, static_cast<uint32_t>(static_cast<uint64_t>(start + i0)), pf, i1 - i0,
                  [&](int64_t c, bool keep) { o[i0 + c] = keep ? 1.0f : 0.0f; });
  });
  return out;
}

}  // namespace

// ==================================================================================== registration
TORCH_LIBRARY(seqpe_ext, m) {
  m.def("digit_embed_fwd(Tensor x, Tensor tok, Tensor pos, Tensor? dim, Tensor cls, bool from_positions, "
        "int max_digits) -> Tensor");
  m.def("digit_embed_bwd(Tensor g, Tensor x, bool from_positions, int max_digits, int base, int data_dim, "
        "Tensor? table_grad=None) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("residual_layernorm_fwd(Tensor x, Tensor? y, Tensor? w, Tensor? b, float eps, float p, Tensor? seeds, "
        "int seed_idx, int out_dtype) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("residual_layernorm_bwd(Tensor? da, Tensor? dh, Tensor ln_in, Tensor? w, Tensor mean, Tensor rstd, "
        "float p, Tensor? seeds, int seed_idx, bool has_y, int y_dtype) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gelu_new_fwd(Tensor z) -> Tensor");
  m.def("gelu_new_bwd(Tensor du, Tensor z) -> Tensor");
  // the C++ encoder's backward: the same, plus the bias gradient of the GEMM before (dy's / dz's column sums,
  // accumulated in fp32 / fp64 inside the kernel's pass)
  // (dh_every > 0: dh [R / dh_every, D] holds only every dh_every-th row, the last of each group; the C++ encoder's
  // gradient below the CLS-only last block, without a zero-filled [R, D] copy)
  m.def("residual_layernorm_bwd_bias(Tensor? da, Tensor? dh, Tensor ln_in, Tensor? w, Tensor mean, Tensor rstd, "
        "float p, Tensor? seeds, int seed_idx, bool has_y, int y_dtype, int dh_every=0) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("gelu_new_bwd_bias(Tensor du, Tensor z) -> (Tensor, Tensor)");
  // (rows [M, T]: layer 0's indexed form, q/k/v or k/v read from a table by row; gradients per token)
  m.def("tiny_attention_fwd(Tensor qkv, Tensor? kv, Tensor? pad_mask, int num_heads, bool causal, int q_start, "
        "float scale_div, float p, Tensor? seeds, int seed_idx, Tensor? rows=None) -> Tensor");
  m.def("tiny_attention_bwd(Tensor dout, Tensor qkv, Tensor? kv, Tensor? pad_mask, int num_heads, bool causal, "
        "int q_start, float scale_div, float p, Tensor? seeds, int seed_idx, Tensor? rows=None) -> "
        "(Tensor, Tensor)");
  // layer 0's (digit, slot) table rows (the C++ encoder's; one launch on CUDA instead of ~10 ATen ops)
  m.def("table_rows(Tensor x, int L, int K, int base, bool from_positions, bool clamp) -> Tensor");
  // its backward: the per-token gradient [M, T, C] summed per table row ([n_rows, C], fp32 / fp64 sums)
  m.def("table_grad(Tensor g, Tensor rows, int n_rows, int L, bool acc_out=False) -> Tensor");
  // test hook (no tensor arguments: one host kernel, CompositeImplicitAutograd)
  m.def("dropout_keep_mask(int seed, int n, float p, int start=0) -> Tensor", &dropout_keep_mask_host);
}

TORCH_LIBRARY_IMPL(seqpe_ext, CPU, m) {
  m.impl("digit_embed_fwd", &digit_embed_fwd_cpu);
  m.impl("digit_embed_bwd", &digit_embed_bwd_cpu);
  m.impl("residual_layernorm_fwd", &residual_layernorm_fwd_cpu);
  m.impl("residual_layernorm_bwd", &rln_bwd_op<rln_bwd_cpu>);
  m.impl("gelu_new_fwd", &gelu_new_fwd_cpu);
  m.impl("gelu_new_bwd", &gelu_new_bwd_cpu);
  m.impl("residual_layernorm_bwd_bias", &rln_bwd_bias_op<rln_bwd_cpu>);
  m.impl("gelu_new_bwd_bias", &gelu_new_bwd_bias_cpu);
  m.impl("tiny_attention_fwd", &tiny_attention_fwd_cpu);
  m.impl("tiny_attention_bwd", &tiny_attention_bwd_cpu);
  m.impl("table_rows", &table_rows_cpu);
  m.impl("table_grad", &table_grad_cpu);
}

}  // namespace seqpe

// build information, readable without loading the library (seqpe_kernels._ext scans the file for the marker
// to say which torch / CUDA a prebuilt module was compiled for when it fails to load)
#define SEQPE_STR2(x) #x
#define SEQPE_STR(x) SEQPE_STR2(x)
#ifndef SEQPE_TORCH_VERSION
#define SEQPE_TORCH_VERSION unknown
#endif
#ifndef SEQPE_CUDA_VERSION
#define SEQPE_CUDA_VERSION none
#endif
#ifndef SEQPE_SOURCE_HASH
#define SEQPE_SOURCE_HASH unknown
#endif
extern "C" __attribute__((used, visibility("default"))) const char seqpe_ext_build_info[] =
    "SEQPE_EXT_BUILD_INFO{torch=" SEQPE_STR(SEQPE_TORCH_VERSION) ";cuda=" SEQPE_STR(SEQPE_CUDA_VERSION)
    ";src=" SEQPE_STR(SEQPE_SOURCE_HASH) "}";
