// CUDA implementations of the seqpe_ext operators (schemas in ops_cpu.cpp; registered here for CUDA).
//
// Same contracts and numerics as the Triton kernels in seqpe_kernels/ops/: fp32 accumulation for fp32 /
// fp16 / bf16 tensors, fp64 for fp64; dropout keep-masks from Triton's tl.rand (philox.h) at the same int32
// offsets, the seed read on the device (no host sync); parameter-gradient reductions through fixed chunks
// and an ordered final sum (deterministic). Tensors of any of the four float dtypes are read and written
// through a dtype code (a warp-uniform branch), so one instantiation per accumulator type serves every mix
// of dtypes autocast produces (fp32 residual stream, bf16 GEMM outputs, ...).
//
// Kernels: digit embedding (one block per (sequence, column tile), the digits computed once per block in shared
// memory); residual + dropout + LayerNorm (one warp per row, row in registers; one block per row in shared memory
// past D = 1024); its backward (one block per fixed chunk of rows, partial sums in shared memory); gelu_new
// (grid-stride elementwise, several loads in flight per thread); tiny attention (one warp per (sequence, head):
// for T <= 8 keys and head dim <= 64 its k / v columns in registers and each query row's scores summed across the
// warp by one reduce-scatter; otherwise its q/k/v rows and the T x T scores in shared memory). Inputs are validated
// before the op (seqpe_kernels.reference.tokenize.check_positions) unless the caller switched check_range off;
// then an out-of-range position or digit id makes its sequence's embedding NaN (as the Triton kernel does; the
// CPU path raises) and never indexes outside the tables.
#if defined(SEQPE_EMU)  // compiled as C++ for the CPU emulator (csrc/emu/cuda_emu.h): tests without a GPU
#include "emu/cuda_emu.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "philox.h"
#include "seqpe_ext.h"

namespace seqpe {
namespace {

using at::ScalarType;

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

inline int dcode(ScalarType st) {
  switch (st) {
    case ScalarType::Float: return kF32;
    case ScalarType::Half: return kF16;
    case ScalarType::BFloat16: return kBF16;
    case ScalarType::Double: return kF64;
    default: TORCH_CHECK(false, "seqpe_ext (CUDA): unsupported dtype ", st);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t ld(const void* p, int dt, int64_t i) {
  switch (dt) {
    case kF32: return static_cast<acc_t>(static_cast<const float*>(p)[i]);
    case kF16: return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(p)[i]));
    case kBF16: return static_cast<acc_t>(static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]));
    default: return static_cast<acc_t>(static_cast<const double*>(p)[i]);
  }
}

template <typename acc_t>
__device__ __forceinline__ void st(void* p, int dt, int64_t i, acc_t v) {
  switch (dt) {
    case kF32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case kF16: static_cast<c10::Half*>(p)[i] = c10::Half(static_cast<float>(v)); break;
    case kBF16: static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(static_cast<float>(v)); break;
    default: static_cast<double*>(p)[i] = static_cast<double>(v); break;
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// two block sums through one set of barriers (blockDim.x a multiple of 32, <= 1024); `sh` holds 66 values
template <typename T>
__device__ __forceinline__ void block_sum2(T& u, T& v, T* sh) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  u = warp_sum(u);
  v = warp_sum(v);
  if (lane == 0) sh[w] = u, sh[33 + w] = v;
  __syncthreads();
  if (w == 0) {
    T a = lane < nw ? sh[lane] : T(0), b = lane < nw ? sh[33 + lane] : T(0);
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) sh[32] = a, sh[65] = b;
  }
  __syncthreads();
  u = sh[32];
  v = sh[65];
  __syncthreads();
}

// sum over the block; `sh` holds 66 values
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* sh) {
  T none = 0;
  block_sum2(v, none, sh);
  return v;
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float sqrt_acc(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_acc(double x) { return sqrt(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t tanh_k(acc_t u) {  // the Triton kernel's tanh: 1 - 2 / (exp(2u) + 1)
  u = u < acc_t(-20) ? acc_t(-20) : (u > acc_t(20) ? acc_t(20) : u);
  return acc_t(1) - acc_t(2) / (exp_acc(acc_t(2) * u) + acc_t(1));
}

// Dynamic shared memory a launch may ask for without the per-kernel opt-in (cudaFuncAttributeMaxDynamicSharedMemory
// Size): 48 KB less the kernel's static shared memory. ln_fwd_kernel / ln_bwd_kernel also hold a static
// `red[66]` (ptxas: 272 B fp32, 528 B fp64), so their dynamic part must leave room for it: a launch at exactly
// 48 KB of dynamic memory fails on a GPU with cudaErrorInvalidValue (the emulator does not model static memory).
constexpr size_t kLnStaticReserve = 1024;
constexpr size_t kDynSmemWithRed = 48 * 1024 - kLnStaticReserve;

inline int ln_threads(int64_t D) {
  int t = 32;
  while (t < D && t < 256) t <<= 1;
  return t;
}

#if defined(SEQPE_EMU)
using emu::DeviceGuard;
using emu::allow_smem;
using emu::sm_count;
using emu::smem_optin;
#else
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }
inline int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
inline size_t smem_optin() { return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin; }
// dynamic shared memory past 48 KB for `kernel` (an opt-in per kernel function)
template <typename K>
void allow_smem(K kernel, size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}
// SEQPE_LAUNCH(grid, block, smem, kernel)(args) is kernel<<<grid, block, smem, stream()>>>(args): a macro so that
// the emulator runs the same launch
#define SEQPE_LAUNCH(grid, block, smem, ...) __VA_ARGS__<<<grid, block, smem, stream()>>>
#define SEQPE_DYN_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

// ==================================================================================== digit embedding
// digits per coordinate the in-kernel tokenizer takes (positions < base**K <= 2**62, so K <= 62 at base 2; the digit
// ids interface has no power table and no limit)
constexpr int kMaxDigits = 62;
struct DigitP {
  const int64_t* x;
  int64_t sxm, M, L, T, D, K, base;
  bool from_positions;
  int64_t pw[kMaxDigits];
};

// digit j of sequence m, or -1 when the input lies outside the encodable range (a position < 0 or >=
// base**K, a digit id outside [0, base))
__device__ __forceinline__ int64_t digit_of(const DigitP& a, int64_t m, int64_t j) {
  if (a.from_positions) {
    const int64_t p = a.x[m * a.sxm + j / a.K];
    if (p < 0 || p / a.pw[0] >= a.base) return -1;
    return (p / a.pw[j % a.K]) % a.base;
  }
  const int64_t d = a.x[m * a.sxm + j];
  return (d < 0 || d >= a.base) ? -1 : d;
}

// The digits of sequences [m0, m0 + n) into dg[i * L + j] (-1: invalid), computed by the block's threads together
// (each digit costs a few 64-bit divisions: once per block, not once per thread and column). Every thread of the
// block calls it (it ends with a barrier).
__device__ __forceinline__ void stage_digits(const DigitP& a, int64_t m0, int64_t n, int* dg) {
  for (int64_t i = threadIdx.x; i < n * a.L; i += blockDim.x)
    dg[i] = static_cast<int>(digit_of(a, m0 + i / a.L, i % a.L));
  __syncthreads();
}

__device__ __forceinline__ bool digits_valid(const int* dg, int64_t L) {
  for (int64_t j = 0; j < L; ++j)
    if (dg[j] < 0) return false;
  return true;
}

// one block per (sequence, column tile); the sequence's digits staged once in shared memory (L ints)
__global__ void embed_fwd_kernel(DigitP a, const void* tok, const void* pos, const void* dim, const void* cls,
                                 void* out, int dt) {
  SEQPE_DYN_SHARED(int, embed_fwd_digits);
  const int64_t m = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  stage_digits(a, m, 1, embed_fwd_digits);
  if (c >= a.D) return;
  const int64_t D = a.D;
  if (!digits_valid(embed_fwd_digits, a.L)) {  // out-of-range input (check_range=False): NaN, no out-of-table read
    for (int64_t j = 0; j < a.T; ++j) {
      if (dt == kF64)
        st<double>(out, dt, (m * a.T + j) * D + c, __longlong_as_double(0x7ff8000000000000LL));
      else
        st<float>(out, dt, (m * a.T + j) * D + c, __int_as_float(0x7fc00000));
    }
    return;
  }
  for (int64_t j = 0; j < a.L; ++j) {
    const int64_t dig = embed_fwd_digits[j];
    if (dt == kF64) {
      double e = ld<double>(tok, dt, dig * D + c) + ld<double>(pos, dt, j * D + c);
      if (dim != nullptr) e = e + ld<double>(dim, dt, (j / a.K) * D + c);
      st<double>(out, dt, (m * a.T + j) * D + c, e);
    } else {
      // the table dtype's arithmetic: fp32, or fp16/bf16 rounded after each add (as the reference)
      float e = ld<float>(tok, dt, dig * D + c) + ld<float>(pos, dt, j * D + c);
      if (dt == kF16) e = static_cast<float>(c10::Half(e));
      if (dt == kBF16) e = static_cast<float>(c10::BFloat16(e));
      if (dim != nullptr) e = e + ld<float>(dim, dt, (j / a.K) * D + c);
      st<float>(out, dt, (m * a.T + j) * D + c, e);
    }
  }
  if (dt == kF64)
    st<double>(out, dt, (m * a.T + a.L) * D + c, ld<double>(cls, dt, c));
  else
    st<float>(out, dt, (m * a.T + a.L) * D + c, ld<float>(cls, dt, c));
}

// Partials of the digit-embedding backward: chunk ch's sums per column, rows [digit 0..base-1; slot 0..T-1].
// Each thread owns one column of its chunk and adds every token of the chunk into its rows in a fixed order
// (deterministic). SMEM: the accumulators live in shared memory (row r of the thread at smem[r * blockDim.x]),
// written to the partial once at the end; otherwise (base + T rows too many for 48 KB) in the partial itself.
// The chunk's sequences go in tiles of `tile`: their digits staged in shared memory by the whole block (they were
// a few 64-bit divisions per token and thread), and each sequence's T gradient values loaded in groups of 8
// before they are added (8 loads in flight per thread, not one load then its adds). The H200 profile had the
// first version (global read-modify-writes) at 175 us per text step; the additions and their order are the same
// in every version, so are the results for a given chunk size.
constexpr int kEmbedGroup = 8;
template <typename acc_t, bool SMEM>
__global__ void embed_bwd_kernel(DigitP a, const void* g, int gdt, acc_t* part, int64_t per, int64_t tile) {
  SEQPE_DYN_SHARED(unsigned char, embed_bwd_smem);
  const int64_t ch = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const bool mine = c < a.D;  // threads past D still stage digits and meet the barriers
  const int64_t D = a.D, T = a.T, rows = a.base + T;
  acc_t* P = part + ch * rows * D;
  const int64_t as = SMEM ? static_cast<int64_t>(blockDim.x) : D;
  acc_t* A = SMEM ? reinterpret_cast<acc_t*>(embed_bwd_smem) + threadIdx.x : P + c;  // row r at A[r * as]
  int* dg = reinterpret_cast<int*>(embed_bwd_smem + (SMEM ? rows * as * sizeof(acc_t) : 0));
  if (mine)
    for (int64_t r = 0; r < rows; ++r) A[r * as] = 0;  // this thread's column of its chunk: no memset launch
  const int64_t m_end = min(a.M, (ch + 1) * per);
  for (int64_t m0 = ch * per; m0 < m_end; m0 += tile) {
    const int64_t n = min(tile, m_end - m0);
    stage_digits(a, m0, n, dg);
    if (mine) {
      for (int64_t i = 0; i < n; ++i) {
        const int* d = dg + i * a.L;
        const int64_t off = ((m0 + i) * T) * D + c;
        for (int64_t j0 = 0; j0 < T; j0 += kEmbedGroup) {
          acc_t v[kEmbedGroup];
#pragma unroll
          for (int u = 0; u < kEmbedGroup; ++u)
            if (j0 + u < T) v[u] = ld<acc_t>(g, gdt, off + (j0 + u) * D);
#pragma unroll
          for (int u = 0; u < kEmbedGroup; ++u) {
            const int64_t j = j0 + u;
            if (j >= T) break;
            A[(a.base + j) * as] += v[u];
            if (j < a.L && d[j] >= 0) A[static_cast<int64_t>(d[j]) * as] += v[u];
          }
        }
      }
    }
    __syncthreads();  // the tile's digits are read before the next tile overwrites them
  }
  if (SMEM && mine)
    for (int64_t r = 0; r < rows; ++r) P[r * D + c] = A[r * as];
}

// the outputs of digit_embed_bwd: row r of [d_tok; d_pos; d_cls; d_dim] (embed_grad_out), each written in g's
// dtype into its own tensor (no total tensor, no cast or sum kernels after)
template <typename acc_t>
__global__ void embed_bwd_out_kernel(const acc_t* part, int64_t n_chunks, int64_t rows, const acc_t* tab, int64_t D,
                                     int64_t base, int64_t L, int64_t K, int64_t n_out, int odt, void* d_tok,
                                     void* d_pos, void* d_cls, void* d_dim) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_out * D) return;
  const int64_t r = i / D, c = i % D;
  const acc_t v = embed_grad_out<acc_t>(r, c, D, base, L, K, part, n_chunks, rows, tab);
  if (r < base) st<acc_t>(d_tok, odt, r * D + c, v);
  else if (r < base + L) st<acc_t>(d_pos, odt, (r - base) * D + c, v);
  else if (r == base + L) st<acc_t>(d_cls, odt, c, v);
  else st<acc_t>(d_dim, odt, (r - base - L - 1) * D + c, v);
}

// out[i] = sum over chunks of part[ch * stride + i], i < n. Block (32 columns, kSumRows rows): row y adds chunks
// y, y + kSumRows, ... of its column in order, then row 0 adds the rows' sums in order (deterministic). One thread
// per column walking every chunk (the former kernel) left a 768-column sum on 3 blocks: ~27 us on an H200 for
// ~500 chunks, 7 such sums per text step.
constexpr int kSumRows = 16;
template <typename acc_t>
__global__ void chunk_sum_kernel(const acc_t* part, int64_t n_chunks, int64_t n, int64_t stride, acc_t* out) {
  __shared__ acc_t rows[kSumRows][33];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  acc_t s = 0;
  if (i < n)
    for (int64_t ch = threadIdx.y; ch < n_chunks; ch += kSumRows) s += part[ch * stride + i];
  rows[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && i < n) {
    acc_t t = 0;
    for (int r = 0; r < kSumRows; ++r) t += rows[r][threadIdx.x];
    out[i] = t;
  }
}

template <typename acc_t>
void chunk_sum(const acc_t* part, int64_t n_chunks, int64_t n, int64_t stride, acc_t* out) {
  if (n <= 0) return;
  SEQPE_LAUNCH(static_cast<unsigned>(cdiv(n, 32)), dim3(32, kSumRows), 0, chunk_sum_kernel<acc_t>)(part, n_chunks, n,
                                                                                               stride, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

DigitP digit_params(const Tensor& x, int64_t M, int64_t L, int64_t T, int64_t D, int64_t K, int64_t base,
                    bool from_positions) {
  TORCH_CHECK(K >= 1 && (K <= kMaxDigits || !from_positions), "seqpe_ext::digit_embed (CUDA): max_digits must lie in "
              "[1, ", kMaxDigits, "] for positions");
  DigitP a{};
  a.x = x.data_ptr<int64_t>();
  a.sxm = x.dim() == 2 ? x.size(1) : 1;
  a.M = M, a.L = L, a.T = T, a.D = D, a.K = K, a.base = base, a.from_positions = from_positions;
  if (from_positions) {  // pw[s] = base**(K-1-s); the digit ids interface reads none
    int64_t v = 1;
    for (int64_t s = K - 1; s >= 0; --s) {
      a.pw[s] = v;
      if (s > 0) v *= base;
    }
  }
  return a;
}

// shared memory for the staged digits of `n` sequences (stage_digits); the digit tiles stay within kDigitSmem
constexpr int64_t kDigitTile = 8, kDigitSmem = 16 * 1024;
size_t digit_smem(int64_t L, int64_t n) {
  TORCH_CHECK(L * 4 <= kDigitSmem, "seqpe_ext::digit_embed (CUDA): ", L, " digits per sequence; at most ",
              kDigitSmem / 4, " are supported");
  return static_cast<size_t>(std::max<int64_t>(L * n, 1)) * sizeof(int);
}

Tensor digit_embed_fwd_cuda(const Tensor& x_, const Tensor& tok_, const Tensor& pos_, const OptTensor& dim_,
                            const Tensor& cls_, bool from_positions, int64_t max_digits) {
  DeviceGuard guard(tok_.device());
  TORCH_CHECK(x_.dim() == 1 || x_.dim() == 2, "seqpe_ext::digit_embed_fwd: x must be [M] or [M, d|L]");
  check_float_dtype(tok_, "digit_embed_fwd", "tok");
  const int64_t M = x_.size(0), base = tok_.size(0), D = tok_.size(1), L = pos_.size(0), T = L + 1;
  const auto stt = tok_.scalar_type();
  const Tensor x = x_.to(tok_.device(), at::kLong).contiguous();
  const Tensor tok = tok_.contiguous(), pos = pos_.to(stt).contiguous(), cls = cls_.to(stt).contiguous();
  const bool has_dim = has(dim_);
  const Tensor dim = has_dim ? dim_->to(stt).contiguous() : Tensor();
  const int64_t sxm = x.dim() == 2 ? x.size(1) : 1;
  TORCH_CHECK(from_positions ? sxm * max_digits == L : sxm == L, "seqpe_ext::digit_embed_fwd: x does not match L = ",
              L);
  Tensor out = at::empty({M, T, D}, tok.options());
  if (M == 0 || D == 0) return out;
  const DigitP a = digit_params(x, M, L, T, D, max_digits, base, from_positions);
  const int threads = 128;
  const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>(cdiv(D, threads)));
  SEQPE_LAUNCH(grid, threads, digit_smem(L, 1), embed_fwd_kernel)(a, tok.data_ptr(), pos.data_ptr(),
                                                   has_dim ? dim.data_ptr() : nullptr, cls.data_ptr(),
                                                   out.data_ptr(), dcode(stt));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

Tensor4 digit_embed_bwd_cuda(const Tensor& g_, const Tensor& x_, bool from_positions, int64_t max_digits,
                             int64_t base, int64_t data_dim, const OptTensor& table_grad) {
  DeviceGuard guard(g_.device());
  TORCH_CHECK(g_.dim() == 3, "seqpe_ext::digit_embed_bwd: g must be [M, T, D]");
  check_float_dtype(g_, "digit_embed_bwd", "g");
  const int64_t M = g_.size(0), T = g_.size(1), D = g_.size(2), L = T - 1, K = max_digits;
  TORCH_CHECK(L == data_dim * K, "seqpe_ext::digit_embed_bwd: T-1 must equal data_dim*max_digits");
  const Tensor g = g_.contiguous();
  const Tensor x = x_.to(g.device(), at::kLong).contiguous();
  const auto gst = g.scalar_type();
  const auto acc_dt = gst == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor tg = table_grad_in(table_grad, g, base, L, D, acc_dt);
  // ~8 blocks per SM in all (the former 32 sequences per chunk left ~2 blocks per SM, each walking 192 tokens);
  // the partials grow with the chunks (n_chunks x (base + T) x D), their sum stays one short pass
  const int threads = 128;
  const int64_t col_blocks = cdiv(D, threads);
  const int64_t per = cdiv(M, std::max<int64_t>(1, cdiv(8 * sm_count(), std::max<int64_t>(col_blocks, 1))));
  const int64_t n_chunks = std::max<int64_t>(1, cdiv(M, std::max<int64_t>(per, 1)));
  const int64_t tile = std::max<int64_t>(1, std::min<int64_t>(kDigitTile, kDigitSmem / (4 * std::max<int64_t>(L, 1))));
  const int64_t rows = base + T, n_out = base + T + (data_dim > 1 ? data_dim : 0);
  // every thread of embed_bwd_kernel zeroes its own column of its chunk first; with M = 0 there is no chunk
  // to sum: one zeroed partial
  Tensor part = M > 0 ? at::empty({n_chunks, rows, D}, g.options().dtype(acc_dt))
                      : at::zeros({n_chunks, rows, D}, g.options().dtype(acc_dt));
  Tensor d_tok = at::empty({base, D}, g.options()), d_pos = at::empty({L, D}, g.options()),
         d_cls = at::empty({1, 1, D}, g.options()),
         d_dim = data_dim > 1 ? at::empty({data_dim, 1, D}, g.options()) : at::empty({0}, g.options());
  const DigitP a = digit_params(x, M, L, T, D, K, base, from_positions);
  AT_DISPATCH_FLOATING_TYPES(acc_dt, "seqpe_digit_embed_bwd_cuda", [&] {
    if (M > 0 && D > 0) {
      const dim3 grid(static_cast<unsigned>(n_chunks), static_cast<unsigned>(col_blocks));
      const size_t acc_smem = static_cast<size_t>(rows) * threads * sizeof(scalar_t), dsm = digit_smem(L, tile);
      if (acc_smem + dsm <= 48 * 1024)
        SEQPE_LAUNCH(grid, threads, acc_smem + dsm, embed_bwd_kernel<scalar_t, true>)(
            a, g.data_ptr(), dcode(gst), part.data_ptr<scalar_t>(), per, tile);
      else
        SEQPE_LAUNCH(grid, threads, dsm, embed_bwd_kernel<scalar_t, false>)(a, g.data_ptr(), dcode(gst),
                                                                            part.data_ptr<scalar_t>(), per, tile);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t n = n_out * D;
    if (n > 0) {
      SEQPE_LAUNCH(static_cast<unsigned>(cdiv(n, 256)), 256, 0, embed_bwd_out_kernel<scalar_t>)(
          part.data_ptr<scalar_t>(), n_chunks, rows, tg.defined() ? tg.data_ptr<scalar_t>() : nullptr, D, base, L,
          K, n_out, dcode(gst), d_tok.data_ptr(), d_pos.data_ptr(), d_cls.data_ptr(),
          data_dim > 1 ? d_dim.data_ptr() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {d_tok, d_pos, d_dim, d_cls};
}

// ==================================================================================== residual + LN
struct LnFwdP {
  const void *x, *y, *w, *b;
  void *h, *a, *mean, *rstd;
  int xdt, ydt, wdt, adt;
  int64_t R, D;
  bool has_y, has_ln, dropout;
  const int64_t* seeds;
  int64_t seed_idx;
  float p;
};

// element i of the LayerNorm input: x, or h = x + dropout(y) (written out as h)
template <typename acc_t>
__device__ __forceinline__ acc_t ln_residual(const LnFwdP& a, uint64_t seed, acc_t scale, int64_t i) {
  acc_t v = ld<acc_t>(a.x, a.xdt, i);
  if (a.has_y) {
    acc_t y = ld<acc_t>(a.y, a.ydt, i);
    // (a multiply by 0 / scale, as F.dropout: a NaN / inf in a dropped element stays NaN)
    if (a.dropout) y = y * (dropout_keep(seed, static_cast<uint32_t>(static_cast<uint64_t>(i)), a.p) ? scale : acc_t(0));
    v = v + y;
    st<acc_t>(a.h, a.xdt, i, v);
  }
  return v;
}

template <typename acc_t>
__global__ void ln_fwd_kernel(LnFwdP a, acc_t eps, acc_t scale) {
  SEQPE_DYN_SHARED(unsigned char, smem);
  acc_t* hrow = reinterpret_cast<acc_t*>(smem);
  __shared__ acc_t red[66];
  const int64_t row = blockIdx.x, D = a.D;
  const int64_t base = row * D;
  const uint64_t seed = a.dropout ? static_cast<uint64_t>(a.seeds[a.seed_idx]) : 0;
  acc_t s = 0;
  for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
    const acc_t v = ln_residual(a, seed, scale, base + c);
    hrow[c] = v;
    s += v;
  }
  if (!a.has_ln) return;
  const acc_t mu = block_sum(s, red) / static_cast<acc_t>(D);
  acc_t sq = 0;
  for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
    const acc_t d = hrow[c] - mu;
    sq += d * d;
  }
  const acc_t var = block_sum(sq, red) / static_cast<acc_t>(D);
  const acc_t rs = acc_t(1) / sqrt_acc(var + eps);
  for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
    const acc_t o = (hrow[c] - mu) * rs * ld<acc_t>(a.w, a.wdt, c) + ld<acc_t>(a.b, a.wdt, c);
    st<acc_t>(a.a, a.adt, base + c, o);
  }
  if (threadIdx.x == 0) {
    static_cast<acc_t*>(a.mean)[row] = mu;
    static_cast<acc_t*>(a.rstd)[row] = rs;
  }
}

// The same with one warp per row and the row in registers (VPT values per lane, lane + 32 k): warp sums only, no
// block barriers or shared row, for D <= 1024. The block-per-row kernel above took 33 us per text-step call on
// the H200 (Triton's one-row program: 20), two block reductions of 3 barriers each per 768-wide row.
template <typename acc_t, int VPT>
__global__ void ln_fwd_warp_kernel(LnFwdP a, acc_t eps, acc_t scale) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= a.R) return;  // a whole warp; no block-wide barrier follows
  const int64_t D = a.D, base = row * D;
  const uint64_t seed = a.dropout ? static_cast<uint64_t>(a.seeds[a.seed_idx]) : 0;
  acc_t v[VPT];
  acc_t s = 0;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t c = lane + 32 * k;
    v[k] = 0;
    if (c < D) {
      v[k] = ln_residual(a, seed, scale, base + c);
      s += v[k];
    }
  }
  if (!a.has_ln) return;
  const acc_t mu = warp_sum(s) / static_cast<acc_t>(D);
  acc_t sq = 0;
#pragma unroll
  for (int k = 0; k < VPT; ++k)
    if (lane + 32 * k < D) {
      const acc_t d = v[k] - mu;
      sq += d * d;
    }
  const acc_t var = warp_sum(sq) / static_cast<acc_t>(D);
  const acc_t rs = acc_t(1) / sqrt_acc(var + eps);
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int64_t c = lane + 32 * k;
    if (c < D) st<acc_t>(a.a, a.adt, base + c, (v[k] - mu) * rs * ld<acc_t>(a.w, a.wdt, c) + ld<acc_t>(a.b, a.wdt, c));
  }
  if (lane == 0) {
    static_cast<acc_t*>(a.mean)[row] = mu;
    static_cast<acc_t*>(a.rstd)[row] = rs;
  }
}

// values per lane of ln_fwd_warp_kernel for width D (0: wider than 1024, the block-per-row kernel)
inline int ln_fwd_vpt(int64_t D) {
  for (int v : {1, 2, 4, 8, 12, 16, 24, 32})
    if (32 * v >= D) return v;
  return 0;
}

Tensor4 residual_layernorm_fwd_cuda(const Tensor& x_, const OptTensor& y_, const OptTensor& w_, const OptTensor& b_,
                                    double eps, double p, const OptTensor& seeds, int64_t seed_idx,
                                    int64_t out_dtype) {
  DeviceGuard guard(x_.device());
  TORCH_CHECK(x_.dim() == 2, "seqpe_ext::residual_layernorm_fwd: x must be [R, D]");
  check_float_dtype(x_, "residual_layernorm_fwd", "x");
  const Tensor x = x_.contiguous();
  const int64_t R = x.size(0), D = x.size(1);
  const bool has_y = has(y_), has_ln = has(w_);
  const Tensor y = has_y ? y_->contiguous() : Tensor();
  if (has_y) TORCH_CHECK(y.sizes() == x.sizes(), "seqpe_ext::residual_layernorm_fwd: y must have x's shape");
  const bool f64 = x.scalar_type() == at::kDouble;
  const auto stat_dt = f64 ? at::kDouble : at::kFloat;
  const Tensor w = has_ln ? w_->to(stat_dt).contiguous() : Tensor();
  const Tensor b = has_ln ? (has(b_) ? b_->to(stat_dt).contiguous() : at::zeros({D}, x.options().dtype(stat_dt)))
                          : Tensor();
  Tensor h = has_y ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor a = has_ln ? at::empty({R, D}, x.options().dtype(dtype_from_code(out_dtype))) : at::empty({0}, x.options());
  Tensor mean = has_ln ? at::empty({R}, x.options().dtype(stat_dt)) : at::zeros({R}, x.options().dtype(stat_dt));
  Tensor rstd = has_ln ? at::empty({R}, x.options().dtype(stat_dt)) : at::zeros({R}, x.options().dtype(stat_dt));
  const bool dropout = has_y && p > 0.0;
  Tensor sd;
  if (dropout) {
    check_seeds(seeds, seed_idx, "residual_layernorm_fwd");
    sd = seeds->to(x.device(), at::kLong).contiguous();
  }
  if (R == 0 || D == 0 || (!has_y && !has_ln)) return {h, a, mean, rstd};
  LnFwdP P{x.data_ptr(), has_y ? y.data_ptr() : nullptr, has_ln ? w.data_ptr() : nullptr,
           has_ln ? b.data_ptr() : nullptr, has_y ? h.data_ptr() : nullptr, has_ln ? a.data_ptr() : nullptr,
           mean.data_ptr(), rstd.data_ptr(), dcode(x.scalar_type()),
           has_y ? dcode(y.scalar_type()) : 0, dcode(stat_dt), has_ln ? dcode(a.scalar_type()) : 0, R, D, has_y,
           has_ln, dropout, dropout ? sd.data_ptr<int64_t>() : nullptr, seed_idx, static_cast<float>(p)};
  const int threads = ln_threads(D);
  AT_DISPATCH_FLOATING_TYPES(stat_dt, "seqpe_residual_layernorm_fwd_cuda", [&] {
    const scalar_t epsv = static_cast<scalar_t>(f64 ? eps : static_cast<double>(static_cast<float>(eps)));
    const scalar_t sc = static_cast<scalar_t>(drop_scale(p));
    const unsigned wblocks = static_cast<unsigned>(cdiv(R, 8));  // 8 rows (warps) per block
    switch (ln_fwd_vpt(D)) {
      case 1: SEQPE_LAUNCH(wblocks, 256, 0, ln_fwd_warp_kernel<scalar_t, 1>)(P, epsv, sc); break;
      case 2: SEQPE_LAUNCH(wblocks, 256, 0, ln_fwd_warp_kernel<scalar_t, 2>)(P, epsv, sc); break;
      case 4: SEQPE_LAUNCH(wblocks, 256, 0, ln_fwd_warp_kernel<scalar_t, 4>)(P, epsv, sc); break;
      case 8: SEQPE_LAUNCH(wblocks, 256, 0, ln_fwd_warp_kernel<scalar_t, 8>)(P, epsv, sc); break;
      case 12: SEQPE_LAUNCH(wblocks, 256, 0, ln_fwd_warp_kernel<scalar_t, 12>)(P, epsv, sc); break;
      case 16: SEQPE_LAUNCH(wblocks, 256, 0, ln_fwd_warp_kernel<scalar_t, 16>)(P, epsv, sc); break;
      case 24: SEQPE_LAUNCH(wblocks, 256, 0, ln_fwd_warp_kernel<scalar_t, 24>)(P, epsv, sc); break;
      case 32: SEQPE_LAUNCH(wblocks, 256, 0, ln_fwd_warp_kernel<scalar_t, 32>)(P, epsv, sc); break;
      default: {
        const size_t smem = static_cast<size_t>(D) * sizeof(scalar_t);
        if (smem > kDynSmemWithRed) {  // the row past ~47 KB: opt in (the static `red` needs the rest of 48 KB)
          TORCH_CHECK(smem + kLnStaticReserve <= smem_optin(),
                      "seqpe_ext::residual_layernorm_fwd (CUDA): width ", D, " too large");
          allow_smem(ln_fwd_kernel<scalar_t>, smem);
        }
        SEQPE_LAUNCH(static_cast<unsigned>(R), threads, smem, ln_fwd_kernel<scalar_t>)(P, epsv, sc);
      }
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {h, a, mean, rstd};
}

struct LnBwdP {
  const void *x, *da, *dh, *w, *mean, *rstd;
  void *dx, *dy;
  int xdt, dadt, dhdt, ydt;
  int64_t R, D, per;
  bool has_dh, has_ln, has_y, dropout;
  const int64_t* seeds;
  int64_t seed_idx;
  float p;
  int64_t dh_every;  // > 0: dh holds rows r % dh_every == dh_every - 1 only, densely (check_ln_dh)
};

// part [n_chunks, pstride]: per-chunk column sums of dw at column 0, db at D (with the LN), dy (the bias gradient
// of the GEMM before the branch) at dyb_off (>= 0 when asked); each (chunk, column) is owned by one thread. SMEM:
// the thread keeps its columns' sums in shared memory and writes each partial once at the end (part needs no
// zero fill); without (a width too large for 48 KB) it adds into the zeroed part row by row. The former kernel
// always did the latter: 3 global read-modify-writes per element and row, ~170 MB per text-step call (54 us).
template <typename acc_t, bool SMEM>
__global__ void ln_bwd_kernel(LnBwdP a, acc_t scale, acc_t* part, int64_t pstride, int64_t dyb_off) {
  SEQPE_DYN_SHARED(unsigned char, ln_bwd_smem);
  __shared__ acc_t red[66];
  const int64_t ch = blockIdx.x, D = a.D;
  const int64_t r_end = min(a.R, (ch + 1) * a.per);
  const uint64_t seed = a.dropout ? static_cast<uint64_t>(a.seeds[a.seed_idx]) : 0;
  const acc_t* w = static_cast<const acc_t*>(a.w);
  acc_t* acc = SMEM ? reinterpret_cast<acc_t*>(ln_bwd_smem) : part + ch * pstride;
  if (SMEM)  // each thread's own columns, in every part
    for (int64_t c = threadIdx.x; c < D; c += blockDim.x)
      for (int64_t k = c; k < pstride; k += D) acc[k] = 0;
  for (int64_t row = ch * a.per; row < r_end; ++row) {
    const int64_t base = row * D;
    const bool dh_row = a.has_dh && (a.dh_every == 0 || row % a.dh_every == a.dh_every - 1);
    const int64_t dh_base = (a.dh_every ? row / a.dh_every : row) * D;
    acc_t mu = 0, rs = 0, k1 = 0, k2 = 0;
    if (a.has_ln) {
      mu = static_cast<const acc_t*>(a.mean)[row];
      rs = static_cast<const acc_t*>(a.rstd)[row];
      acc_t c1 = 0, c2 = 0;
      for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
        const acc_t xh = (ld<acc_t>(a.x, a.xdt, base + c) - mu) * rs;
        const acc_t dxh = ld<acc_t>(a.da, a.dadt, base + c) * w[c];
        c1 += dxh * xh;
        c2 += dxh;
      }
      block_sum2(c1, c2, red);
      k1 = c1 / static_cast<acc_t>(D);
      k2 = c2 / static_cast<acc_t>(D);
    }
    for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
      acc_t g = dh_row ? ld<acc_t>(a.dh, a.dhdt, dh_base + c) : acc_t(0);
      if (a.has_ln) {
        const acc_t xh = (ld<acc_t>(a.x, a.xdt, base + c) - mu) * rs;
        const acc_t da = ld<acc_t>(a.da, a.dadt, base + c);
        const acc_t dxh = da * w[c];
        g += (dxh - (xh * k1 + k2)) * rs;
        acc[c] += da * xh;
        acc[D + c] += da;
      }
      st<acc_t>(a.dx, a.xdt, base + c, g);
      if (a.has_y) {
        acc_t dy = g;
        if (a.dropout) {
          const bool keep = dropout_keep(seed, static_cast<uint32_t>(static_cast<uint64_t>(base + c)), a.p);
          dy = dy * (keep ? scale : acc_t(0));
        }
        st<acc_t>(a.dy, a.ydt, base + c, dy);
        if (dyb_off >= 0) acc[dyb_off + c] += dy;
      }
    }
  }
  if (SMEM)
    for (int64_t c = threadIdx.x; c < D; c += blockDim.x)
      for (int64_t k = c; k < pstride; k += D) part[ch * pstride + k] = acc[k];
}

// bias: also the column sums of dy (empty without y), and every partial reduced by one launch
Tensor5 rln_bwd_cuda(const OptTensor& da_, const OptTensor& dh_, const Tensor& ln_in_, const OptTensor& w_,
                     const Tensor& mean_, const Tensor& rstd_, double p, const OptTensor& seeds, int64_t seed_idx,
                     bool has_y, int64_t y_dtype, bool bias, int64_t dh_every) {
  DeviceGuard guard(ln_in_.device());
  TORCH_CHECK(ln_in_.dim() == 2, "seqpe_ext::residual_layernorm_bwd: ln_in must be [R, D]");
  check_float_dtype(ln_in_, "residual_layernorm_bwd", "ln_in");
  const Tensor x = ln_in_.contiguous();
  const int64_t R = x.size(0), D = x.size(1);
  const bool has_dh = has(dh_);
  const bool has_ln = has(w_) && has(da_);
  const auto acc_dt = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor da = has_ln ? da_->contiguous() : Tensor();
  const Tensor dh = has_dh ? dh_->contiguous() : Tensor();
  const Tensor w = has_ln ? w_->to(acc_dt).contiguous() : Tensor();
  const Tensor mean = has_ln ? mean_.to(acc_dt).contiguous() : Tensor();
  const Tensor rstd = has_ln ? rstd_.to(acc_dt).contiguous() : Tensor();
  // (as the CPU op: the kernel indexes every input by ln_in's shape)
  if (has_ln) {
    TORCH_CHECK(da.sizes() == x.sizes(), "seqpe_ext::residual_layernorm_bwd: da must match ln_in");
    TORCH_CHECK(w.numel() == D, "seqpe_ext::residual_layernorm_bwd: w must have D = ", D, " elements");
    TORCH_CHECK(mean.numel() == R && rstd.numel() == R, "seqpe_ext::residual_layernorm_bwd: mean/rstd must be [R]");
  }
  if (has_dh) check_ln_dh(dh, x, dh_every);
  Tensor dx = at::empty_like(x);
  Tensor dy = has_y ? at::empty({R, D}, x.options().dtype(dtype_from_code(y_dtype))) : at::empty({0}, x.options());
  const bool dropout = has_y && p > 0.0;
  Tensor sd;
  if (dropout) {
    check_seeds(seeds, seed_idx, "residual_layernorm_bwd");
    sd = seeds->to(x.device(), at::kLong).contiguous();
  }
  const int64_t per = std::max<int64_t>(4, cdiv(R, 1024));
  const int64_t n_chunks = R > 0 ? cdiv(R, per) : 0;
  const bool dyb = bias && has_y;
  const int64_t k_parts = 2 * has_ln + dyb, pstride = k_parts * D;
  // one buffer for every partial: [n_chunks, k_parts * D], written once per element by the shared-memory kernel
  // (zeroed for the other, and for an empty batch: one zero row)
  const size_t elt = acc_dt == at::kDouble ? sizeof(double) : sizeof(float);
  const size_t psmem = static_cast<size_t>(pstride) * elt;
  const bool smem_parts = psmem <= kDynSmemWithRed && n_chunks > 0 && D > 0;
  Tensor part;
  if (k_parts) {
    part = at::empty({std::max<int64_t>(n_chunks, 1), pstride}, x.options().dtype(acc_dt));
    if (!smem_parts) part.zero_();
  }
  LnBwdP P{x.data_ptr(), has_ln ? da.data_ptr() : nullptr, has_dh ? dh.data_ptr() : nullptr,
           has_ln ? w.data_ptr() : nullptr, has_ln ? mean.data_ptr() : nullptr, has_ln ? rstd.data_ptr() : nullptr,
           dx.data_ptr(), has_y ? dy.data_ptr() : nullptr, dcode(x.scalar_type()),
           has_ln ? dcode(da.scalar_type()) : 0, has_dh ? dcode(dh.scalar_type()) : 0,
           has_y ? dcode(dy.scalar_type()) : 0, R, D, per, has_dh, has_ln, has_y, dropout,
           dropout ? sd.data_ptr<int64_t>() : nullptr, seed_idx, static_cast<float>(p), has_dh ? dh_every : 0};
  Tensor dw, db, dybs;
  AT_DISPATCH_FLOATING_TYPES(acc_dt, "seqpe_residual_layernorm_bwd_cuda", [&] {
    scalar_t* pp = k_parts ? part.data_ptr<scalar_t>() : nullptr;
    if (n_chunks > 0 && D > 0) {
      const unsigned blocks = static_cast<unsigned>(n_chunks);
      const int64_t dyb_off = dyb ? 2 * has_ln * D : -1;
      if (smem_parts)
        SEQPE_LAUNCH(blocks, ln_threads(D), psmem, ln_bwd_kernel<scalar_t, true>)(
            P, static_cast<scalar_t>(drop_scale(p)), pp, pstride, dyb_off);
      else
        SEQPE_LAUNCH(blocks, ln_threads(D), 0, ln_bwd_kernel<scalar_t, false>)(
            P, static_cast<scalar_t>(drop_scale(p)), pp, pstride, dyb_off);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (k_parts == 0 || D == 0) {
      if (has_ln) dw = at::zeros({D}, x.options().dtype(acc_dt)), db = at::zeros({D}, x.options().dtype(acc_dt));
      if (dyb) dybs = at::zeros({D}, x.options().dtype(acc_dt));
      return;
    }
    const int64_t nc = part.size(0);
    if (bias) {  // the encoder's call: one launch for all sums; dw / db / dyb are views of one tensor
      Tensor sums = at::empty({pstride}, x.options().dtype(acc_dt));
      chunk_sum<scalar_t>(pp, nc, pstride, pstride, sums.data_ptr<scalar_t>());
      if (has_ln) dw = sums.narrow(0, 0, D), db = sums.narrow(0, D, D);
      if (dyb) dybs = sums.narrow(0, 2 * has_ln * D, D);
    } else {  // the operator's outputs may not alias each other
      dw = at::empty({D}, x.options().dtype(acc_dt)), db = at::empty({D}, x.options().dtype(acc_dt));
      chunk_sum<scalar_t>(pp, nc, D, pstride, dw.data_ptr<scalar_t>());
      chunk_sum<scalar_t>(pp + D, nc, D, pstride, db.data_ptr<scalar_t>());
    }
  });
  if (has_ln) {
    dw = dw.to(w_->scalar_type()).view(w_->sizes());
    db = db.to(w_->scalar_type()).view(w_->sizes());
  } else {
    dw = at::empty({0}, x.options());
    db = at::empty({0}, x.options());
  }
  if (!dyb) dybs = at::empty({0}, x.options());
  return {dx, dy, dw, db, dybs};
}

// ==================================================================================== gelu_new
// The elementwise kernels take kGeluILP elements per thread per pass, all loaded before any is computed or stored:
// one 2-byte load in flight per thread (the former one element per thread) kept ~4 KB in flight per SM, far
// below what HBM needs to stream at full rate. Each element's arithmetic is the same as before.
constexpr int kGeluILP = 4;

template <typename acc_t>
__device__ __forceinline__ acc_t gelu_k(acc_t x) {
  const acc_t C = static_cast<acc_t>(0.7978845608028654), A = static_cast<acc_t>(0.044715);
  const acc_t t = tanh_k<acc_t>(C * (x + A * x * x * x));
  return acc_t(0.5) * x * (acc_t(1) + t);
}

template <typename acc_t>
__device__ __forceinline__ acc_t gelu_grad_k(acc_t du, acc_t x) {  // du * gelu'(x)
  const acc_t C = static_cast<acc_t>(0.7978845608028654), A = static_cast<acc_t>(0.044715);
  const acc_t A3 = static_cast<acc_t>(3.0 * 0.044715);
  const acc_t t = tanh_k<acc_t>(C * (x + A * x * x * x));
  const acc_t dt_ = (acc_t(1) - t * t) * C * (acc_t(1) + A3 * x * x);
  return du * (acc_t(0.5) * (acc_t(1) + t) + acc_t(0.5) * x * dt_);
}

// block tile b covers elements [b * blockDim * ILP, (b + 1) * blockDim * ILP); thread t's u-th element is
// b * blockDim * ILP + u * blockDim + t (each u a coalesced row of the tile)
template <typename acc_t>
__global__ void gelu_fwd_kernel(const void* z, int dt, void* u, int64_t n) {
  const int64_t span = static_cast<int64_t>(blockDim.x) * kGeluILP;
  for (int64_t b0 = static_cast<int64_t>(blockIdx.x) * span + threadIdx.x; b0 < n;
       b0 += static_cast<int64_t>(gridDim.x) * span) {
    acc_t x[kGeluILP];
#pragma unroll
    for (int k = 0; k < kGeluILP; ++k)
      if (b0 + k * blockDim.x < n) x[k] = ld<acc_t>(z, dt, b0 + k * blockDim.x);
#pragma unroll
    for (int k = 0; k < kGeluILP; ++k)
      if (b0 + k * blockDim.x < n) st<acc_t>(u, dt, b0 + k * blockDim.x, gelu_k(x[k]));
  }
}

template <typename acc_t>
__global__ void gelu_bwd_kernel(const void* du, int dudt, const void* z, int dt, void* dz, int64_t n) {
  const int64_t span = static_cast<int64_t>(blockDim.x) * kGeluILP;
  for (int64_t b0 = static_cast<int64_t>(blockIdx.x) * span + threadIdx.x; b0 < n;
       b0 += static_cast<int64_t>(gridDim.x) * span) {
    acc_t x[kGeluILP], g[kGeluILP];
#pragma unroll
    for (int k = 0; k < kGeluILP; ++k)
      if (b0 + k * blockDim.x < n)
        x[k] = ld<acc_t>(z, dt, b0 + k * blockDim.x), g[k] = ld<acc_t>(du, dudt, b0 + k * blockDim.x);
#pragma unroll
    for (int k = 0; k < kGeluILP; ++k)
      if (b0 + k * blockDim.x < n) st<acc_t>(dz, dt, b0 + k * blockDim.x, gelu_grad_k(g[k], x[k]));
  }
}

inline unsigned elem_blocks(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>(cdiv(n, 256 * kGeluILP), 1 << 20));
}

Tensor gelu_new_fwd_cuda(const Tensor& z_) {
  DeviceGuard guard(z_.device());
  check_float_dtype(z_, "gelu_new_fwd", "z");
  const Tensor z = z_.contiguous();
  Tensor u = at::empty_like(z, at::MemoryFormat::Contiguous);
  const int64_t n = z.numel();
  if (n == 0) return u;
  if (z.scalar_type() == at::kDouble)
    SEQPE_LAUNCH(elem_blocks(n), 256, 0, gelu_fwd_kernel<double>)(z.data_ptr(), kF64, u.data_ptr(), n);
  else
    SEQPE_LAUNCH(elem_blocks(n), 256, 0, gelu_fwd_kernel<float>)(z.data_ptr(), dcode(z.scalar_type()), u.data_ptr(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return u;
}

Tensor gelu_new_bwd_cuda(const Tensor& du_, const Tensor& z_) {
  DeviceGuard guard(z_.device());
  check_float_dtype(z_, "gelu_new_bwd", "z");
  TORCH_CHECK(du_.sizes() == z_.sizes(), "seqpe_ext::gelu_new_bwd: du must have z's shape");
  const Tensor z = z_.contiguous();
  const Tensor du = du_.contiguous();
  Tensor dz = at::empty_like(z, at::MemoryFormat::Contiguous);
  const int64_t n = z.numel();
  if (n == 0) return dz;
  if (z.scalar_type() == at::kDouble)
    SEQPE_LAUNCH(elem_blocks(n), 256, 0, gelu_bwd_kernel<double>)(du.data_ptr(), dcode(du.scalar_type()),
                                                                 z.data_ptr(), kF64, dz.data_ptr(), n);
  else
    SEQPE_LAUNCH(elem_blocks(n), 256, 0, gelu_bwd_kernel<float>)(du.data_ptr(), dcode(du.scalar_type()),
                                                                z.data_ptr(), dcode(z.scalar_type()), dz.data_ptr(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dz;
}

// dz and the per-chunk column sums of dz: block (chunk of rows, block of columns), one thread per column walking
// the chunk's rows (coalesced across the warp) kGeluRows at a time, the group's loads issued before its math and
// stores (a store to dz might alias the next row's loads: the compiler cannot hoist them itself); every (chunk,
// column) of part is written once, so no zeroing. The sum runs in row order, as before.
constexpr int kGeluRows = 8;
template <typename acc_t>
__global__ void gelu_bwd_bias_kernel(const void* du, int dudt, const void* z, int dt, void* dz, int64_t R, int64_t C,
                                     int64_t per, acc_t* part) {
  const int64_t ch = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const int64_t r_end = min(R, (ch + 1) * per);
  acc_t s = 0;
  for (int64_t r0 = ch * per; r0 < r_end; r0 += kGeluRows) {
    acc_t x[kGeluRows], g[kGeluRows];
#pragma unroll
    for (int k = 0; k < kGeluRows; ++k)
      if (r0 + k < r_end) x[k] = ld<acc_t>(z, dt, (r0 + k) * C + c), g[k] = ld<acc_t>(du, dudt, (r0 + k) * C + c);
#pragma unroll
    for (int k = 0; k < kGeluRows; ++k) {
      if (r0 + k < r_end) {
        const acc_t v = gelu_grad_k(g[k], x[k]);
        st<acc_t>(dz, dt, (r0 + k) * C + c, v);
        s += v;
      }
    }
  }
  part[ch * C + c] = s;
}

Tensor2 gelu_new_bwd_bias_cuda(const Tensor& du_, const Tensor& z_) {
  DeviceGuard guard(z_.device());
  Tensor z, du, dz;
  std::tie(z, du, dz) = gelu_bwd_bias_args(du_, z_);
  const int64_t R = z.size(0), C = z.size(1);
  const bool f64 = z.scalar_type() == at::kDouble;
  const auto acc_dt = f64 ? at::kDouble : at::kFloat;
  Tensor db = at::empty({C}, z.options().dtype(acc_dt));
  if (C == 0) return {dz, db};
  if (R == 0) return {dz, db.zero_()};
  // ~8 blocks per SM in all: few partial rows (n_chunks x C), long enough row walks per thread
  const int64_t threads = 256, col_blocks = cdiv(C, threads);
  const int64_t sms = sm_count();
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>(R, cdiv(8 * sms, col_blocks)));
  const int64_t per = cdiv(R, want), n_chunks = cdiv(R, per);
  TORCH_CHECK(n_chunks < (int64_t{1} << 31) && col_blocks < 65536, "seqpe_ext::gelu_new_bwd_bias: [", R, ", ", C,
              "] too large");
  Tensor part = at::empty({n_chunks, C}, z.options().dtype(acc_dt));
  const dim3 grid(static_cast<unsigned>(n_chunks), static_cast<unsigned>(col_blocks));
  AT_DISPATCH_FLOATING_TYPES(acc_dt, "seqpe_gelu_bwd_bias_cuda", [&] {
    SEQPE_LAUNCH(grid, static_cast<unsigned>(threads), 0, gelu_bwd_bias_kernel<scalar_t>)(
        du.data_ptr(), dcode(du.scalar_type()), z.data_ptr(), f64 ? kF64 : dcode(z.scalar_type()), dz.data_ptr(), R,
        C, per, part.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    chunk_sum<scalar_t>(part.data_ptr<scalar_t>(), n_chunks, C, C, db.data_ptr<scalar_t>());
  });
  return {dz, db};
}

// ==================================================================================== tiny attention
struct AttnP {
  const void *qb, *kb;  // base pointers of the q view's tensor and the k/v views' tensor
  int dt;
  int64_t M, TQ, T, D, H, DH, L;
  int64_t sqm, sqt, skm, skt;  // element strides (k and v share theirs)
  int64_t q_off, k_off, v_off;
  const float* pad;
  bool causal, has_mask, dropout;
  int64_t q_start;
  float p;
  const int64_t* seeds;
  int64_t seed_idx;
  // indexed operands (layer 0, the Triton kernel's form): token (m, t) is row rows[m * T + t] of a table of n_rows
  // rows (row stride skt); q_rows: q too (a [n, 3D] table), else k / v only (a [n, 2D] table)
  const int64_t* rows;
  int64_t n_rows;
  bool q_rows;
};

__device__ __forceinline__ bool attn_allowed(const AttnP& a, int64_t m, int64_t i, int64_t j) {
  bool allowed = !a.causal || j <= a.q_start + i;
  if (a.has_mask && j < a.L) allowed = allowed && a.pad[m * a.L + j] != 0.0f;
  return allowed;
}

// Per-warp shared scratch (element offsets, acc_t): the (sequence, head)'s q, k, v (and, backward, dout) rows staged
// once with coalesced loads, row stride DH + 1 (lanes reading different rows at the same d hit different banks),
// then the [TQ, T] matrices. Every dot product over the head dim is one lane's sequential loop over shared memory:
// the former kernel reduced each of the TQ x T dot products across the warp (5 dependent shuffles each, 36 in a row
// for T = 6, twice in the backward, and lane 0 drew every dropout bit alone): latency-bound, 327 us per backward
// call on the H200 text step against Triton's 72.
struct AttnSmem {
  int64_t dhp, q, k, v, o, s, pd, ds, total;
};
__host__ __device__ inline AttnSmem attn_smem(int64_t TQ, int64_t T, int64_t DH, bool bwd) {
  AttnSmem L;
  L.dhp = DH + 1;
  L.q = 0;
  L.k = L.q + TQ * L.dhp;
  L.v = L.k + T * L.dhp;
  L.o = L.v + T * L.dhp;
  L.s = L.o + (bwd ? TQ * L.dhp : 0);
  L.pd = L.s + TQ * T;
  L.ds = L.pd + (bwd ? TQ * T : 0);
  L.total = L.ds + (bwd ? TQ * T : 0);
  return L;
}

template <typename acc_t>
__device__ __forceinline__ acc_t quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <>
__device__ __forceinline__ double quiet_nan<double>() { return __longlong_as_double(0x7ff8000000000000LL); }

// element offset where row t of sequence m starts (a k / v row when key, else a query row; add the view's offset
// and the head's column), or -1 for an indexed row outside its table: it reads as NaN, never out of the table (the
// op does not sync to check its indices on the host)
__device__ __forceinline__ int64_t attn_row(const AttnP& a, int64_t m, int64_t t, bool key) {
  if (a.rows != nullptr && (key || a.q_rows)) {
    const int64_t r = a.rows[m * a.T + t];
    return r >= 0 && r < a.n_rows ? r * (key ? a.skt : a.sqt) : -1;
  }
  return key ? m * a.skm + t * a.skt : m * a.sqm + t * a.sqt;
}

// element d of the row starting at row (attn_row's; -1: NaN) + off; 0 past DH
template <typename acc_t>
__device__ __forceinline__ acc_t attn_ld(const void* base, int dt, int64_t row, int64_t off, int64_t d, int64_t DH) {
  if (d >= DH) return acc_t(0);
  return row < 0 ? quiet_nan<acc_t>() : ld<acc_t>(base, dt, row + off + d);
}

// rows [rows, DH] of a tensor into dst (row stride dhp), row r starting at element row_at(r) + off, lanes over d
template <typename acc_t, typename RowAt>
__device__ __forceinline__ void stage_rows(acc_t* dst, int64_t dhp, const void* src, int dt, RowAt row_at,
                                           int64_t off, int64_t rows, int64_t DH) {
  const int lane = threadIdx.x & 31;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t start = row_at(r);
    for (int64_t d = lane; d < DH; d += 32) dst[r * dhp + d] = attn_ld<acc_t>(src, dt, start, off, d, DH);
  }
}

// sum_d x[d] y[d], four independent accumulators (ILP, and a shorter rounding chain than one)
template <typename acc_t>
__device__ __forceinline__ acc_t dot_rows(const acc_t* x, const acc_t* y, int64_t n) {
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t d = 0;
  for (; d + 4 <= n; d += 4) {
    s0 += x[d] * y[d];
    s1 += x[d + 1] * y[d + 1];
    s2 += x[d + 2] * y[d + 2];
    s3 += x[d + 3] * y[d + 3];
  }
  for (; d < n; ++d) s0 += x[d] * y[d];
  return (s0 + s1) + (s2 + s3);
}

// softmax probabilities of the (m, h) pair into S [TQ, T] from the staged q and k (one warp; lanes over (i, j),
// then over rows i)
template <typename acc_t>
__device__ void attn_probs(const AttnP& a, int64_t m, const acc_t* Q, const acc_t* K, int64_t dhp, acc_t sdiv,
                           acc_t* S) {
  const int lane = threadIdx.x & 31;
  for (int64_t idx = lane; idx < a.TQ * a.T; idx += 32) {
    const int64_t i = idx / a.T, j = idx % a.T;
    S[idx] = attn_allowed(a, m, i, j) ? dot_rows(Q + i * dhp, K + j * dhp, a.DH) / sdiv
                                      : static_cast<acc_t>(-3.0e38);  // the Triton kernel's stand-in for finfo.min
  }
  __syncwarp();
  for (int64_t i = lane; i < a.TQ; i += 32) {
    acc_t* s = S + i * a.T;
    acc_t mx = s[0];
    for (int64_t j = 1; j < a.T; ++j) mx = s[j] > mx ? s[j] : mx;
    acc_t sum = 0;
    for (int64_t j = 0; j < a.T; ++j) {
      s[j] = exp_acc(s[j] - mx);
      sum += s[j];
    }
    for (int64_t j = 0; j < a.T; ++j) s[j] = s[j] / sum;
  }
  __syncwarp();
}

// the (m, h) pair of this warp, its scratch staged (q, k, v; dout too for the backward); false past the last pair
template <typename acc_t>
__device__ __forceinline__ bool attn_stage(const AttnP& a, unsigned char* smem, bool bwd, const void* dout,
                                           int dodt, int64_t& m, int64_t& h, AttnSmem& L, acc_t*& W) {
  const int warp = threadIdx.x >> 5, wpb = blockDim.x >> 5;
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * wpb + warp;
  if (pair >= a.M * a.H) return false;
  m = pair / a.H, h = pair % a.H;
  const int64_t col = h * a.DH;
  L = attn_smem(a.TQ, a.T, a.DH, bwd);
  W = reinterpret_cast<acc_t*>(smem) + warp * L.total;
  const auto qrow = [&](int64_t r) { return attn_row(a, m, r, false); };
  const auto krow = [&](int64_t r) { return attn_row(a, m, r, true); };
  stage_rows(W + L.q, L.dhp, a.qb, a.dt, qrow, a.q_off + col, a.TQ, a.DH);
  stage_rows(W + L.k, L.dhp, a.kb, a.dt, krow, a.k_off + col, a.T, a.DH);
  stage_rows(W + L.v, L.dhp, a.kb, a.dt, krow, a.v_off + col, a.T, a.DH);
  if (bwd) stage_rows(W + L.o, L.dhp, dout, dodt, [&](int64_t r) { return (m * a.TQ + r) * a.D; }, col, a.TQ, a.DH);
  __syncwarp();
  return true;
}

template <typename acc_t>
__global__ void attn_fwd_kernel(AttnP a, acc_t sdiv, acc_t scale, void* out) {
  SEQPE_DYN_SHARED(unsigned char, smem);
  int64_t m, h;
  AttnSmem L;
  acc_t* W;
  if (!attn_stage<acc_t>(a, smem, false, nullptr, 0, m, h, L, W)) return;
  const int lane = threadIdx.x & 31;
  const int64_t col = h * a.DH, n = a.TQ * a.T;
  acc_t* S = W + L.s;
  attn_probs<acc_t>(a, m, W + L.q, W + L.k, L.dhp, sdiv, S);
  if (a.dropout) {
    const uint64_t seed = static_cast<uint64_t>(a.seeds[a.seed_idx]);
    for (int64_t idx = lane; idx < n; idx += 32) {
      const uint64_t off = static_cast<uint64_t>((m * a.H + h) * n + idx);  // ((m*H+h)*TQ+i)*T+j
      S[idx] = S[idx] * (dropout_keep(seed, static_cast<uint32_t>(off), a.p) ? scale : acc_t(0));  // (NaN stays)
    }
    __syncwarp();
  }
  const acc_t* V = W + L.v;
  for (int64_t i = 0; i < a.TQ; ++i) {
    for (int64_t d = lane; d < a.DH; d += 32) {
      acc_t o = 0;
      for (int64_t j = 0; j < a.T; ++j) o += S[i * a.T + j] * V[j * L.dhp + d];
      st<acc_t>(out, a.dt, (m * a.TQ + i) * a.D + col + d, o);
    }
  }
}

template <typename acc_t>
__global__ void attn_bwd_kernel(AttnP a, acc_t sdiv, acc_t scale, const void* dout, int dodt, void* dq_base,
                                void* dkv_base, int64_t dqm, int64_t dqt, int64_t dkm, int64_t dkt, int64_t dk_off,
                                int64_t dv_off) {
  SEQPE_DYN_SHARED(unsigned char, smem);
  int64_t m, h;
  AttnSmem L;
  acc_t* W;
  if (!attn_stage<acc_t>(a, smem, true, dout, dodt, m, h, L, W)) return;
  const int lane = threadIdx.x & 31;
  const int64_t col = h * a.DH, n = a.TQ * a.T, dhp = L.dhp;
  const acc_t *Q = W + L.q, *K = W + L.k, *V = W + L.v, *O = W + L.o;
  acc_t *P = W + L.s, *PD = W + L.pd, *DS = W + L.ds;
  attn_probs<acc_t>(a, m, Q, K, dhp, sdiv, P);
  const uint64_t seed = a.dropout ? static_cast<uint64_t>(a.seeds[a.seed_idx]) : 0;
  for (int64_t idx = lane; idx < n; idx += 32) {  // dp_ij = do_i . v_j, through the forward's dropout
    const int64_t i = idx / a.T, j = idx % a.T;
    const acc_t dp = dot_rows(O + i * dhp, V + j * dhp, a.DH);
    acc_t kf = 1;
    if (a.dropout) {
      const uint64_t off = static_cast<uint64_t>((m * a.H + h) * n + idx);
      kf = dropout_keep(seed, static_cast<uint32_t>(off), a.p) ? scale : acc_t(0);
    }
    PD[idx] = P[idx] * kf;
    DS[idx] = dp * kf;
  }
  __syncwarp();
  for (int64_t i = lane; i < a.TQ; i += 32) {
    acc_t rowsum = 0;
    for (int64_t j = 0; j < a.T; ++j) rowsum += P[i * a.T + j] * DS[i * a.T + j];
    for (int64_t j = 0; j < a.T; ++j)  // masked logits are constants: no gradient (as the Triton kernel)
      DS[i * a.T + j] = attn_allowed(a, m, i, j) ? P[i * a.T + j] * (DS[i * a.T + j] - rowsum) / sdiv : acc_t(0);
  }
  __syncwarp();
  for (int64_t d = lane; d < a.DH; d += 32) {
    for (int64_t i = 0; i < a.TQ; ++i) {  // dq_i = sum_j ds_ij k_j
      acc_t s = 0;
      for (int64_t j = 0; j < a.T; ++j) s += DS[i * a.T + j] * K[j * dhp + d];
      st<acc_t>(dq_base, a.dt, m * dqm + i * dqt + col + d, s);
    }
    for (int64_t j = 0; j < a.T; ++j) {  // dk_j = sum_i ds_ij q_i ; dv_j = sum_i pd_ij do_i
      acc_t sk = 0, sv = 0;
      for (int64_t i = 0; i < a.TQ; ++i) {
        sk += DS[i * a.T + j] * Q[i * dhp + d];
        sv += PD[i * a.T + j] * O[i * dhp + d];
      }
      st<acc_t>(dkv_base, a.dt, m * dkm + j * dkt + dk_off + col + d, sk);
      st<acc_t>(dkv_base, a.dt, m * dkm + j * dkt + dv_off + col + d, sv);
    }
  }
}

// ------------------------------------------------------------------ register-resident variant (T <= 8, DH <= 64)
// The staged kernels above spend ~1000 warp-wide shared-memory accesses per (sequence, head) in the backward at the
// paper's shapes (each lane walks whole 64-long dot products through shared memory): ~75 us per text-step call on
// 132 SMs before any latency. Here each lane holds head columns lane and lane + 32 of the k / v rows in registers;
// a query row's TP partial dot products are summed across the warp by one reduce-scatter (TP - 1 + log2(32 / TP)
// shuffles), after which lane l holds the full score of key l % TP, and the softmax / dropout / ds work for a row is
// one value per lane. Rows are broadcast to the warp through TP words of shared memory. Same formulas as the staged
// kernels (the sums run in other orders); acc_t float only (fp64 keeps the staged kernels). The pair's query rows
// (and dout rows) are loaded up front into shared memory with the k / v registers, so no row waits on its loads.
constexpr int kAttnRegCols = 2;                   // head columns per lane: DH <= 64
constexpr int kAttnRegW = 32 * kAttnRegCols;      // a staged row's width in shared memory

// sum over the 32 lanes of s[lane % TP]: halving exchanges (lane bit b of TP / 2 .. 1 picks which half it keeps),
// then whole-value exchanges across the lanes that share lane % TP (their sums are the same, bit for bit: each add
// is commutative)
template <int TP, typename acc_t>
__device__ __forceinline__ acc_t reduce_scatter(acc_t (&s)[TP]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = TP / 2; o >= 1; o >>= 1) {
    const bool hi = (lane & o) != 0;
#pragma unroll
    for (int t = 0; t < o; ++t) {
      const acc_t send = hi ? s[t] : s[t + o], keep = hi ? s[t + o] : s[t];
      s[t] = keep + __shfl_xor_sync(0xffffffffu, send, o);
    }
  }
  acc_t r = s[0];
#pragma unroll
  for (int o = TP; o < 32; o <<= 1) r += __shfl_xor_sync(0xffffffffu, r, o);
  return r;
}

// max / sum over the TP lanes of a group (lanes sharing lane / TP)
template <int TP, typename acc_t>
__device__ __forceinline__ acc_t group_max(acc_t v) {
#pragma unroll
  for (int o = 1; o < TP; o <<= 1) {
    const acc_t w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}
template <int TP, typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v) {
#pragma unroll
  for (int o = 1; o < TP; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// n (<= TP) rows of this lane's columns into dst [TP][kAttnRegW] (0 past DH), row i starting at row_at(i) + off
template <int TP, typename acc_t, typename RowAt>
__device__ __forceinline__ void attn_reg_stage(acc_t* dst, const void* src, int dt, RowAt row_at, int64_t off,
                                               int64_t n, int64_t DH) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < TP; ++i) {
    if (i >= n) break;
    const int64_t row = row_at(i);
#pragma unroll
    for (int c = 0; c < kAttnRegCols; ++c)
      dst[i * kAttnRegW + lane + 32 * c] = attn_ld<acc_t>(src, dt, row, off, lane + 32 * c, DH);
  }
}

// the (m, h) pair of this warp (false past the last pair: the whole warp leaves), its k / v columns loaded
template <int TP, typename acc_t>
__device__ __forceinline__ bool attn_reg_load(const AttnP& a, int64_t& m, int64_t& h, acc_t (&k)[TP][kAttnRegCols],
                                              acc_t (&v)[TP][kAttnRegCols]) {
  const int lane = threadIdx.x & 31;
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (pair >= a.M * a.H) return false;
  m = pair / a.H, h = pair % a.H;
  const int64_t col = h * a.DH;
#pragma unroll
  for (int j = 0; j < TP; ++j) {
    const int64_t row = j < a.T ? attn_row(a, m, j, true) : 0;
#pragma unroll
    for (int c = 0; c < kAttnRegCols; ++c) {
      const int64_t d = lane + 32 * c;
      k[j][c] = j < a.T ? attn_ld<acc_t>(a.kb, a.dt, row, a.k_off + col, d, a.DH) : acc_t(0);
      v[j][c] = j < a.T ? attn_ld<acc_t>(a.kb, a.dt, row, a.v_off + col, d, a.DH) : acc_t(0);
    }
  }
  return true;
}

// softmax probability of key j = lane % TP for query row i from this lane's partial scores (0 for j >= T), and
// the dropout keep factor of (i, j) (1 without dropout)
template <int TP, typename acc_t>
__device__ __forceinline__ acc_t attn_reg_prob(const AttnP& a, int64_t m, int64_t h, int64_t i, acc_t (&s)[TP],
                                               acc_t sdiv, acc_t scale, acc_t& kf) {
  const int j = (threadIdx.x & 31) % TP;
  const acc_t dot = reduce_scatter<TP>(s);
  acc_t logit = -static_cast<acc_t>(INFINITY);  // lanes of no key (j >= T) take no part in the softmax
  if (j < a.T) logit = attn_allowed(a, m, i, j) ? dot / sdiv : static_cast<acc_t>(-3.0e38);  // (as the staged)
  const acc_t mx = group_max<TP>(logit);
  const acc_t e = j < a.T ? exp_acc(logit - mx) : acc_t(0);
  const acc_t p = e / group_sum<TP>(e);
  kf = 1;
  if (a.dropout && j < a.T) {
    const uint64_t off = static_cast<uint64_t>(((m * a.H + h) * a.TQ + i) * a.T + j);  // ((m*H+h)*TQ+i)*T+j
    kf = dropout_keep(static_cast<uint64_t>(a.seeds[a.seed_idx]), static_cast<uint32_t>(off), a.p) ? scale
                                                                                                   : acc_t(0);
  }
  return p;
}

template <int TP, typename acc_t>
__global__ void attn_fwd_reg_kernel(AttnP a, acc_t sdiv, acc_t scale, void* out) {
  SEQPE_DYN_SHARED(unsigned char, smem);  // per warp: the current row's TP weights, then the TP query rows
  int64_t m, h;
  acc_t k[TP][kAttnRegCols], v[TP][kAttnRegCols];
  if (!attn_reg_load<TP>(a, m, h, k, v)) return;
  const int lane = threadIdx.x & 31;
  acc_t* Pw = reinterpret_cast<acc_t*>(smem) + (threadIdx.x >> 5) * (TP + TP * kAttnRegW);
  acc_t* Qs = Pw + TP;
  const int64_t col = h * a.DH;
  attn_reg_stage<TP>(Qs, a.qb, a.dt, [&](int64_t i) { return attn_row(a, m, i, false); }, a.q_off + col, a.TQ, a.DH);
  __syncwarp();
  for (int64_t i = 0; i < a.TQ; ++i) {
    acc_t q[kAttnRegCols], s[TP];
#pragma unroll
    for (int c = 0; c < kAttnRegCols; ++c) q[c] = Qs[i * kAttnRegW + lane + 32 * c];
#pragma unroll
    for (int j = 0; j < TP; ++j) {
      s[j] = 0;
#pragma unroll
      for (int c = 0; c < kAttnRegCols; ++c) s[j] += q[c] * k[j][c];
    }
    acc_t kf;
    const acc_t p = attn_reg_prob<TP>(a, m, h, i, s, sdiv, scale, kf);
    if (lane < TP) Pw[lane] = p * kf;
    __syncwarp();
#pragma unroll
    for (int c = 0; c < kAttnRegCols; ++c) {
      acc_t o = 0;
#pragma unroll
      for (int j = 0; j < TP; ++j) o += Pw[j] * v[j][c];
      const int64_t d = lane + 32 * c;
      if (d < a.DH) st<acc_t>(out, a.dt, (m * a.TQ + i) * a.D + col + d, o);
    }
    __syncwarp();  // every lane has read the row before the next one is written
  }
}

template <int TP, typename acc_t>
__global__ void attn_bwd_reg_kernel(AttnP a, acc_t sdiv, acc_t scale, const void* dout, int dodt, void* dq_base,
                                    void* dkv_base, int64_t dqm, int64_t dqt, int64_t dkm, int64_t dkt, int64_t dk_off,
                                    int64_t dv_off) {
  // per warp: the current row's TP ds and TP dropped-out p, then the TP query rows and the TP dout rows
  SEQPE_DYN_SHARED(unsigned char, smem);
  int64_t m, h;
  acc_t k[TP][kAttnRegCols], v[TP][kAttnRegCols];
  if (!attn_reg_load<TP>(a, m, h, k, v)) return;
  const int lane = threadIdx.x & 31, j = lane % TP;
  acc_t* DSw = reinterpret_cast<acc_t*>(smem) + (threadIdx.x >> 5) * (2 * TP + 2 * TP * kAttnRegW);
  acc_t* PDw = DSw + TP;
  acc_t* Qs = PDw + TP;
  acc_t* Gs = Qs + TP * kAttnRegW;
  const int64_t col = h * a.DH;
  attn_reg_stage<TP>(Qs, a.qb, a.dt, [&](int64_t i) { return attn_row(a, m, i, false); }, a.q_off + col, a.TQ, a.DH);
  attn_reg_stage<TP>(Gs, dout, dodt, [&](int64_t i) { return (m * a.TQ + i) * a.D; }, col, a.TQ, a.DH);
  __syncwarp();
  acc_t dk[TP][kAttnRegCols], dv[TP][kAttnRegCols];
#pragma unroll
  for (int t = 0; t < TP; ++t)
#pragma unroll
    for (int c = 0; c < kAttnRegCols; ++c) dk[t][c] = dv[t][c] = 0;
  for (int64_t i = 0; i < a.TQ; ++i) {
    acc_t q[kAttnRegCols], g[kAttnRegCols], s[TP], sp[TP];
#pragma unroll
    for (int c = 0; c < kAttnRegCols; ++c)
      q[c] = Qs[i * kAttnRegW + lane + 32 * c], g[c] = Gs[i * kAttnRegW + lane + 32 * c];
#pragma unroll
    for (int t = 0; t < TP; ++t) {
      s[t] = sp[t] = 0;
#pragma unroll
      for (int c = 0; c < kAttnRegCols; ++c) s[t] += q[c] * k[t][c], sp[t] += g[c] * v[t][c];
    }
    acc_t kf;
    const acc_t p = attn_reg_prob<TP>(a, m, h, i, s, sdiv, scale, kf);
    const acc_t dsr = reduce_scatter<TP>(sp) * kf;  // dp_ij = do_i . v_j, through the forward's dropout
    const acc_t rowsum = group_sum<TP>(p * dsr);
    // masked logits are constants: no gradient (as the Triton kernel)
    const acc_t ds = j < a.T && attn_allowed(a, m, i, j) ? p * (dsr - rowsum) / sdiv : acc_t(0);
    if (lane < TP) DSw[lane] = ds, PDw[lane] = p * kf;
    __syncwarp();
#pragma unroll
    for (int c = 0; c < kAttnRegCols; ++c) {  // dq_i = sum_j ds_ij k_j ; dk_j += ds_ij q_i ; dv_j += pd_ij do_i
      acc_t dq = 0;
#pragma unroll
      for (int t = 0; t < TP; ++t) {
        const acc_t dst = DSw[t];
        dq += dst * k[t][c];
        dk[t][c] += dst * q[c];
        dv[t][c] += PDw[t] * g[c];
      }
      const int64_t d = lane + 32 * c;
      if (d < a.DH) st<acc_t>(dq_base, a.dt, m * dqm + i * dqt + col + d, dq);
    }
    __syncwarp();
  }
#pragma unroll
  for (int t = 0; t < TP; ++t) {
    if (t >= a.T) break;
#pragma unroll
    for (int c = 0; c < kAttnRegCols; ++c) {
      const int64_t d = lane + 32 * c;
      if (d < a.DH) {
        st<acc_t>(dkv_base, a.dt, m * dkm + t * dkt + dk_off + col + d, dk[t][c]);
        st<acc_t>(dkv_base, a.dt, m * dkm + t * dkt + dv_off + col + d, dv[t][c]);
      }
    }
  }
}

struct AttnSetup {
  AttnP P;
  Tensor qbase, kvbase, pad, seeds, rows;
};

// the operands of the indexed form (rows [M, T]; as the CPU op's attn_views_indexed, but the row indices are
// checked in the kernel: out of range stages NaN, no host sync)
void attn_setup_indexed(const Tensor& qkv_, const OptTensor& kv_, const Tensor& rows_, int64_t q_start,
                        const char* op, AttnSetup& s) {
  const AttnTable t = attn_table(qkv_, kv_, rows_, q_start, op);
  AttnP& a = s.P;
  s.rows = t.rows;
  a.M = t.M, a.T = t.T, a.D = t.D;
  a.rows = s.rows.const_data_ptr<int64_t>();
  a.n_rows = t.tab.size(0);
  a.skm = 0, a.skt = t.tab.stride(0);
  if (!t.q_table) {
    s.qbase = qkv_.stride(2) == 1 ? qkv_ : qkv_.contiguous();
    s.kvbase = t.tab;
    a.TQ = s.qbase.size(1);
    a.sqm = s.qbase.stride(0), a.sqt = s.qbase.stride(1);
    a.q_off = 0, a.k_off = 0, a.v_off = a.D;
  } else {
    s.qbase = t.tab;
    a.TQ = a.T;
    a.q_rows = true;
    a.sqm = 0, a.sqt = t.tab.stride(0);
    a.q_off = 0, a.k_off = a.D, a.v_off = 2 * a.D;
  }
}

// the strided operands: one [M, T, 3D] c_attn output, or q [M, TQ, D] + kv [M, T, 2D]
void attn_setup_strided(const Tensor& qkv_, const OptTensor& kv_, const char* op, AttnSetup& s) {
  TORCH_CHECK(qkv_.dim() == 3, "seqpe_ext::", op, ": qkv must be [M, T, 3D] (or q [M, TQ, D] with kv)");
  AttnP& a = s.P;
  s.qbase = qkv_.stride(2) == 1 ? qkv_ : qkv_.contiguous();
  a.M = s.qbase.size(0);
  a.TQ = s.qbase.size(1);
  if (has(kv_)) {
    TORCH_CHECK(kv_->dim() == 3 && kv_->size(0) == a.M && kv_->size(2) % 2 == 0, "seqpe_ext::", op,
                ": kv must be [M, T, 2D]");
    s.kvbase = kv_->stride(2) == 1 ? *kv_ : kv_->contiguous();
    a.D = s.kvbase.size(2) / 2;
    TORCH_CHECK(s.qbase.size(2) == a.D, "seqpe_ext::", op, ": q width does not match kv");
    a.T = s.kvbase.size(1);
    a.sqm = s.qbase.stride(0), a.sqt = s.qbase.stride(1);
    a.skm = s.kvbase.stride(0), a.skt = s.kvbase.stride(1);
    a.q_off = 0, a.k_off = 0, a.v_off = a.D;
  } else {
    TORCH_CHECK(s.qbase.size(2) % 3 == 0, "seqpe_ext::", op, ": qkv width must be 3D");
    a.D = s.qbase.size(2) / 3;
    a.T = a.TQ;
    a.sqm = a.skm = s.qbase.stride(0);
    a.sqt = a.skt = s.qbase.stride(1);
    a.q_off = 0, a.k_off = a.D, a.v_off = 2 * a.D;
  }
}

AttnSetup attn_setup(const Tensor& qkv_, const OptTensor& kv_, const OptTensor& pad_mask, int64_t num_heads,
                     bool causal, int64_t q_start, double p, const OptTensor& seeds, int64_t seed_idx, const char* op,
                     const OptTensor& rows) {
  check_float_dtype(qkv_, op, "qkv");
  AttnSetup s;
  AttnP& a = s.P;
  a.rows = nullptr, a.n_rows = 0, a.q_rows = false;
  if (has(rows))
    attn_setup_indexed(qkv_, kv_, *rows, q_start, op, s);
  else
    attn_setup_strided(qkv_, kv_, op, s);
  if (s.kvbase.defined())
    TORCH_CHECK(s.kvbase.scalar_type() == s.qbase.scalar_type(), "seqpe_ext::", op, ": q and kv must share a dtype");
  TORCH_CHECK(num_heads >= 1 && a.D % num_heads == 0, "seqpe_ext::", op, ": num_heads does not divide the width");
  a.qb = s.qbase.data_ptr();
  a.kb = s.kvbase.defined() ? s.kvbase.data_ptr() : s.qbase.data_ptr();
  a.dt = dcode(s.qbase.scalar_type());
  a.H = num_heads;
  a.DH = a.D / num_heads;
  a.has_mask = has(pad_mask);
  a.L = a.has_mask ? pad_mask->size(1) : 0;
  if (a.has_mask) {
    TORCH_CHECK(pad_mask->dim() == 2 && pad_mask->size(0) == a.M && pad_mask->size(1) == a.T - 1, "seqpe_ext::", op,
                ": pad_mask must be [M, T-1]");
    s.pad = pad_mask->to(s.qbase.device(), at::kFloat).contiguous();
  }
  a.pad = a.has_mask ? s.pad.data_ptr<float>() : nullptr;
  a.causal = causal;
  a.q_start = q_start;
  a.dropout = p > 0.0;
  a.p = static_cast<float>(p);
  a.seed_idx = seed_idx;
  a.seeds = nullptr;
  if (a.dropout) {
    check_seeds(seeds, seed_idx, op);
    s.seeds = seeds->to(s.qbase.device(), at::kLong).contiguous();
    a.seeds = s.seeds.data_ptr<int64_t>();
  }
  return s;
}

// warps per block: up to 4 within the default 48 KB of dynamic shared memory; past that one warp per block with the
// device's opt-in limit (sm_80 163 KB, sm_90 227 KB), for long sequences or wide heads
template <typename K>
int attn_warps(K kernel, size_t per_warp, const char* op) {
  int w = 4;
  while (w > 1 && w * per_warp > 48 * 1024) w >>= 1;
  if (w * per_warp > 48 * 1024) {
    TORCH_CHECK(per_warp <= smem_optin(), "seqpe_ext::", op, " (CUDA): ", per_warp,
                " bytes of shared scratch per (sequence, head) exceed the device's ", smem_optin(),
                " (sequence too long or head too wide)");
    allow_smem(kernel, per_warp);
  }
  return w;
}

// the register-resident kernels' TP (keys per lane group) for this call, or 0 for the staged kernels: fp32
// accumulation, at most 8 keys and 64 head columns (the paper's shapes: T = 6 text, 5 image; DH = 64). The
// emulator's SEQPE_EMU_ATTN=staged forces the staged kernels, so tests run both.
int attn_reg_tp(const AttnP& a, bool f64) {
#if defined(SEQPE_EMU)
  const char* force = std::getenv("SEQPE_EMU_ATTN");
  if (force != nullptr && std::string(force) == "staged") return 0;
#endif
  // TP bounds the keys and also the query rows: the kernels stage min(TQ, TP) query (and dout) rows in a [TP, 64]
  // scratch and then read TQ of them, so q [M, TQ, D] with kv and TQ > TP would read past the warp's scratch
  const int64_t n = std::max(a.T, a.TQ);
  if (f64 || n > 8 || a.DH > 32 * kAttnRegCols) return 0;
  return n <= 4 ? 4 : 8;
}

Tensor tiny_attention_fwd_cuda(const Tensor& qkv, const OptTensor& kv, const OptTensor& pad_mask, int64_t num_heads,
                               bool causal, int64_t q_start, double scale_div, double p, const OptTensor& seeds,
                               int64_t seed_idx, const OptTensor& rows) {
  DeviceGuard guard(qkv.device());
  AttnSetup s =
      attn_setup(qkv, kv, pad_mask, num_heads, causal, q_start, p, seeds, seed_idx, "tiny_attention_fwd", rows);
  const AttnP& a = s.P;
  Tensor out = at::empty({a.M, a.TQ, a.D}, s.qbase.options());
  if (a.M == 0 || a.D == 0) return out;
  const bool f64 = s.qbase.scalar_type() == at::kDouble;
  const int tp = attn_reg_tp(a, f64);
  if (tp) {
    const float sdiv = static_cast<float>(scale_div);
    const unsigned blocks = static_cast<unsigned>(cdiv(a.M * a.H, 4));
    const size_t smem = 4 * (tp + tp * kAttnRegW) * sizeof(float);
    if (tp == 4)
      SEQPE_LAUNCH(blocks, 128, smem, attn_fwd_reg_kernel<4, float>)(a, sdiv, static_cast<float>(drop_scale(p)),
                                                                     out.data_ptr());
    else
      SEQPE_LAUNCH(blocks, 128, smem, attn_fwd_reg_kernel<8, float>)(a, sdiv, static_cast<float>(drop_scale(p)),
                                                                     out.data_ptr());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(f64 ? at::kDouble : at::kFloat, "seqpe_attn_fwd_cuda", [&] {
    const size_t per_warp = static_cast<size_t>(attn_smem(a.TQ, a.T, a.DH, false).total) * sizeof(scalar_t);
    const int w = attn_warps(attn_fwd_kernel<scalar_t>, per_warp, "tiny_attention_fwd");
    const unsigned blocks = static_cast<unsigned>(cdiv(a.M * a.H, w));
    const scalar_t sdiv = static_cast<scalar_t>(f64 ? scale_div : static_cast<double>(static_cast<float>(scale_div)));
    SEQPE_LAUNCH(blocks, 32 * w, w * per_warp, attn_fwd_kernel<scalar_t>)(
        a, sdiv, static_cast<scalar_t>(drop_scale(p)), out.data_ptr());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

Tensor2 tiny_attention_bwd_cuda(const Tensor& dout_, const Tensor& qkv, const OptTensor& kv, const OptTensor& pad_mask,
                                int64_t num_heads, bool causal, int64_t q_start, double scale_div, double p,
                                const OptTensor& seeds, int64_t seed_idx, const OptTensor& rows) {
  DeviceGuard guard(qkv.device());
  AttnSetup s =
      attn_setup(qkv, kv, pad_mask, num_heads, causal, q_start, p, seeds, seed_idx, "tiny_attention_bwd", rows);
  const AttnP& a = s.P;
  check_float_dtype(dout_, "tiny_attention_bwd", "dout");
  TORCH_CHECK(dout_.dim() == 3 && dout_.size(0) == a.M && dout_.size(1) == a.TQ && dout_.size(2) == a.D,
              "seqpe_ext::tiny_attention_bwd: dout must be [M, TQ, D]");
  const Tensor dout = dout_.contiguous();
  // per token, also for indexed operands (as the Triton kernel: a table's gradient is the caller's table_grad)
  Tensor d_first = a.q_rows ? at::empty({a.M, a.T, 3 * a.D}, qkv.options()) : at::empty(qkv.sizes(), qkv.options());
  Tensor d_kv = !has(kv)           ? at::empty({0}, qkv.options())
                : s.rows.defined() ? at::empty({a.M, a.T, 2 * a.D}, kv->options())
                                   : at::empty(kv->sizes(), kv->options());
  if (a.M == 0 || a.D == 0) {
    d_first.zero_();
    if (has(kv)) d_kv.zero_();
    return {d_first, d_kv};
  }
  const bool has_kv = has(kv);
  const int64_t W1 = d_first.size(2);
  const int64_t Wk = has_kv ? d_kv.size(2) : W1;
  const bool f64 = s.qbase.scalar_type() == at::kDouble;
  const int tp = attn_reg_tp(a, f64);
  if (tp) {
    const float sdiv = static_cast<float>(scale_div);
    const unsigned blocks = static_cast<unsigned>(cdiv(a.M * a.H, 4));
    const size_t smem = 4 * 2 * (tp + tp * kAttnRegW) * sizeof(float);
    void* dkv = has_kv ? d_kv.data_ptr() : d_first.data_ptr();
    const int64_t dk_off = has_kv ? 0 : a.D, dv_off = has_kv ? a.D : 2 * a.D;
    if (tp == 4)
      SEQPE_LAUNCH(blocks, 128, smem, attn_bwd_reg_kernel<4, float>)(
          a, sdiv, static_cast<float>(drop_scale(p)), dout.data_ptr(), dcode(dout.scalar_type()), d_first.data_ptr(),
          dkv, a.TQ * W1, W1, a.T * Wk, Wk, dk_off, dv_off);
    else
      SEQPE_LAUNCH(blocks, 128, smem, attn_bwd_reg_kernel<8, float>)(
          a, sdiv, static_cast<float>(drop_scale(p)), dout.data_ptr(), dcode(dout.scalar_type()), d_first.data_ptr(),
          dkv, a.TQ * W1, W1, a.T * Wk, Wk, dk_off, dv_off);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {d_first, d_kv};
  }
  AT_DISPATCH_FLOATING_TYPES(f64 ? at::kDouble : at::kFloat, "seqpe_attn_bwd_cuda", [&] {
    const size_t per_warp = static_cast<size_t>(attn_smem(a.TQ, a.T, a.DH, true).total) * sizeof(scalar_t);
    const int w = attn_warps(attn_bwd_kernel<scalar_t>, per_warp, "tiny_attention_bwd");
    const unsigned blocks = static_cast<unsigned>(cdiv(a.M * a.H, w));
    const scalar_t sdiv = static_cast<scalar_t>(f64 ? scale_div : static_cast<double>(static_cast<float>(scale_div)));
    SEQPE_LAUNCH(blocks, 32 * w, w * per_warp, attn_bwd_kernel<scalar_t>)(
        a, sdiv, static_cast<scalar_t>(drop_scale(p)), dout.data_ptr(), dcode(dout.scalar_type()), d_first.data_ptr(),
        has_kv ? d_kv.data_ptr() : d_first.data_ptr(), a.TQ * W1, W1, a.T * Wk, Wk, has_kv ? 0 : a.D,
        has_kv ? a.D : 2 * a.D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {d_first, d_kv};
}

}  // namespace

// Layer 0's table gradient (the C++/CUDA encoder's, as ops/table_grad.py for Triton): the per-token gradient
// g [M, T, C] summed into the rows of the (digit, slot) table, reading g once in its own dtype and summing in
// acc_t, instead of an fp32 copy of g and embedding_dense_backward's sort. Block (slot t, 128 columns, chunk of
// sequences): each thread keeps one accumulator per digit of its column in shared memory (its own slots: no
// synchronisation) and writes every row of its slot for its chunk, zeros included, so each partial is
// written exactly once; table_grad_sum_kernel adds the chunks in a fixed order (deterministic).
constexpr int kTableGroup = 8;

template <typename acc_t>
__global__ void table_grad_kernel(const void* g, int gdt, const int64_t* rows, int64_t M, int64_t T, int64_t L,
                                  int64_t C, int64_t base, int64_t per, int64_t n_rows, acc_t* part) {
  SEQPE_DYN_SHARED(unsigned char, table_grad_smem);
  acc_t* acc = reinterpret_cast<acc_t*>(table_grad_smem) + threadIdx.x;  // acc[b * blockDim.x]: digit b
  const int64_t t = blockIdx.x, ch = blockIdx.z;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const int64_t nb = t < L ? base : 1;  // the CLS slot has one row
  for (int64_t b = 0; b < nb; ++b) acc[b * blockDim.x] = acc_t(0);
  const int64_t m1 = min(M, (ch + 1) * per);
  // kTableGroup sequences at a time, their row ids and gradient values loaded before any is added (one load in
  // flight per thread before: the walk was latency-bound), the digit (row - t) / L by 32-bit division (a 64-bit
  // one per element cost tens of instructions; the host checks that the table's rows fit: a row id whose
  // row - t does not is no digit, as (row - t) / L would not be one either). Adds in order of m, as before.
  const int32_t L32 = static_cast<int32_t>(L), t32 = static_cast<int32_t>(t);
  for (int64_t m0 = ch * per; m0 < m1; m0 += kTableGroup) {
    int32_t dr[kTableGroup];  // row - t, or INT32_MIN outside int32
    acc_t v[kTableGroup];
#pragma unroll
    for (int k = 0; k < kTableGroup; ++k) {
      if (m0 + k < m1) {
        const int64_t r = rows[(m0 + k) * T + t] - t32;
        dr[k] = r > INT32_MIN && r <= INT32_MAX ? static_cast<int32_t>(r) : INT32_MIN;
        v[k] = ld<acc_t>(g, gdt, ((m0 + k) * T + t) * C + c);
      }
    }
#pragma unroll
    for (int k = 0; k < kTableGroup; ++k) {
      if (m0 + k >= m1) break;
      const int32_t b = t < L ? dr[k] / L32 : 0;
      if (b >= 0 && b < nb) acc[b * blockDim.x] += v[k];  // always: rows come from table_rows (in range)
    }
  }
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t row = t < L ? b * L + t : base * L;
    part[(ch * n_rows + row) * C + c] = acc[b * blockDim.x];
  }
}

template <typename acc_t>
__global__ void table_grad_sum_kernel(const acc_t* part, int64_t n_chunks, int64_t n, void* out, int odt) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  acc_t s = 0;
  for (int64_t ch = 0; ch < n_chunks; ++ch) s += part[ch * n + i];
  st<acc_t>(out, odt, i, s);
}

Tensor table_grad_cuda(const Tensor& g_, const Tensor& rows_, int64_t n_rows, int64_t L, bool acc_out) {
  DeviceGuard guard(g_.device());
  const int64_t base = table_grad_args(g_, rows_, n_rows, L);
  TORCH_CHECK(n_rows <= INT32_MAX, "seqpe_ext::table_grad (CUDA): ", n_rows, " table rows; at most ", INT32_MAX);
  const Tensor g = g_.contiguous(), rows = rows_.contiguous();
  const int64_t M = g.size(0), T = g.size(1), C = g.size(2);
  const auto gst = g.scalar_type();
  const auto acc_dt = gst == at::kDouble ? at::kDouble : at::kFloat;
  const int threads = 128;
  const size_t smem = static_cast<size_t>(base) * threads * (acc_dt == at::kDouble ? 8 : 4);
  const auto ost = acc_out ? acc_dt : gst;  // acc_out: the sums unrounded, in the accumulation dtype
  Tensor out = at::empty({n_rows, C}, g.options().dtype(ost));
  if (M == 0 || C == 0) return out.zero_();
  if (smem > 48 * 1024) {  // a base too large for one accumulator per digit in shared memory: ATen's way
    Tensor ga = gst == acc_dt ? g : g.to(acc_dt);
    return at::embedding_dense_backward(ga.view({M * T, C}), rows.view({-1}), n_rows, -1, false).to(ost);
  }
  const int64_t col_blocks = cdiv(C, threads);
  const int64_t sms = sm_count();
  // ~16 blocks per SM in all (T slots x column blocks x chunks of sequences): each thread's walk over its chunk
  // is latency-bound (a 2-byte load and a shared-memory add per sequence), so it takes many warps in flight to
  // keep the loads coming; with ~4 per SM the H200 profile had this kernel at 233 us per text step
  int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(M, cdiv(16 * sms, T * col_blocks)));
  const int64_t per = cdiv(M, n_chunks);
  n_chunks = cdiv(M, per);
  Tensor part = at::empty({n_chunks, n_rows, C}, g.options().dtype(acc_dt));
  AT_DISPATCH_FLOATING_TYPES(acc_dt, "seqpe_table_grad_cuda", [&] {
    const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>(col_blocks), static_cast<unsigned>(n_chunks));
    SEQPE_LAUNCH(grid, threads, smem, table_grad_kernel<scalar_t>)(g.data_ptr(), dcode(gst),
                                                                   rows.const_data_ptr<int64_t>(), M, T, L, C, base,
                                                                   per, n_rows, part.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t n = n_rows * C;
    SEQPE_LAUNCH(static_cast<unsigned>(cdiv(n, 256)), 256, 0, table_grad_sum_kernel<scalar_t>)(
        part.data_ptr<scalar_t>(), n_chunks, n, out.data_ptr(), dcode(ost));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

__global__ void table_rows_kernel(const int64_t* x, int64_t sxm, int64_t sxc, int64_t M, int64_t L, int64_t K,
                                  int64_t base, bool from_positions, bool clamp, int64_t* rows) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t T = L + 1;
  if (i >= M * T) return;
  const int64_t m = i / T, j = i % T;
  rows[i] = j == L ? base * L : table_row(x + m * sxm, sxc, j, L, K, base, from_positions, clamp);
}

Tensor table_rows_cuda(const Tensor& x, int64_t L, int64_t K, int64_t base, bool from_positions, bool clamp) {
  DeviceGuard guard(x.device());
  table_rows_args(x, L, K, base, from_positions);
  const int64_t M = x.size(0), n = M * (L + 1);
  Tensor rows = at::empty({M, L + 1}, x.options());
  if (n > 0) {
    SEQPE_LAUNCH(static_cast<unsigned>(cdiv(n, 256)), 256, 0, table_rows_kernel)(
        x.const_data_ptr<int64_t>(), x.stride(0), x.stride(1), M, L, K, base, from_positions, clamp,
        rows.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return rows;
}

#if defined(SEQPE_EMU)  // the emulated kernels as torch.ops.seqpe_emu.* (schemas inferred; CPU tensors)
#define SEQPE_IMPL(name, fn) m.def(name, fn)
TORCH_LIBRARY(seqpe_emu, m) {
#else
#define SEQPE_IMPL(name, fn) m.impl(name, fn)
TORCH_LIBRARY_IMPL(seqpe_ext, CUDA, m) {
#endif
  SEQPE_IMPL("digit_embed_fwd", &digit_embed_fwd_cuda);
  SEQPE_IMPL("digit_embed_bwd", &digit_embed_bwd_cuda);
  SEQPE_IMPL("residual_layernorm_fwd", &residual_layernorm_fwd_cuda);
  SEQPE_IMPL("residual_layernorm_bwd", &rln_bwd_op<rln_bwd_cuda>);
  SEQPE_IMPL("gelu_new_fwd", &gelu_new_fwd_cuda);
  SEQPE_IMPL("gelu_new_bwd", &gelu_new_bwd_cuda);
  SEQPE_IMPL("residual_layernorm_bwd_bias", &rln_bwd_bias_op<rln_bwd_cuda>);
  SEQPE_IMPL("gelu_new_bwd_bias", &gelu_new_bwd_bias_cuda);
  SEQPE_IMPL("tiny_attention_fwd", &tiny_attention_fwd_cuda);
  SEQPE_IMPL("tiny_attention_bwd", &tiny_attention_bwd_cuda);
  SEQPE_IMPL("table_rows", &table_rows_cuda);
  SEQPE_IMPL("table_grad", &table_grad_cuda);
}

}  // namespace seqpe
