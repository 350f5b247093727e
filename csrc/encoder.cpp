// The whole encoder in one extension call per direction, for the cpu and cuda backends.
//
// seqpe_kernels/encoder.py runs the layer sequence in Python over the Triton kernels; this is the same
// sequence, step for step (same kernels, same GEMMs, same saved tensors), over the seqpe_ext kernels, so an
// encoder call costs two dispatcher calls from Python instead of ~60 Python-level ops and autograd nodes.
// The per-op kernels are reached through the dispatcher (typed handles), which picks their CPU or CUDA
// implementation from the tensors' device; this file itself is device-agnostic (CompositeExplicitAutograd).
//
// seqpe_ext::encoder(x, pad, seeds, params, icfg, fcfg) -> out [M, O], with its own C++ autograd node; seeds
// None with dropout on: drawn here (draw_seeds)
// (torch::autograd::Function: its forward saves what the backward needs with save_for_backward, so parameters
// updated in place before backward raise, retain_graph and saved-tensor hooks work as for any op).
//   params: the present ones of tok, pos, dim (1-D: absent), cls; per layer ln1.w, ln1.b, c_attn.w, .b,
//           attn.c_proj.w, .b, ln2.w, .b, c_fc.w, .b, mlp.c_proj.w, .b; final ln.w, .b (absent when off);
//           out_proj.w, .b
//   icfg:   D, H, K, L, T, base, data_dim, nl, causal, from_positions, cdt code, clamp_rows
//   fcfg:   sdiv, p_res, p_att, inv_tau, eps_final (< 0: no final LN), eps1[nl], eps2[nl]
// Saved tensors never alias an input: a weight already in the compute dtype, and the final LN input when it
// is the out_proj input, are saved as undefined entries and taken from the parameters / other entries.
#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "seqpe_ext.h"

namespace seqpe {

// Which device's path a tensor takes. Compiled into the CUDA emulator's library (SEQPE_EMU, csrc/emu/), the
// encoder runs its CUDA paths on CPU tensors over the emulated CUDA kernels (torch.ops.seqpe_emu).
#if defined(SEQPE_EMU)
#define SEQPE_OP(name) "seqpe_emu::" name
inline bool on_cuda(const at::Tensor&) { return true; }
inline bool on_cpu(const at::Tensor&) { return false; }
#else
#define SEQPE_OP(name) "seqpe_ext::" name
inline bool on_cuda(const at::Tensor& t) { return t.is_cuda(); }
inline bool on_cpu(const at::Tensor& t) { return t.is_cpu(); }
#endif

namespace {

using TensorList = std::vector<Tensor>;  // also parameter / saved slots: an absent one is an undefined Tensor

struct Cfg {
  int64_t D, H, K, L, T, base, data_dim, nl;
  bool causal, from_positions, clamp_rows;
  int64_t code;
  at::ScalarType cdt;
  double sdiv, p_res, p_att, inv_tau, epsf;
  std::vector<double> eps1, eps2;
};

Cfg parse(at::IntArrayRef ic, at::ArrayRef<double> fc) {
  TORCH_CHECK(ic.size() == 12, "seqpe_ext::encoder: icfg must have 12 entries, got ", ic.size());
  Cfg c;
  c.D = ic[0], c.H = ic[1], c.K = ic[2], c.L = ic[3], c.T = ic[4], c.base = ic[5], c.data_dim = ic[6], c.nl = ic[7];
  c.causal = ic[8] != 0, c.from_positions = ic[9] != 0, c.code = ic[10], c.clamp_rows = ic[11] != 0;
  c.cdt = dtype_from_code(c.code);
  TORCH_CHECK(c.nl >= 1 && static_cast<int64_t>(fc.size()) == 5 + 2 * c.nl,
              "seqpe_ext::encoder: fcfg must have 5 + 2*layers entries");
  c.sdiv = fc[0], c.p_res = fc[1], c.p_att = fc[2], c.inv_tau = fc[3], c.epsf = fc[4];
  c.eps1.assign(fc.begin() + 5, fc.begin() + 5 + c.nl);
  c.eps2.assign(fc.begin() + 5 + c.nl, fc.end());
  return c;
}

// ------------------------------------------------------------------------ the per-op kernels (dispatched)
using EmbedFwd = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const Tensor&, bool, int64_t);
using EmbedBwd = Tensor4(const Tensor&, const Tensor&, bool, int64_t, int64_t, int64_t, const OptTensor&);
using RlnFwd = Tensor4(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, double, double,
                       const OptTensor&, int64_t, int64_t);
using AttnFwd = Tensor(const Tensor&, const OptTensor&, const OptTensor&, int64_t, bool, int64_t, double, double,
                       const OptTensor&, int64_t, const OptTensor&);
using AttnBwd = Tensor2(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, int64_t, bool, int64_t,
                        double, double, const OptTensor&, int64_t, const OptTensor&);
using GeluFwd = Tensor(const Tensor&);
using RlnBwdBias = Tensor5(const OptTensor&, const OptTensor&, const Tensor&, const OptTensor&, const Tensor&,
                           const Tensor&, double, const OptTensor&, int64_t, bool, int64_t, int64_t);
using GeluBwdBias = Tensor2(const Tensor&, const Tensor&);
using TableRows = Tensor(const Tensor&, int64_t, int64_t, int64_t, bool, bool);
using TableGrad = Tensor(const Tensor&, const Tensor&, int64_t, int64_t, bool);

template <typename F>
c10::TypedOperatorHandle<F> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<F>();
}

struct Kernels {
  c10::TypedOperatorHandle<EmbedFwd> embed_fwd = handle<EmbedFwd>(SEQPE_OP("digit_embed_fwd"));
  c10::TypedOperatorHandle<EmbedBwd> embed_bwd = handle<EmbedBwd>(SEQPE_OP("digit_embed_bwd"));
  c10::TypedOperatorHandle<RlnFwd> rln_fwd = handle<RlnFwd>(SEQPE_OP("residual_layernorm_fwd"));
  c10::TypedOperatorHandle<AttnFwd> attn_fwd = handle<AttnFwd>(SEQPE_OP("tiny_attention_fwd"));
  c10::TypedOperatorHandle<AttnBwd> attn_bwd = handle<AttnBwd>(SEQPE_OP("tiny_attention_bwd"));
  c10::TypedOperatorHandle<GeluFwd> gelu_fwd = handle<GeluFwd>(SEQPE_OP("gelu_new_fwd"));
  // the backward's LayerNorms and gelu: the bias gradient of the GEMM before a branch comes out of the same pass
  // (no separate column reduction over [R, D] / [R, 4D]); the LayerNorm's partials are reduced in one launch
  c10::TypedOperatorHandle<RlnBwdBias> rln_bwd_bias = handle<RlnBwdBias>(SEQPE_OP("residual_layernorm_bwd_bias"));
  c10::TypedOperatorHandle<GeluBwdBias> gelu_bwd_bias = handle<GeluBwdBias>(SEQPE_OP("gelu_new_bwd_bias"));
  c10::TypedOperatorHandle<TableRows> table_rows = handle<TableRows>(SEQPE_OP("table_rows"));
  c10::TypedOperatorHandle<TableGrad> table_grad = handle<TableGrad>(SEQPE_OP("table_grad"));
};

const Kernels& K() {
  static const Kernels k;  // after every op of the library is registered (first call, not load time)
  return k;
}

// inner ATen calls skip autograd/view tracking (the Python side holds the one autograd node) and autocast
// (every GEMM input is already cast to the compute dtype, as autocast would have cast it)
struct Guards {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

inline const Tensor& param(const TensorList& params, int64_t i) { return params[static_cast<size_t>(i)]; }

// a weight in the compute dtype, for the saved list: undefined when no cast was needed (save_for_backward keeps
// an undefined entry for free; an empty placeholder tensor cost an allocation per weight and call)
inline Tensor saved_cast(const Tensor& cast_t, const Tensor& param_t) {
  return cast_t.is_same(param_t) ? Tensor() : cast_t;
}

inline Tensor opt(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

// Every GEMM weight and bias (per layer c_attn, attn c_proj, c_fc, mlp c_proj; the output projection) in the
// compute dtype, indexed like params (other entries undefined). Under autocast they are cast together: one
// multi-tensor launch on CUDA (_foreach_copy_, the same static_cast as Tensor.to) instead of one cast kernel
// each (18 in the paper's 2-layer config); parameters already in the compute dtype are used as they are.
std::vector<Tensor> gemm_params(const TensorList& params, const Cfg& c) {
  std::vector<Tensor> out(params.size()), dst, src;
  auto add = [&](int64_t i) {
    const Tensor& p = param(params, i);
    if (p.scalar_type() == c.cdt) {
      out[static_cast<size_t>(i)] = p;
      return;
    }
    out[static_cast<size_t>(i)] = alloc(p.sizes(), p.options().dtype(c.cdt));
    dst.push_back(out[static_cast<size_t>(i)]), src.push_back(p);
  };
  for (int64_t i = 0; i < c.nl; ++i)
    for (int64_t j : {2, 3, 4, 5, 8, 9, 10, 11}) add(4 + 12 * i + j);
  add(4 + 12 * c.nl + 2), add(4 + 12 * c.nl + 3);
  if (!src.empty()) at::_foreach_copy_(dst, src);  // copies tensor by tensor itself where its fast path cannot
  return out;
}

Tensor embedding_table(const Tensor& tok, const Tensor& pos, const Tensor& dim, const Tensor& cls, const Cfg& c) {
  Tensor tab = tok.unsqueeze(1) + pos.unsqueeze(0);
  if (c.data_dim > 1) tab = tab + dim.expand({-1, c.K, -1}).reshape({1, c.L, c.D});
  return at::cat({tab.reshape({-1, c.D}), cls.reshape({1, c.D})}, 0);
}

Tensor table_rows(const Tensor& x, const Cfg& c) {
  // one operator (a loop on CPU, one kernel on CUDA) instead of ~10 ATen ops (pow, div, remainder, clamp, ...)
  return K().table_rows.call(cast(x, at::kLong), c.L, c.K, c.base, c.from_positions, c.clamp_rows);
}

bool low_precision(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// Layer 0's attention reads its q/k/v per token from the table's GEMM output through rows (the kernels' indexed
// form); its per-token gradients are summed back into table rows here, in fp32 for half types (as the reference's
// per-token GEMM accumulates), not in bf16.
// The CPU small-input paths below (row sums, column sums: elements; GEMMs: multiply-adds) stop here: past these
// sizes the work dwarfs the per-call overhead they save, and ATen's threaded kernels take over.
constexpr int64_t kSmallElems = int64_t{1} << 16, kSmallMacs = int64_t{1} << 20;

// Small fp32/fp64 CPU inputs take a row loop (sums in token order, as embedding_dense_backward's index_add):
// at these sizes the dispatcher and TensorIterator setup cost more than the sums.
bool small_cpu_rows(const Tensor& t, const Tensor& rows) {
  const at::ScalarType st = t.scalar_type();
  return on_cpu(t) && t.is_contiguous() && rows.is_contiguous() && rows.scalar_type() == at::kLong &&
         (st == at::kFloat || st == at::kDouble) && rows.numel() * t.size(-1) <= kSmallElems;
}

Tensor gather_bwd(const Tensor& g, const Tensor& rows, int64_t n) {
  if (small_cpu_rows(g, rows)) {
    RECORD_FUNCTION("seqpe_ext::gather_bwd", std::vector<c10::IValue>());
    const int64_t W = g.size(-1), N = rows.numel();
    Tensor out = alloc({n, W}, g.options());
    const int64_t* r = rows.const_data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "seqpe_gather_bwd", [&] {
      const scalar_t* src = g.const_data_ptr<scalar_t>();
      scalar_t* dst = out.data_ptr<scalar_t>();
      std::fill(dst, dst + n * W, scalar_t(0));
      for (int64_t i = 0; i < N; ++i) {
        TORCH_CHECK(r[i] >= 0 && r[i] < n, "seqpe_ext::encoder: table row ", r[i], " outside [0, ", n, ")");
        scalar_t* __restrict d = dst + r[i] * W;
        const scalar_t* __restrict s = src + i * W;
        for (int64_t c = 0; c < W; ++c) d[c] += s[c];
      }
    });
    return out;
  }
  if (on_cuda(g) && g.dim() == 3)  // one pass over g in its own dtype (ops_cuda.cu table_grad_kernel)
    return K().table_grad.call(g, rows, n, g.size(1) - 1, true);
  if (low_precision(g.scalar_type())) return at::embedding_dense_backward(g.to(at::kFloat), rows, n, -1, false);
  return at::embedding_dense_backward(g, rows, n, -1, false);
}

// ------------------------------------------------------------------------------------------- GEMMs
// A' @ B' (+ bias broadcast over rows), A' = A^T when ta, B' = B^T when tb. Small fp32 / fp64 CPU GEMMs call the
// BLAS torch itself links (its sgemm_ / dgemm_: what at::mm reaches for these dtypes on CPU, so the results are
// the same) with transpose flags and leading dimensions: no transposed views, no dispatcher round trip per GEMM
// (~10k instructions each at the tiny sizes where host cost matters). Everything else (large GEMMs, CUDA, half
// types, a torch built without that BLAS, layouts BLAS cannot take) goes to ATen's mm / addmm, as before.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

inline void gemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                  const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                  const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void gemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
                  const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
                  const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// a 2-D operand as BLAS sees it: row-major storage of X (or of X^T when `flip`) with leading dimension ld
struct BlasOperand {
  bool ok, flip;
  int64_t ld;
};

BlasOperand blas_operand(const Tensor& X) {
  const int64_t r = X.size(0), c = X.size(1), s0 = X.stride(0), s1 = X.stride(1);
  if ((s1 == 1 || c <= 1) && (r <= 1 || s0 >= std::max<int64_t>(c, 1)))
    return {true, false, std::max<int64_t>({s0, c, 1})};
  if ((s0 == 1 || r <= 1) && (c <= 1 || s1 >= std::max<int64_t>(r, 1)))
    return {true, true, std::max<int64_t>({s1, r, 1})};
  return {false, false, 0};
}

Tensor mm(const Tensor& A, bool ta, const Tensor& B, bool tb, const Tensor& bias = Tensor()) {
  const at::ScalarType st = A.scalar_type();
  const bool blas = on_cpu(A) && on_cpu(B) && B.scalar_type() == st && A.dim() == 2 && B.dim() == 2 &&
                    ((st == at::kFloat && sgemm_ != nullptr) || (st == at::kDouble && dgemm_ != nullptr)) &&
                    (!bias.defined() || (bias.scalar_type() == st && bias.dim() == 1 && bias.stride(0) == 1));
  BlasOperand oa{}, ob{};
  if (blas) oa = blas_operand(A), ob = blas_operand(B);
  const int64_t m = ta ? A.size(1) : A.size(0), k = ta ? A.size(0) : A.size(1), n = tb ? B.size(0) : B.size(1);
  constexpr int64_t kMaxInt = std::numeric_limits<int>::max();
  // only small GEMMs, where the per-call overhead is what costs: large ones gain nothing and keep whatever
  // at::mm does at scale (its threading, oneDNN where it uses it)
  if (!blas || !oa.ok || !ob.ok || m == 0 || n == 0 || k == 0 || m * n * k > kSmallMacs ||
      oa.ld > kMaxInt || ob.ld > kMaxInt) {
    const Tensor a = ta ? A.t() : A, b = tb ? B.t() : B;
    return bias.defined() ? at::addmm(bias, a, b) : a.mm(b);
  }
  // a profiler range named like an operator, so seqpe_kernels.launches still counts this GEMM (one cuBLAS launch
  // on a GPU, where it goes through at::mm); free when no profiler is on
  RECORD_FUNCTION("seqpe_ext::gemm", std::vector<c10::IValue>());
  Tensor C = alloc({m, n}, A.options());
  // row-major C = A' B' is column-major C^T = B'^T A'^T: B's storage goes first
  const char tra = (ta != oa.flip) ? 'T' : 'N', trb = (tb != ob.flip) ? 'T' : 'N';
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int lda = static_cast<int>(oa.ld), ldb = static_cast<int>(ob.ld), ldc = in;
  AT_DISPATCH_FLOATING_TYPES(st, "seqpe_encoder_gemm", [&] {
    scalar_t* c = C.data_ptr<scalar_t>();
    const scalar_t one = 1;
    scalar_t beta = 0;
    if (bias.defined()) {
      const scalar_t* bp = bias.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < m; ++i) std::copy(bp, bp + n, c + i * n);
      beta = 1;
    }
    const scalar_t* a = A.const_data_ptr<scalar_t>();
    const scalar_t* b = B.const_data_ptr<scalar_t>();
    gemm_(&trb, &tra, &in, &im, &ik, &one, b, &ldb, a, &lda, &beta, c, &ldc);
  });
  return C;
}

// A^T @ B as the gradient of a weight of dtype pt. On CUDA, half inputs and an fp32 weight: one cuBLAS GEMM that
// writes fp32 (at::mm(..., out_dtype), torch >= 2.8) instead of a half result plus a cast kernel per weight, and
// the fp32 accumulator is not rounded to half first; if that GEMM is refused, mm + cast from then on.
Tensor wgrad_mm(const Tensor& A, const Tensor& B, at::ScalarType pt) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  static std::atomic<bool> usable{true};
  if (on_cuda(A) && pt == at::kFloat && low_precision(A.scalar_type()) && B.scalar_type() == A.scalar_type() &&
      usable.load(std::memory_order_relaxed)) {
    try {
      return at::mm(A.t(), B, at::kFloat);
    } catch (const c10::Error&) {
      usable.store(false, std::memory_order_relaxed);
    }
  }
#endif
  (void)pt;
  return mm(A, true, B, false);
}

// Column sums of 2-D gradients (bias gradients), concatenated: [sum_r a[r, :], sum_r b[r, :], ...]. For small
// contiguous fp32/fp64 CPU inputs the reduction's dispatch and TensorIterator setup cost more than the sum, so
// they are summed in a plain loop (accumulated in fp64: at least as accurate as at::sum); all else: at::sum.
Tensor colsums(std::initializer_list<Tensor> parts) {
  const at::ScalarType st = parts.begin()->scalar_type();
  bool fast = st == at::kFloat || st == at::kDouble;
  int64_t n = 0;
  for (const Tensor& t : parts) {
    fast = fast && on_cpu(t) && t.dim() == 2 && t.is_contiguous() && t.scalar_type() == st &&
           t.numel() <= kSmallElems;
    n += t.size(-1);
  }
  if (!fast) {
    // half types: summed into fp32 (the bias is an fp32 parameter under autocast: no half result to cast back)
    const std::optional<at::ScalarType> dt =
        low_precision(st) ? std::optional<at::ScalarType>(at::kFloat) : std::nullopt;
    std::vector<Tensor> sums;
    for (const Tensor& t : parts) sums.push_back(t.sum({0}, false, dt));
    return sums.size() == 1 ? sums[0] : at::cat(sums);
  }
  // counted by seqpe_kernels.launches as what a GPU launches for it: a sum per part, a cat when several
  for (size_t i = 0; i < parts.size(); ++i) {
    RECORD_FUNCTION("seqpe_ext::colsum", std::vector<c10::IValue>());
  }
  if (parts.size() > 1) {
    RECORD_FUNCTION("seqpe_ext::cat", std::vector<c10::IValue>());
  }
  Tensor out = alloc({n}, parts.begin()->options());
  AT_DISPATCH_FLOATING_TYPES(st, "seqpe_colsums", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    std::vector<double> acc;
    for (const Tensor& t : parts) {
      const int64_t R = t.size(0), C = t.size(1);
      const scalar_t* p = t.const_data_ptr<scalar_t>();
      acc.assign(C, 0.0);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<double>(p[r * C + c]);
      for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(acc[c]);
      o += C;
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------- forward
// saved layout: the GLOBAL entries, FULL_N entries per full block, LAST_N entries for the last block
enum Global : int64_t { G_ROWS, G_TAB, G_ATAB, G_MT, G_RT, GLOBAL_N };
enum Full : int64_t { F_WA, F_WO, F_WF, F_WP, F_QKV, F_O, F_HB, F_M1, F_R1, F_A2, F_Z, F_U, F_HM, F_M2, F_R2, F_A, FULL_N };
enum Last : int64_t { L_WA, L_WO, L_WF, L_WP, L_Q, L_KV, L_O, L_H2, L_M1, L_R1, L_A2, L_Z, L_U, L_H3, L_M2, L_R2, L_FIN,
                      L_WOUT, LAST_N };

TensorList encoder_fwd_impl(const Tensor& x, const OptTensor& pad, const OptTensor& seeds, const TensorList& params,
                            at::IntArrayRef icfg, at::ArrayRef<double> fcfg, bool save) {
  const Cfg c = parse(icfg, fcfg);
  TORCH_CHECK(static_cast<int64_t>(params.size()) == 8 + 12 * c.nl, "seqpe_ext::encoder_fwd: expected ",
              8 + 12 * c.nl, " parameters, got ", params.size());
  Guards guards;
  const Kernels& k = K();
  const int64_t M = x.size(0), D = c.D, T = c.T, R = M * T;
  const Tensor tok = param(params, 0), pos = param(params, 1), dim = param(params, 2), cls = param(params, 3);
  TensorList S;
  if (save) S.reserve(GLOBAL_N + FULL_N * (c.nl - 1) + LAST_N);
  auto keep = [&](const Tensor& t) {
    if (save) S.push_back(t);
  };

  Tensor h = k.embed_fwd.call(x, tok, pos, dim.defined() ? OptTensor(dim) : OptTensor(), cls, c.from_positions, c.K)
                 .view({R, D});
  const Tensor rows = table_rows(x, c);
  const Tensor tab = embedding_table(tok, pos, dim, cls, c);
  Tensor a_tab, mt, rt;
  std::tie(std::ignore, a_tab, mt, rt) =
      k.rln_fwd.call(tab, std::nullopt, param(params, 4), param(params, 5), c.eps1[0], 0.0, std::nullopt, 0, c.code);
  keep(rows), keep(tab), keep(a_tab), keep(mt), keep(rt);
  const std::vector<Tensor> cw = gemm_params(params, c);
  auto W = [&](int64_t i) -> const Tensor& { return cw[static_cast<size_t>(i)]; };
  Tensor a;  // LN1 output of the current layer (layers >= 1)
  for (int64_t i = 0; i < c.nl; ++i) {
    const int64_t o0 = 4 + 12 * i;
    const Tensor Wa_p = param(params, o0 + 2), Wo_p = param(params, o0 + 4), Wf_p = param(params, o0 + 8),
                 Wp_p = param(params, o0 + 10);
    const Tensor Wa = W(o0 + 2), ba = W(o0 + 3), Wo = W(o0 + 4), bo = W(o0 + 5), Wf = W(o0 + 8), bf = W(o0 + 9),
                 Wp = W(o0 + 10), bp = W(o0 + 11);
    const Tensor ln2w = param(params, o0 + 6), ln2b = param(params, o0 + 7);
    keep(saved_cast(Wa, Wa_p)), keep(saved_cast(Wo, Wo_p)), keep(saved_cast(Wf, Wf_p)), keep(saved_cast(Wp, Wp_p));
    // layer 0's q / k / v: its table's c_attn output [base*L+1, 3D], read by the attention per token through rows
    // (the kernels' indexed form: no [M, T, 3D] gather written, read and saved)
    const OptTensor idx = i == 0 ? OptTensor(rows) : OptTensor();
    if (i < c.nl - 1) {  // full block
      Tensor qkv = i == 0 ? mm(a_tab, false, Wa, false, ba) : mm(a, false, Wa, false, ba).view({M, T, 3 * D});
      Tensor o = k.attn_fwd.call(qkv, std::nullopt, pad, c.H, c.causal, 0, c.sdiv, c.p_att, seeds, 3 * i, idx);
      Tensor y = mm(o.view({R, D}), false, Wo, false, bo);
      Tensor hb, a2, m1, r1;
      std::tie(hb, a2, m1, r1) = k.rln_fwd.call(h, y, ln2w, ln2b, c.eps2[i], c.p_res, seeds, 3 * i + 1, c.code);
      Tensor z = mm(a2, false, Wf, false, bf);
      Tensor u = k.gelu_fwd.call(z);
      y = mm(u, false, Wp, false, bp);
      Tensor m2, r2;
      std::tie(h, a, m2, r2) = k.rln_fwd.call(hb, y, param(params, o0 + 12), param(params, o0 + 13), c.eps1[i + 1],
                                              c.p_res, seeds, 3 * i + 2, c.code);
      keep(qkv), keep(o), keep(hb), keep(m1), keep(r1), keep(a2), keep(z), keep(u), keep(h), keep(m2), keep(r2);
      keep(a);
      continue;
    }
    // last block: the CLS query only, every row's K/V
    Tensor kv, q;
    if (i == 0) {
      kv = mm(a_tab, false, Wa.narrow(1, D, 2 * D), false, ba.narrow(0, D, 2 * D));
      q = mm(a_tab.narrow(0, a_tab.size(0) - 1, 1), false, Wa.narrow(1, 0, D), false, ba.narrow(0, 0, D))
              .view({1, 1, D});
    } else {
      kv = mm(a, false, Wa.narrow(1, D, 2 * D), false, ba.narrow(0, D, 2 * D)).view({M, T, 2 * D});
      q = mm(a.view({M, T, D}).select(1, T - 1), false, Wa.narrow(1, 0, D), false, ba.narrow(0, 0, D)).view({M, 1, D});
    }
    Tensor o =
        k.attn_fwd.call(q.expand({M, 1, D}), kv, pad, c.H, c.causal, T - 1, c.sdiv, c.p_att, seeds, 3 * i, idx);
    Tensor y = mm(o.view({M, D}), false, Wo, false, bo);
    Tensor h_cls = h.view({M, T, D}).select(1, T - 1).contiguous();
    Tensor h2, a2, m1, r1;
    std::tie(h2, a2, m1, r1) = k.rln_fwd.call(h_cls, y, ln2w, ln2b, c.eps2[i], c.p_res, seeds, 3 * i + 1, c.code);
    Tensor z = mm(a2, false, Wf, false, bf);
    Tensor u = k.gelu_fwd.call(z);
    y = mm(u, false, Wp, false, bp);
    const int64_t fo = 4 + 12 * c.nl;
    Tensor h3, fin, m2, r2;
    if (c.epsf >= 0) {
      std::tie(h3, fin, m2, r2) = k.rln_fwd.call(h2, y, param(params, fo), param(params, fo + 1), c.epsf, c.p_res,
                                                 seeds, 3 * i + 2, c.code);
    } else {
      std::tie(h3, std::ignore, m2, r2) =
          k.rln_fwd.call(h2, y, std::nullopt, std::nullopt, 0.0, c.p_res, seeds, 3 * i + 2, c.code);
      fin = h3;
    }
    const Tensor Wout_p = param(params, fo + 2);
    const Tensor Wout = W(fo + 2), bout = W(fo + 3);
    const Tensor fin_c = cast(fin, c.cdt);
    Tensor out = mm(fin_c, false, Wout, true, bout);
    if (c.inv_tau != 1.0) out = out * c.inv_tau;
    keep(q), keep(kv), keep(o), keep(h2), keep(m1), keep(r1), keep(a2), keep(z), keep(u), keep(h3), keep(m2), keep(r2);
    keep(fin_c.is_same(h3) ? Tensor() : fin_c), keep(saved_cast(Wout, Wout_p));
    TensorList result;
    result.reserve(1 + S.size());
    result.push_back(out);
    for (auto& t : S) result.push_back(std::move(t));
    return result;
  }
  TORCH_CHECK(false, "unreachable");
}

// ------------------------------------------------------------------------------------------- backward
TensorList encoder_bwd_impl(const Tensor& gout, const Tensor& x, const OptTensor& pad, const OptTensor& seeds,
                            const TensorList& params, const TensorList& saved, at::IntArrayRef icfg,
                            at::ArrayRef<double> fcfg, at::IntArrayRef needs) {
  const Cfg c = parse(icfg, fcfg);
  const int64_t n = 8 + 12 * c.nl;
  TORCH_CHECK(static_cast<int64_t>(params.size()) == n && static_cast<int64_t>(needs.size()) == n,
              "seqpe_ext::encoder_bwd: expected ", n, " parameters and needs flags");
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == GLOBAL_N + FULL_N * (c.nl - 1) + LAST_N,
              "seqpe_ext::encoder_bwd: the saved list does not match the configuration");
  Guards guards;
  const Kernels& k = K();
  const int64_t M = x.size(0), D = c.D, T = c.T, R = M * T, nrows = c.base * c.L + 1;
  const int64_t yc = c.code;  // dtype code of every branch output (GEMM outputs are in the compute dtype)
  TensorList grads(n);
  auto G = [&](int64_t j) { return param(saved, j); };
  auto F = [&](int64_t i, int64_t j) { return param(saved, GLOBAL_N + FULL_N * i + j); };
  const int64_t lb = GLOBAL_N + FULL_N * (c.nl - 1);
  auto Lt = [&](int64_t j) { return param(saved, lb + j); };
  auto put = [&](int64_t idx, const Tensor& g) {
    if (!needs[idx] || !g.defined()) return;
    const at::ScalarType pt = param(params, idx).scalar_type();
    grads[idx] = g.scalar_type() == pt ? g : g.to(pt);
  };
  // a weight in the compute dtype: the saved cast, or the parameter itself when none was needed
  auto weight = [&](const Tensor& saved_w, int64_t param_idx) {
    return saved_w.defined() ? saved_w : param(params, param_idx);
  };
  // A^T @ B, the gradient of parameter idx (in its dtype where the GEMM can write it: wgrad_mm)
  auto wmm = [&](const Tensor& A, const Tensor& B, int64_t idx) {
    return wgrad_mm(A, B, param(params, idx).scalar_type());
  };
  // mlp: y = gelu(a2 Wf + bf) Wp + bp; puts three parameter gradients (bp's came with dy from the LayerNorm
  // backward), returns d a2
  auto mlp_bwd = [&](const Tensor& dy, const Tensor& a2, const Tensor& z, const Tensor& u, const Tensor& Wf,
                     const Tensor& Wp, int64_t o) {
    Tensor du = mm(dy, false, Wp, true);
    if (needs[o + 10]) put(o + 10, wmm(u, dy, o + 10));
    Tensor dz, dbf;
    std::tie(dz, dbf) = k.gelu_bwd_bias.call(du, z);
    if (needs[o + 8]) put(o + 8, wmm(a2, dz, o + 8));
    put(o + 9, dbf);
    return mm(dz, false, Wf, true);
  };
  const Tensor rows = G(G_ROWS), a_tab = G(G_ATAB);

  // out = (fin Wout^T + bout) * inv_tau
  const int64_t fo = 4 + 12 * c.nl;
  Tensor g = c.inv_tau != 1.0 ? gout * c.inv_tau : gout;
  g = cast(g, c.cdt);
  const Tensor h3 = Lt(L_H3);
  const Tensor fin = Lt(L_FIN).defined() ? Lt(L_FIN) : h3;
  Tensor dfin = mm(g, false, weight(Lt(L_WOUT), fo + 2), false);
  if (needs[fo + 2]) put(fo + 2, wmm(g, fin, fo + 2));
  if (needs[fo + 3]) put(fo + 3, colsums({g}));
  int64_t i = c.nl - 1;
  int64_t o0 = 4 + 12 * i;
  Tensor dh2, dy, dbp;
  if (c.epsf >= 0) {
    Tensor dwf, dbf;
    std::tie(dh2, dy, dwf, dbf, dbp) = k.rln_bwd_bias.call(dfin, std::nullopt, h3, param(params, fo), Lt(L_M2),
                                                           Lt(L_R2), c.p_res, seeds, 3 * i + 2, true, yc, 0);
    put(fo, dwf), put(fo + 1, dbf);
  } else {
    std::tie(dh2, dy, std::ignore, std::ignore, dbp) =
        k.rln_bwd_bias.call(std::nullopt, cast(dfin, h3.scalar_type()), h3, std::nullopt, Lt(L_M2), Lt(L_R2),
                            c.p_res, seeds, 3 * i + 2, true, yc, 0);
  }
  put(o0 + 11, dbp);
  Tensor da2 = mlp_bwd(dy, Lt(L_A2), Lt(L_Z), Lt(L_U), weight(Lt(L_WF), o0 + 8), weight(Lt(L_WP), o0 + 10), o0);
  Tensor dhc, dyat, dw2, db2, dbo;
  std::tie(dhc, dyat, dw2, db2, dbo) = k.rln_bwd_bias.call(da2, dh2, Lt(L_H2), param(params, o0 + 6), Lt(L_M1),
                                                           Lt(L_R1), c.p_res, seeds, 3 * i + 1, true, yc, 0);
  put(o0 + 6, dw2), put(o0 + 7, db2), put(o0 + 5, dbo);
  Tensor dattn = mm(dyat, false, weight(Lt(L_WO), o0 + 4), true);
  if (needs[o0 + 4]) put(o0 + 4, wmm(Lt(L_O).view({M, D}), dyat, o0 + 4));
  Tensor dq, dkv;
  std::tie(dq, dkv) = k.attn_bwd.call(dattn.view({M, 1, D}), Lt(L_Q).expand({M, 1, D}), Lt(L_KV), pad, c.H, c.causal,
                                      T - 1, c.sdiv, c.p_att, seeds, 3 * i, i == 0 ? OptTensor(rows) : OptTensor());
  // the residual stream's gradient below the last block is nonzero on the CLS rows only: dhc [M, D]. The next
  // LayerNorm backward reads it as such (dh_every = T); only the embedding backward (one layer) needs [R, D]
  Tensor dh = dhc;
  int64_t dh_every = T;
  if (c.nl == 1) {
    dh = at::zeros({R, D}, dhc.options());
    dh.view({M, T, D}).select(1, T - 1).copy_(dhc);
    dh_every = 0;
  }
  Tensor Wa = weight(Lt(L_WA), o0 + 2);
  Tensor d_a_tab, da;
  if (i == 0) {
    // [1, D]: the CLS query is one table row broadcast to every sequence
    // the table's gradient stays in the accumulation dtype (fp32 under autocast): its per-row sums are not rounded
    // to half before the table's GEMMs, which are tiny (base*L+1 rows) and take the fp32 weight
    Tensor dtab_kv = gather_bwd(dkv, rows, nrows);
    const at::ScalarType adt = dtab_kv.scalar_type();
    Tensor dq_row = cast(colsums({dq.reshape({M, D})}), adt).view({1, D});
    const Tensor Wa_t = cast(param(params, o0 + 2), adt), a_tab_t = cast(a_tab, adt);
    d_a_tab = mm(dtab_kv, false, Wa_t.narrow(1, D, 2 * D), true);
    d_a_tab.narrow(0, nrows - 1, 1).add_(mm(dq_row, false, Wa_t.narrow(1, 0, D), true));
    if (needs[o0 + 2])
      put(o0 + 2,
          at::cat({wmm(a_tab_t.narrow(0, nrows - 1, 1), dq_row, o0 + 2), wmm(a_tab_t, dtab_kv, o0 + 2)}, 1));
    if (needs[o0 + 3]) put(o0 + 3, colsums({dq_row, dtab_kv}));
  } else {
    const Tensor a = F(i - 1, F_A);
    Tensor dkv2 = dkv.view({R, 2 * D}), dq2 = dq.view({M, D});
    da = mm(dkv2, false, Wa.narrow(1, D, 2 * D), true);
    da.view({M, T, D}).select(1, T - 1).add_(mm(dq2, false, Wa.narrow(1, 0, D), true));
    if (needs[o0 + 2])
      put(o0 + 2, at::cat({wmm(a.view({M, T, D}).select(1, T - 1), dq2, o0 + 2), wmm(a, dkv2, o0 + 2)}, 1));
    if (needs[o0 + 3]) put(o0 + 3, colsums({dq2, dkv2}));
  }

  for (i = c.nl - 2; i >= 0; --i) {  // full blocks, last to first
    o0 = 4 + 12 * i;
    Tensor dh1, dwn, dbn;
    std::tie(dh1, dy, dwn, dbn, dbp) =
        k.rln_bwd_bias.call(da.defined() ? OptTensor(da) : OptTensor(), dh, F(i, F_HM), param(params, o0 + 12),
                            F(i, F_M2), F(i, F_R2), c.p_res, seeds, 3 * i + 2, true, yc, dh_every);
    dh_every = 0;
    put(o0 + 12, dwn), put(o0 + 13, dbn), put(o0 + 11, dbp);
    da2 = mlp_bwd(dy, F(i, F_A2), F(i, F_Z), F(i, F_U), weight(F(i, F_WF), o0 + 8), weight(F(i, F_WP), o0 + 10), o0);
    std::tie(dh, dyat, dw2, db2, dbo) = k.rln_bwd_bias.call(da2, dh1, F(i, F_HB), param(params, o0 + 6), F(i, F_M1),
                                                            F(i, F_R1), c.p_res, seeds, 3 * i + 1, true, yc, 0);
    put(o0 + 6, dw2), put(o0 + 7, db2), put(o0 + 5, dbo);
    dattn = mm(dyat, false, weight(F(i, F_WO), o0 + 4), true);
    if (needs[o0 + 4]) put(o0 + 4, wmm(F(i, F_O).view({R, D}), dyat, o0 + 4));
    Tensor dqkv;
    std::tie(dqkv, std::ignore) =
        k.attn_bwd.call(dattn.view({M, T, D}), F(i, F_QKV), std::nullopt, pad, c.H, c.causal, 0, c.sdiv, c.p_att, seeds,
                        3 * i, i == 0 ? OptTensor(rows) : OptTensor());
    Wa = weight(F(i, F_WA), o0 + 2);
    if (i == 0) {
      Tensor dtab_out = gather_bwd(dqkv, rows, nrows);  // in the accumulation dtype, as in the last block above
      const at::ScalarType adt = dtab_out.scalar_type();
      d_a_tab = mm(dtab_out, false, cast(param(params, o0 + 2), adt), true);
      if (needs[o0 + 2]) put(o0 + 2, wmm(cast(a_tab, adt), dtab_out, o0 + 2));
      if (needs[o0 + 3]) put(o0 + 3, colsums({dtab_out}));
      da = Tensor();
    } else {
      Tensor dq2 = dqkv.view({R, 3 * D});
      da = mm(dq2, false, Wa, true);
      if (needs[o0 + 2]) put(o0 + 2, wmm(F(i - 1, F_A), dq2, o0 + 2));
      if (needs[o0 + 3]) put(o0 + 3, colsums({dq2}));
    }
  }

  // layer 0's LN1 runs on the embedding table; the residual stream's gradient reaches the token embeddings
  Tensor dtab, dw1, db1;
  std::tie(dtab, std::ignore, dw1, db1, std::ignore) = k.rln_bwd_bias.call(
      d_a_tab, std::nullopt, G(G_TAB), param(params, 4), G(G_MT), G(G_RT), 0.0, std::nullopt, 0, false, 0, 0);
  put(4, dw1), put(5, db1);
  // the table's gradient is folded into the embedding gradients inside the op (one kernel writes all four on
  // CUDA; no sums, adds or casts after it)
  Tensor dtok, dpos, ddim, dcls;
  std::tie(dtok, dpos, ddim, dcls) =
      k.embed_bwd.call(dh.view({M, T, D}), x, c.from_positions, c.K, c.base, c.data_dim, dtab);
  put(0, dtok);
  put(1, dpos);
  if (c.data_dim > 1) put(2, ddim);
  put(3, dcls);
  return grads;  // undefined where no gradient was needed
}

// The per-call dropout seeds (one per site: attention probs, attn residual, mlp residual of each layer) when the
// caller passed none: drawn from torch's generator of x's device exactly as the Python side's
// torch.randint(0, 2**31 - 1, (3 * layers,)) would, so torch.manual_seed reproduces a run and CUDA graphs replay
// the draw; one ATen call here instead of a Python-level one per step.
OptTensor draw_seeds(const OptTensor& seeds, const Tensor& x, const Cfg& c) {
  if (has(seeds) || (c.p_res <= 0.0 && c.p_att <= 0.0)) return seeds;
  return at::randint(0, (int64_t{1} << 31) - 1, {3 * c.nl}, x.options().dtype(at::kLong));
}

// ------------------------------------------------------------------------------------------- autograd
// The parameters arrive as the list of those present (no dim table for 1-D, no final LayerNorm when off):
// each is an input variable of the one autograd node, so AccumulateGrad / DDP hooks see every parameter.
TensorList full_params(at::TensorList present, const Cfg& c) {
  TensorList full;
  full.reserve(8 + 12 * c.nl);
  int64_t j = 0;
  const int64_t n = 8 + 12 * c.nl, dim_idx = 2, lnf_idx = 4 + 12 * c.nl;
  const bool has_dim = c.data_dim > 1, has_lnf = c.epsf >= 0;
  TORCH_CHECK(static_cast<int64_t>(present.size()) == n - (has_dim ? 0 : 1) - (has_lnf ? 0 : 2),
              "seqpe_ext::encoder: got ", present.size(), " parameters for this configuration");
  for (int64_t i = 0; i < n; ++i) {
    if ((i == dim_idx && !has_dim) || ((i == lnf_idx || i == lnf_idx + 1) && !has_lnf))
      full.emplace_back();
    else
      full.push_back(present[j++]);
  }
  return full;
}

std::vector<int64_t> present_index(const Cfg& c) {  // full-list index of each present parameter
  std::vector<int64_t> idx;
  const int64_t n = 8 + 12 * c.nl, lnf_idx = 4 + 12 * c.nl;
  for (int64_t i = 0; i < n; ++i)
    if (!((i == 2 && c.data_dim == 1) || ((i == lnf_idx || i == lnf_idx + 1) && c.epsf < 0))) idx.push_back(i);
  return idx;
}

struct EncoderFn : public torch::autograd::Function<EncoderFn> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& x,
                                                const OptTensor& pad, const OptTensor& seeds_in,
                                                at::TensorList params, at::IntArrayRef icfg,
                                                at::ArrayRef<double> fcfg) {
    const Cfg c = parse(icfg, fcfg);
    const OptTensor sd = draw_seeds(seeds_in, x, c);
    TensorList res = encoder_fwd_impl(x, pad, sd, full_params(params, c), icfg, fcfg, true);
    // saved: x, pad, seeds, the parameters (their versions are checked before backward), the activations
    torch::autograd::variable_list to_save;
    to_save.reserve(3 + params.size() + res.size() - 1);
    to_save.push_back(x);
    to_save.push_back(opt(pad));
    to_save.push_back(opt(sd));
    to_save.insert(to_save.end(), params.begin(), params.end());
    to_save.insert(to_save.end(), std::make_move_iterator(res.begin() + 1), std::make_move_iterator(res.end()));
    ctx->save_for_backward(std::move(to_save));
    ctx->saved_data["icfg"] = std::vector<int64_t>(icfg.begin(), icfg.end());
    ctx->saved_data["fcfg"] = std::vector<double>(fcfg.begin(), fcfg.end());
    ctx->saved_data["np"] = static_cast<int64_t>(params.size());
    std::vector<int64_t> needs;  // which parameters need a gradient (requires_grad at forward time)
    needs.reserve(params.size());
    for (const Tensor& p : params) needs.push_back(p.requires_grad() ? 1 : 0);
    ctx->saved_data["needs"] = std::move(needs);
    return {res[0]};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    // create_graph=True runs a backward in grad mode: the gradients below come from kernels, not differentiable
    // ops, so a second-order term through them would be silently zero. Refuse (as the Triton path's
    // EncoderFunction.backward does).
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "seqpe fused encoder: its backward is not differentiable, so gradients taken with "
                "create_graph=True cannot carry second-order terms through it; use backend='torch' for those");
    const std::vector<int64_t> icfg = ctx->saved_data["icfg"].toIntVector();
    const std::vector<double> fcfg = ctx->saved_data["fcfg"].toDoubleVector();
    const int64_t np = ctx->saved_data["np"].toInt();
    const std::vector<int64_t> needs_p = ctx->saved_data["needs"].toIntVector();
    const Cfg c = parse(icfg, fcfg);
    torch::autograd::variable_list sv = ctx->get_saved_variables();
    const Tensor x = sv[0];
    const OptTensor pad = sv[1].defined() ? OptTensor(sv[1]) : OptTensor();
    const OptTensor seeds = sv[2].defined() ? OptTensor(sv[2]) : OptTensor();
    const TensorList params = full_params(at::TensorList(sv).slice(3, np), c);
    TensorList saved;
    saved.reserve(sv.size() - 3 - np);
    for (size_t i = 3 + np; i < sv.size(); ++i) saved.push_back(sv[i]);
    const std::vector<int64_t> idx = present_index(c);
    std::vector<int64_t> needs(8 + 12 * c.nl, 0);
    for (int64_t j = 0; j < np; ++j) needs[idx[j]] = needs_p[j];
    Tensor gout = grad_out[0];
    const TensorList grads = encoder_bwd_impl(gout, x, pad, seeds, params, saved, icfg, fcfg, needs);
    // one entry per forward argument: x, pad, seeds, each parameter, icfg, fcfg
    torch::autograd::variable_list out(3 + np + 2);
    for (int64_t j = 0; j < np; ++j)
      if (needs[idx[j]]) out[3 + j] = grads[idx[j]];
    return out;
  }
};

// the encoder with autograd: one node whose inputs are the parameters; no node (and nothing saved) when no
// parameter needs a gradient
Tensor encoder_autograd(const Tensor& x, const OptTensor& pad, const OptTensor& seeds, at::TensorList params,
                        at::IntArrayRef icfg, at::ArrayRef<double> fcfg) {
  bool grad = at::GradMode::is_enabled();
  if (grad) {
    grad = false;
    for (const Tensor& p : params) grad = grad || p.requires_grad();
  }
  if (grad) return EncoderFn::apply(x, pad, seeds, params, icfg, fcfg)[0];
  const Cfg c = parse(icfg, fcfg);
  return encoder_fwd_impl(x, pad, draw_seeds(seeds, x, c), full_params(params, c), icfg, fcfg, false)[0];
}

// below autograd (inference mode, or no tensor that needs a gradient): the forward alone
Tensor encoder_plain(const Tensor& x, const OptTensor& pad, const OptTensor& seeds, at::TensorList params,
                     at::IntArrayRef icfg, at::ArrayRef<double> fcfg) {
  const Cfg c = parse(icfg, fcfg);
  return encoder_fwd_impl(x, pad, draw_seeds(seeds, x, c), full_params(params, c), icfg, fcfg, false)[0];
}

}  // namespace

#if defined(SEQPE_EMU)
#define SEQPE_LIB seqpe_emu
#else
#define SEQPE_LIB seqpe_ext
#endif
TORCH_LIBRARY_FRAGMENT(SEQPE_LIB, m) {
  m.def("encoder(Tensor x, Tensor? pad, Tensor? seeds, Tensor[] params, int[] icfg, float[] fcfg) -> Tensor");
}

TORCH_LIBRARY_IMPL(SEQPE_LIB, Autograd, m) { m.impl("encoder", &encoder_autograd); }

TORCH_LIBRARY_IMPL(SEQPE_LIB, CompositeExplicitAutograd, m) { m.impl("encoder", &encoder_plain); }

}  // namespace seqpe
