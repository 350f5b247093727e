// The C++ encoder (encoder.cpp) with its CUDA paths on CPU tensors, over the emulated CUDA kernels: registered as
// torch.ops.seqpe_emu.encoder, the cuda backend's whole layer sequence tested end to end without a GPU
// (tests/test_cuda_emu.py). Built by seqpe_kernels._ext.emulator().
#define SEQPE_EMU 1
#include "../encoder.cpp"
