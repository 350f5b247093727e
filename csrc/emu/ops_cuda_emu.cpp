// ops_cuda.cu's kernels and launchers compiled as C++ and run by the CPU emulator (cuda_emu.h), registered as
// torch.ops.seqpe_emu.<op> on CPU tensors: what tests/test_cuda_emu.py holds to the reference on machines
// without a GPU. Built by seqpe_kernels._ext.emulator(); not part of the package's extension.
#define SEQPE_EMU 1
#include "../ops_cuda.cu"
