/* A stand-in libcuda.so.1 for running Triton's real C launcher on a machine without a GPU: the driver calls the
   launcher makes succeed, and cuLaunchKernelEx records what would reach the GPU (launch config, attributes and
   the bytes of every kernel parameter) instead of launching. Sizes of the parameters are set by the caller
   (fake_set_param_sizes) from Triton's own signature. */
#include "cuda.h"
#include <string.h>

#define MAXP 256
#define MAXA 8
static int n_sizes = -1;
static size_t sizes[MAXP];

typedef struct {
  unsigned int grid[3], block[3], shared;
  unsigned long long stream, function;
  unsigned int n_attrs;
  int attr_id[MAXA];
  unsigned char attr_val[MAXA][16];
  int n_params;
  unsigned char params[MAXP][8];
  unsigned long long n_launches;
} Record;
static Record rec;

void fake_set_param_sizes(int n, const long long *s) {
  n_sizes = n;
  for (int i = 0; i < n && i < MAXP; ++i) sizes[i] = (size_t)s[i];
}
const Record *fake_last_launch(void) { return &rec; }
int fake_record_size(void) { return (int)sizeof(Record); }

CUresult CUDAAPI cuLaunchKernelEx(const CUlaunchConfig *c, CUfunction f, void **params, void **extra) {
  unsigned long long n = rec.n_launches + 1;
  memset(&rec, 0, sizeof rec);
  rec.n_launches = n;
  rec.grid[0] = c->gridDimX; rec.grid[1] = c->gridDimY; rec.grid[2] = c->gridDimZ;
  rec.block[0] = c->blockDimX; rec.block[1] = c->blockDimY; rec.block[2] = c->blockDimZ;
  rec.shared = c->sharedMemBytes;
  rec.stream = (unsigned long long)(uintptr_t)c->hStream;
  rec.function = (unsigned long long)(uintptr_t)f;
  rec.n_attrs = c->numAttrs;
  for (unsigned i = 0; i < c->numAttrs && i < MAXA; ++i) {
    rec.attr_id[i] = (int)c->attrs[i].id;
    memcpy(rec.attr_val[i], &c->attrs[i].value, 16);
  }
  rec.n_params = n_sizes;
  for (int i = 0; i < n_sizes && i < MAXP; ++i) memcpy(rec.params[i], params[i], sizes[i] > 8 ? 8 : sizes[i]);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuPointerGetAttribute(void *data, CUpointer_attribute a, CUdeviceptr p) {
  *(CUdeviceptr *)data = p;  /* unified addressing: a device pointer is its own address */
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuCtxGetCurrent(CUcontext *pctx) { *pctx = (CUcontext)0x1; return CUDA_SUCCESS; }
CUresult CUDAAPI cuGetErrorString(CUresult e, const char **s) { *s = "fake libcuda error"; return CUDA_SUCCESS; }
