"""Quick GPU timing of the encoder step: eager vs torch.compile vs Triton (fwd+bwd), text and ViT-S default.

    python benchmarks/gpu_smoke.py            # prints a table; full figures come from `seqpe-kernels bench`
"""
import time

import torch
import triton.testing

import seqpe_kernels as sk

torch.backends.cuda.matmul.allow_tf32 = False


def positions(cfg, M, g):
    K, d = cfg["max_digits"], cfg.get("data_dim", 1)
    hi = 10 ** K
    return torch.randint(0, hi, (M, d) if d > 1 else (M,), generator=g).cuda()


CFGS = {
    "text-default": (dict(embed_dim=768, num_heads=12, max_digits=5, out_dim=768), 1552, torch.bfloat16),
    "vits-default": (dict(embed_dim=384, num_heads=6, max_digits=2, data_dim=2, out_dim=384), 4324, None),
}


def main():
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, (cfg, M, amp) in CFGS.items():
        ref = sk.SeqPE(**cfg, resid_pdrop=0.1).cuda().train()
        fus = sk.FusedSeqPE.from_reference(ref, backend="triton")
        comp = torch.compile(ref)
        pos = positions(cfg, M, g)
        for prov, mod in (("eager", ref), ("compile", comp), ("triton", fus)):
            def step():
                with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
                    y = mod(pos)
                y.float().sum().backward()
            t0 = time.time()
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            warm = time.time() - t0
            torch.cuda.reset_peak_memory_stats()
            ms = triton.testing.do_bench(step, warmup=50, rep=300, quantiles=[0.5, 0.2, 0.8])
            mem = torch.cuda.max_memory_allocated() / 2 ** 20
            rows.append((name, prov, *ms, mem, warm))
    base = {r[0]: r[2] for r in rows if r[1] == "eager"}
    print(f"{'config':14s} {'provider':8s} {'median':>8s} {'p20':>8s} {'p80':>8s} {'peakMB':>8s} {'x eager':>8s}")
    for r in rows:
        print(f"{r[0]:14s} {r[1]:8s} {r[2]:8.3f} {r[3]:8.3f} {r[4]:8.3f} {r[5]:8.0f} {base[r[0]] / r[2]:8.2f}")


if __name__ == "__main__":
    main()
