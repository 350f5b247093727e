"""Benchmark configurations: the paper's step sizes (SEQPE_SPEC §6), providers, modes, GEMM FLOP counts."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional, Union

import torch

MODES = ("forward", "backward", "full", "nograd")
QUICK_MODES = ("forward", "full", "nograd")
FUSED_PROVIDERS = ("triton", "cuda", "cpu")
GRAPH_PROVIDERS = ("triton-graph", "cuda-graph")   # the fused backends replayed as CUDA graphs (GraphedSeqPE)
ALGO_PROVIDERS = ("dedup", "prefix", "cache")
PROVIDERS = ("eager", "compile", "compile-cg") + FUSED_PROVIDERS + GRAPH_PROVIDERS + ALGO_PROVIDERS
CUDA_GRAPH_PROVIDERS = ("compile-cg",) + GRAPH_PROVIDERS
# every provider by default; the CUDA-graph ones are skipped with the reason off CUDA (run_bench(cuda_graphs=False)
# or an explicit provider list leaves them out)
DEFAULT_PROVIDERS = PROVIDERS
# why the CUDA-graph providers' backward row is derived (full - forward) instead of timed on its own
GRAPH_BACKWARD_NOTE = ("backward-only timing not applicable to CUDA-graph replay (a captured backward consumes the "
                       "activations of its own forward replay; repeating it without one reads overwritten memory): "
                       "derived as full - forward")
TRAIN_MODES = ("forward", "backward", "full")

CSV_COLUMNS = (
    "config", "provider", "mode", "status", "M", "T", "tokens", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb",
    "host_ms", "tflops", "floor_ratio", "speedup_vs_eager", "rel_err", "gemm_tflops", "ref_gflop", "floor_gflop",
    "warmup_s", "device", "torch_version", "triton_version", "cuda_version", "dtype", "git_commit", "date",
    "quick", "note")

QUICK_FWD_FLOPS = 3e9          # quick mode: M scaled so that one reference forward is about this many FLOPs
QUICK_CONFIGS = ("text-default", "vits-default")
SWEEP_M_CUDA = (128, 512, 2048, 8192, 32768)
SWEEP_M_CPU = (16, 64, 256)
SWEEP_M_CPU_QUICK = (8, 32)


# ------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class BenchConfig:
    """One benchmark size. ``workload`` picks the position generator; ``M`` the number of sequences.

    ``M_full`` is the size of one realistic step of the workload (SEQPE_SPEC §6); a different ``M`` keeps the
    mix of components (main windows / pivots / candidates / transfer) in proportion.
    """
    name: str
    workload: str            # text-default | text-shifted | vit-default | vit-shifted | uniform
    M: int
    embed_dim: int
    num_heads: int
    max_digits: int
    data_dim: int = 1
    out_dim: Optional[int] = None
    num_layers: int = 2
    attn_direction: str = "causal"
    resid_pdrop: float = 0.1
    cuda_autocast: Optional[str] = None   # "bf16" / "fp16": autocast dtype on CUDA (CPU always runs fp32)
    max_position: Optional[int] = None    # per-axis exclusive bound of the positions (default base**K)
    init: str = "text"
    tf32: bool = False                    # fp32 GEMMs in TF32 on CUDA (the documented opt-in; CUDA only)

    def __post_init__(self):
        if self.tf32 and self.cuda_autocast:
            raise ValueError(f"bench config {self.name!r}: tf32 applies to fp32 GEMMs, not under "
                             f"{self.cuda_autocast} autocast")

    @property
    def T(self) -> int:
        return self.data_dim * self.max_digits + 1

    @property
    def O(self) -> int:
        return self.out_dim if self.out_dim else self.embed_dim

    @property
    def tokens(self) -> int:
        return self.M * self.T

    @property
    def pos_bound(self) -> int:
        return min(self.max_position or 10 ** self.max_digits, 10 ** self.max_digits)

    def with_M(self, M: int) -> "BenchConfig":
        return replace(self, M=int(M))

    def module_kwargs(self) -> dict:
        return dict(embed_dim=self.embed_dim, num_heads=self.num_heads, max_digits=self.max_digits,
                    num_layers=self.num_layers, data_dim=self.data_dim, out_dim=self.out_dim,
                    attn_direction=self.attn_direction, resid_pdrop=self.resid_pdrop, attn_pdrop=0.0,
                    init=self.init)

    def dtype_label(self, device: torch.device) -> str:
        if device.type == "cuda" and self.cuda_autocast:
            return f"{self.cuda_autocast}-autocast"
        return "fp32-tf32" if self.tf32 else "fp32"

    def autocast_dtype(self, device: torch.device) -> Optional[torch.dtype]:
        if device.type == "cuda" and self.cuda_autocast:
            return {"bf16": torch.bfloat16, "fp16": torch.float16}[self.cuda_autocast]
        return None


_TEXT = dict(embed_dim=768, num_heads=12, max_digits=5, data_dim=1, out_dim=768, cuda_autocast="bf16",
             max_position=20000, init="text", resid_pdrop=0.1)
# ViT-S and ViT-B share the encoder (D=384, 6 heads); ViT-B projects to 768 and its script uses
# resid_pdrop 0.3 (SEQPE_SPEC §2.1) -- the rate does not change the cost.
_VIT = dict(embed_dim=384, num_heads=6, max_digits=2, data_dim=2, out_dim=384, cuda_autocast=None,
            max_position=100, init="image", resid_pdrop=0.1)

CONFIGS: Dict[str, BenchConfig] = {
    "text-default": BenchConfig("text-default", "text-default", 1552, **_TEXT),
    "text-shifted": BenchConfig("text-shifted", "text-shifted", 8720, **_TEXT),
    "vits-default": BenchConfig("vits-default", "vit-default", 4324, **_VIT),
    "vits-shifted": BenchConfig("vits-shifted", "vit-shifted", 8352, **_VIT),
    # the ViT-S step with cuBLAS GEMMs in TF32: the opt-in for users who accept TF32 numerics (attention and the
    # fused elementwise kernels stay fp32); its rows carry their error against the IEEE-fp32 reference
    "vits-default-tf32": BenchConfig("vits-default-tf32", "vit-default", 4324, **_VIT, tf32=True),
    "vitb-default": BenchConfig("vitb-default", "vit-default", 4324, **{**_VIT, "out_dim": 768, "resid_pdrop": 0.3}),
    "vitb-shifted": BenchConfig("vitb-shifted", "vit-shifted", 8352, **{**_VIT, "out_dim": 768, "resid_pdrop": 0.3}),
}


def get_config(name_or_cfg: Union[str, BenchConfig, dict]) -> BenchConfig:
    if isinstance(name_or_cfg, BenchConfig):
        return name_or_cfg
    if isinstance(name_or_cfg, dict):
        d = dict(name_or_cfg)
        d.setdefault("workload", "uniform")
        return BenchConfig(**d)
    if name_or_cfg not in CONFIGS:
        raise ValueError(f"unknown bench config {name_or_cfg!r}; choose from {', '.join(CONFIGS)} or 'all'")
    return CONFIGS[name_or_cfg]


# ------------------------------------------------------------------------------------------- FLOPs
def ref_fwd_flops(cfg: BenchConfig, M: Optional[int] = None) -> float:
    """GEMM FLOPs of the reference forward: 24·D²·tokens per layer + out_proj 2·D·O·M."""
    M = cfg.M if M is None else M
    D = cfg.embed_dim
    return cfg.num_layers * 24.0 * D * D * M * cfg.T + 2.0 * D * cfg.O * M


def floor_fwd_flops(cfg: BenchConfig, M: Optional[int] = None) -> float:
    """Minimal exact GEMM FLOPs: the last block computes only K/V (4·D²) for non-CLS rows (SEQPE_SPEC §2.8)."""
    M = cfg.M if M is None else M
    D, T = cfg.embed_dim, cfg.T
    full = (cfg.num_layers - 1) * 24.0 * D * D * M * T
    last = 4.0 * D * D * M * (T - 1) + 24.0 * D * D * M   # non-CLS rows: K and V; CLS row: everything
    return full + last + 2.0 * D * cfg.O * M


MODE_FLOP_FACTOR = {"forward": 1.0, "nograd": 1.0, "backward": 2.0, "full": 3.0}


def quick_M(cfg: BenchConfig) -> int:
    """M for quick mode: the forward is scaled to about QUICK_FWD_FLOPS (at most the real M)."""
    per_seq = ref_fwd_flops(cfg, 1)
    return int(max(8, min(cfg.M, round(QUICK_FWD_FLOPS / per_seq))))
