"""Test setup: without a GPU, Triton kernels run under the interpreter, which must be switched on
before triton is first imported."""
import os

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = _has_cuda

# The test shapes are tiny: on a loaded 2-core CI machine, intra-op threading makes such ops many times
# slower (measured ~50-100x on tiny CPU ops), so the suite runs single-threaded unless told otherwise.
if not HAS_CUDA and "SEQPE_TEST_THREADS" not in os.environ:
    torch.set_num_threads(1)
elif "SEQPE_TEST_THREADS" in os.environ:
    torch.set_num_threads(int(os.environ["SEQPE_TEST_THREADS"]))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine); runs in GPU CI / seqpe-kernels check")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    return f"seqpe-kernels tests: CUDA={'yes' if HAS_CUDA else 'no'}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
