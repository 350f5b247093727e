"""fp32_matmul: sets fp32 / TF32 GEMMs under either PyTorch precision API and restores the caller's state through
the API it was set with (a legacy read after a new-API set raises in PyTorch >= 2.9)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import HAS_CUDA

# each scenario runs in a fresh interpreter: the "mixed API" state cannot be undone within a process
SETUPS = {
    "default": "",
    "legacy allow_tf32": "torch.backends.cuda.matmul.allow_tf32 = True",
    "legacy precision high": "torch.set_float32_matmul_precision('high')",
    "legacy precision medium": "torch.set_float32_matmul_precision('medium')",
    "new api tf32": "torch.backends.cuda.matmul.fp32_precision = 'tf32'",
    "new api ieee + cpu tf32": ("torch.backends.cuda.matmul.fp32_precision = 'ieee'\n"
                                "torch.backends.mkldnn.matmul.fp32_precision = 'tf32'"),
}

PROBE = textwrap.dedent('''
    import warnings; warnings.simplefilter("error")
    import torch
    from seqpe_kernels.precision import fp32_matmul, tf32_enabled
    {setup}
    new = hasattr(torch.backends.cuda.matmul, "fp32_precision")
    def state():
        s = [tf32_enabled()]
        if new:
            s += [torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision]
        try:
            s += [torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()]
        except RuntimeError:
            s += ["legacy refuses"]
        return s
    before = state()
    for tf32 in (False, True, False):
        with fp32_matmul(tf32):
            assert tf32_enabled() is tf32, (tf32, state())
            if new:
                assert torch.backends.cuda.matmul.fp32_precision == ("tf32" if tf32 else "ieee"), state()
                assert torch.backends.mkldnn.matmul.fp32_precision in ("ieee", "none"), state()
        assert state() == before, (tf32, before, state())
    try:
        with fp32_matmul(True):
            raise KeyError("inside")
    except KeyError:
        pass
    assert state() == before, (before, state())
    print("ok", before)
''')


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_fp32_matmul_sets_and_restores_under_either_api(name):
    if "new api" in name and not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has no per-backend fp32_precision API")
    code = PROBE.format(setup=SETUPS[name])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr


def test_patch_probe_under_the_new_precision_api():
    """seqpe_kernels.patch's first-call probe used to read allow_tf32 with the legacy getter: after a script set
    the per-backend API (as PyTorch's docs now advise) that read raised "mix of the legacy and new APIs"."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has no per-backend fp32_precision API")
    code = textwrap.dedent('''
        import torch, seqpe_kernels as sk
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.manual_seed(0)
        m = sk.SeqPE(embed_dim=16, num_heads=2, max_digits=3, num_layers=1).eval()
        x = torch.tensor([0, 5, 123, 999])
        want = m(x)
        sk.patch(m, backend="triton")  # the verify probe runs at the first patched call
        got = m(x)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        print("ok")
    ''')
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "0" if HAS_CUDA else "1"))
    if HAS_CUDA:
        code = code.replace("x = torch.tensor([0, 5, 123, 999])", "m.cuda(); x = torch.tensor([0, 5, 123, 999]).cuda()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
