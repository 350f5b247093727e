"""Sweep num_warps of the Triton tiny-attention kernels at the paper shapes (CUDA; event timing, medians).

    python benchmarks/tune_attention.py
Prints forward and backward times per setting for the full block (all T query rows) and the CLS-only block.
"""
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from seqpe_kernels.ops import attention as A  # noqa: E402

SHAPES = {  # name: (M, T, D, H, dtype)
    "text-default": (1552, 6, 768, 12, torch.bfloat16),
    "vits-default": (4324, 5, 384, 6, torch.float32),
}


def main():
    torch.manual_seed(0)
    print(f"{'shape':14s} {'block':5s} {'warps':>5s} {'fwd us':>8s} {'bwd us':>8s}")
    for name, (M, T, D, H, dt) in SHAPES.items():
        qkv = torch.randn(M, T, 3 * D, device="cuda", dtype=dt)
        q_cls = torch.randn(M, 1, D, device="cuda", dtype=dt)
        kv = torch.randn(M, T, 2 * D, device="cuda", dtype=dt)
        sdiv = (D // H) ** 0.5
        for block, args in (("full", (qkv, None, None, H, True, 0, sdiv, 0.0, None, 0)),
                            ("cls", (q_cls, kv, None, H, True, T - 1, sdiv, 0.0, None, 0))):
            ref = None
            for w in (None, 1, 2, 4, 8):
                A.NUM_WARPS_OVERRIDE = w
                out = A.tiny_attention_forward(*args)
                dout = torch.randn_like(out)
                grads = A.tiny_attention_backward(dout, *args)
                if ref is None:
                    ref = (out, grads)
                else:  # every setting must compute the same thing
                    assert torch.allclose(out.float(), ref[0].float(), atol=1e-2, rtol=1e-2)
                tf = triton.testing.do_bench(lambda: A.tiny_attention_forward(*args), return_mode="median") * 1e3
                tb = triton.testing.do_bench(lambda: A.tiny_attention_backward(dout, *args),
                                             return_mode="median") * 1e3
                print(f"{name:14s} {block:5s} {str(w or 'rule'):>5s} {tf:8.1f} {tb:8.1f}")
    A.NUM_WARPS_OVERRIDE = None


if __name__ == "__main__":
    main()
