// Python module entry point of the ahead-of-time build (setup.py: seqpe_kernels._C). Importing the module
// loads this shared library, whose static initialisers register the seqpe_ext operators with PyTorch
// (TORCH_LIBRARY in ops_cpu.cpp, TORCH_LIBRARY_IMPL in ops_cuda.cu); seqpe_kernels._ext then uses
// torch.ops.seqpe_ext. The JIT build (torch.utils.cpp_extension.load) does not compile this file.
#include <Python.h>

static PyModuleDef seqpe_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                     "seqpe-kernels C++/CUDA operators (registered as torch.ops.seqpe_ext)", -1,
                                     nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&seqpe_c_module); }
