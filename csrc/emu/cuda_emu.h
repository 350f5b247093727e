// A CPU emulator for the CUDA kernels of ops_cuda.cu, so that CI (no GPU) runs them against the reference.
//
// ops_cuda.cu compiled as C++ with SEQPE_EMU defined (csrc/emu/ops_cuda_emu.cpp) gets its CUDA vocabulary from
// here: every CUDA thread of a block is a fiber (ucontext) and the blocks of a grid run one after another. A
// fiber runs until it reaches __syncthreads, __syncwarp or a warp shuffle, and the scheduler releases
// a warp (a block) once all its live threads wait at a warp-scope (block-scope) point. So the kernels'
// indexing, barriers and warp exchanges are exercised exactly as written; what it cannot show is timing,
// the memory model beyond barriers, or device math's last ulp (host expf here).
//
// Checks a GPU would not report (each raises an error naming the kernel's block):
// - a barrier not reached by every live thread of its scope (divergent __syncthreads / __syncwarp: deadlock);
// - a full-mask shuffle or __syncwarp in a warp some of whose lanes already exited;
// - dynamic shared memory is filled with 0xFF bytes (NaN) at each block start, so reading it before writing
//   it shows up in the output;
// - SEQPE_EMU_ORDER=reverse runs the threads of a block (and the blocks) in reverse order: a result that
//   depends on that order has a missing barrier or a race (tests run both orders and compare bit for bit).
#pragma once

#include <ucontext.h>

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace seqpe_emu {

enum class St { kRun, kWarp, kBlock, kDone };

struct Thread {
  ucontext_t ctx;
  St st = St::kRun;
  dim3 idx;
};

struct Block {
  dim3 grid, block, bidx;
  std::vector<Thread> th;
  std::vector<uint64_t> slot;  // one shuffle slot per thread
  ucontext_t sched;
  int cur = 0;
  unsigned char* dyn = nullptr;
  const std::function<void()>* body = nullptr;
};

inline Block*& blk() {
  static thread_local Block* b = nullptr;
  return b;
}
inline Thread& me() { return blk()->th[blk()->cur]; }

inline void wait(St s) {
  Block& b = *blk();
  Thread& t = b.th[b.cur];
  t.st = s;
  swapcontext(&t.ctx, &b.sched);
}

inline void entry() {
  Block& b = *blk();
  (*b.body)();
  b.th[b.cur].st = St::kDone;  // uc_link returns to the scheduler
}

inline bool reverse_order() {
  const char* o = std::getenv("SEQPE_EMU_ORDER");
  return o && std::string(o) == "reverse";
}

inline std::string where(const Block& b, const char* name) {
  return std::string(name) + " block (" + std::to_string(b.bidx.x) + ", " + std::to_string(b.bidx.y) + ", " +
         std::to_string(b.bidx.z) + ")";
}

// one block: every thread a fiber, released warp by warp / block-wide at their sync points
inline void run_block(Block& b, const char* name, size_t stack_bytes, unsigned char* stacks, bool rev) {
  const int n = static_cast<int>(b.th.size());
  for (int i = 0; i < n; ++i) {
    Thread& t = b.th[i];
    t.st = St::kRun;
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = stacks + static_cast<size_t>(i) * stack_bytes;
    t.ctx.uc_stack.ss_size = stack_bytes;
    t.ctx.uc_link = &b.sched;
    makecontext(&t.ctx, entry, 0);
  }
  const int nw = (n + 31) / 32;
  for (;;) {
    for (int k = 0; k < n; ++k) {
      const int i = rev ? n - 1 - k : k;
      if (b.th[i].st != St::kRun) continue;
      b.cur = i;
      swapcontext(&b.sched, &b.th[i].ctx);
    }
    bool released = false, all_done = true, all_block = true;
    for (int w = 0; w < nw; ++w) {
      int waiting = 0, done = 0, members = 0;
      for (int i = w * 32; i < std::min(n, w * 32 + 32); ++i, ++members) {
        waiting += b.th[i].st == St::kWarp;
        done += b.th[i].st == St::kDone;
      }
      if (waiting > 0 && waiting + done == members) {
        TORCH_CHECK(done == 0, "CUDA emulator: ", where(b, name), ", warp ", w,
                    ": a full-mask warp sync or shuffle with ", done, " lanes already exited");
        for (int i = w * 32; i < w * 32 + members; ++i) b.th[i].st = St::kRun;
        released = true;
      }
    }
    for (const Thread& t : b.th) {
      all_done = all_done && t.st == St::kDone;
      all_block = all_block && (t.st == St::kBlock || t.st == St::kDone);
    }
    if (all_done) return;
    if (released) continue;
    TORCH_CHECK(all_block, "CUDA emulator: ", where(b, name),
                ": deadlock, threads wait at different barriers (a divergent __syncthreads / __syncwarp)");
    for (Thread& t : b.th)
      if (t.st == St::kBlock) t.st = St::kRun;
  }
}

// the dynamic shared memory each kernel was opted in to (allow_smem: cudaFuncSetAttribute's
// MaxDynamicSharedMemorySize); a launch past 48 KB without it fails on a GPU
inline std::map<const void*, size_t>& smem_optins(std::unique_lock<std::mutex>& lock) {
  static std::mutex mu;
  static std::map<const void*, size_t> m;
  lock = std::unique_lock<std::mutex>(mu);
  return m;
}
template <typename K>
const void* kernel_key(K k) {
  return reinterpret_cast<const void*>(k);
}

// kernel<<<grid, block, smem>>>(args...) as SEQPE_LAUNCH(grid, block, smem, kernel)(args...)
template <typename K>
struct Launch {
  K kernel;
  dim3 grid, block;
  size_t smem;
  const char* name;
  template <typename... A>
  void operator()(A&&... args) const {
    const size_t nt = static_cast<size_t>(block.x) * block.y * block.z;
    TORCH_CHECK(nt >= 1 && nt <= 1024, "CUDA emulator: ", name, ": ", nt, " threads per block");
    TORCH_CHECK(smem <= 227 * 1024, "CUDA emulator: ", name, ": ", smem, " bytes of dynamic shared memory");
    // the launch limits a GPU enforces (it fails the launch; the emulator would run it)
    TORCH_CHECK(grid.x >= 1 && grid.x <= 0x7fffffffu && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 &&
                    grid.z <= 65535,
                "CUDA emulator: ", name, ": grid (", grid.x, ", ", grid.y, ", ", grid.z, ") outside a GPU's limits");
    TORCH_CHECK(block.z <= 64, "CUDA emulator: ", name, ": blockDim.z ", block.z, " > 64");
    if (smem > 48 * 1024) {
      std::unique_lock<std::mutex> lock;
      auto& m = smem_optins(lock);
      const auto it = m.find(kernel_key(kernel));
      TORCH_CHECK(it != m.end() && it->second >= smem, "CUDA emulator: ", name, ": ", smem,
                  " bytes of dynamic shared memory without allow_smem (cudaFuncSetAttribute) for at least that");
    }
    constexpr size_t kStack = 64 * 1024;
    std::unique_ptr<unsigned char[]> stacks(new unsigned char[nt * kStack]);  // uninitialised: no 16 MB memset
    // exactly smem bytes (operator new[]: 16-byte aligned), so that a sanitized build (SEQPE_KERNELS_SANITIZE)
    // reports a read or write past the launch's dynamic shared memory; none at all when the launch asks for none
    std::unique_ptr<unsigned char[]> dyn_store(smem > 0 ? new unsigned char[smem] : nullptr);
    const std::function<void()> body = [&] { kernel(args...); };
    Block b;
    b.grid = grid, b.block = block, b.body = &body;
    b.th.resize(nt);
    b.slot.resize(nt);
    b.dyn = dyn_store.get();
    for (size_t i = 0; i < nt; ++i)
      b.th[i].idx = dim3(static_cast<unsigned>(i % block.x), static_cast<unsigned>((i / block.x) % block.y),
                         static_cast<unsigned>(i / (static_cast<size_t>(block.x) * block.y)));
    Block* saved = blk();
    blk() = &b;
    const size_t nb = static_cast<size_t>(grid.x) * grid.y * grid.z;
    const bool rev = reverse_order();
    try {
      for (size_t k = 0; k < nb; ++k) {
        const size_t i = rev ? nb - 1 - k : k;
        b.bidx = dim3(static_cast<unsigned>(i % grid.x), static_cast<unsigned>((i / grid.x) % grid.y),
                      static_cast<unsigned>(i / (static_cast<size_t>(grid.x) * grid.y)));
        if (smem > 0) std::memset(b.dyn, 0xFF, smem);
        run_block(b, name, kStack, stacks.get(), rev);
      }
    } catch (...) {
      blk() = saved;
      throw;
    }
    blk() = saved;
  }
};

template <typename K>
Launch<K> launch(dim3 g, dim3 b, size_t smem, K k, const char* name) {
  return Launch<K>{k, g, b, smem, name};
}

template <typename T>
T shfl_xor(T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  Block& b = *blk();
  const int i = b.cur, src = (i & ~31) | ((i & 31) ^ lane_mask);
  std::memcpy(&b.slot[i], &v, sizeof(T));
  wait(St::kWarp);  // every lane has written its value
  T r;
  std::memcpy(&r, &b.slot[src < static_cast<int>(b.th.size()) ? src : i], sizeof(T));
  wait(St::kWarp);  // every lane has read before the next shuffle overwrites
  return r;
}

}  // namespace seqpe_emu

// ----------------------------------------------------------------------------- the CUDA vocabulary
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static thread_local
#define threadIdx (::seqpe_emu::me().idx)
#define blockIdx (::seqpe_emu::blk()->bidx)
#define blockDim (::seqpe_emu::blk()->block)
#define gridDim (::seqpe_emu::blk()->grid)

inline void __syncthreads() { seqpe_emu::wait(seqpe_emu::St::kBlock); }
inline void __syncwarp(unsigned = 0xffffffffu) { seqpe_emu::wait(seqpe_emu::St::kWarp); }
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  TORCH_CHECK(mask == 0xffffffffu, "CUDA emulator: only full-mask shuffles are emulated");
  return seqpe_emu::shfl_xor(v, lane_mask);
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline double __longlong_as_double(long long i) {
  double d;
  std::memcpy(&d, &i, 8);
  return d;
}

#define SEQPE_DYN_SHARED(type, name) type* name = reinterpret_cast<type*>(::seqpe_emu::blk()->dyn)
#define SEQPE_LAUNCH(grid, block, smem, ...) ::seqpe_emu::launch(grid, block, smem, __VA_ARGS__, #__VA_ARGS__)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

namespace seqpe {
namespace emu {
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
// a small SM count, so that the launchers' chunked grids (several chunks per slot) are exercised at test sizes;
// SEQPE_EMU_SMS overrides it
inline int64_t sm_count() {
  const char* s = std::getenv("SEQPE_EMU_SMS");
  return s ? std::atoll(s) : 2;
}
// an H100 / H200's opt-in dynamic shared memory per block; allow_smem records the opt-in the launch checks
inline size_t smem_optin() { return 227 * 1024; }
template <typename K>
void allow_smem(K kernel, size_t bytes) {
  TORCH_CHECK(bytes <= smem_optin(), "CUDA emulator: allow_smem(", bytes, ") past the opt-in limit");
  std::unique_lock<std::mutex> lock;
  ::seqpe_emu::smem_optins(lock)[::seqpe_emu::kernel_key(kernel)] = bytes;
}
}  // namespace emu
}  // namespace seqpe

// CUDA's integer min / max (device functions at global scope, mixed argument types allowed)
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return a < b ? a : b;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}
