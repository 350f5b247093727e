"""The configuration of a ``seqpe-kernels train`` run (:class:`TrainConfig`), the task defaults, and how flags left
unset are resolved (task defaults; SeqPE's regularisers off for the baselines)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

TASK_DEFAULTS: Dict[str, dict] = {
    # CPU-sized defaults: a tiny model trains in seconds to minutes on a laptop core
    # (paper PE methods: text attn_scalar + 'single' Q/K projection, image attn_mul + 'multi'). The ViT needs
    # the lower lr: at 3e-3 the main loss collapses the encoder to a position-independent output early on.
    # It also needs the encoder 10x slower than the model (pe_lr, the image pipeline's separate encoder group):
    # with the encoder at the model's 1e-3, AdamW flattens SeqPE's output over the training grid within ~20 steps
    # (spread across the 16 positions / common part: 0.15 at init -> 0.03), the model sits on the
    # position-blind plateau (loss ln 4) for a seed-dependent 200 to 1000+ steps, and after 600 steps 1 seed in 8
    # reached accuracy 1.0 (16 seeds at 1500 steps: 12). With pe_lr 1e-4 the spread stays at 0.1-0.6, every seed
    # leaves the plateau by step ~500 and 15 of 16 reach 1.0 by step 1000 (issue 15; the baselines, on the
    # model's lr, learn the task in 100-300 steps). Task defaults apply to --pe seqpe; the baselines train
    # their position encoding (the learned table) at --lr.
    "lm": dict(steps=200, batch_size=8, lr=3e-3, model_dim=64, model_layers=2, model_heads=4, pe_dim=32,
               pe_heads=2, pe_layers=2, pe_method="attn_scalar", pe_qk="single", block_size=64,
               max_position=2048, contrastive_size=16, contrastive_batch=8, transfer_size=16, transfer_batch=4,
               eval_scales=(1.0, 2.0, 4.0, 8.0)),
    "vit": dict(steps=1000, batch_size=32, lr=1e-3, pe_lr=1e-4, model_dim=64, model_layers=2, model_heads=4,
                pe_dim=32, pe_heads=2, pe_layers=2, pe_method="attn_mul", pe_qk="multi", img_size=16, patch_size=4,
                max_position=1024, contrastive_size=16, contrastive_batch=8, transfer_size=8, transfer_batch=4,
                eval_scales=(1.0, 1.5, 2.0, 3.0)),
}


# flags that only a SeqPE run reads (refused with a baseline when given on the command line)
_SEQPE_ONLY = ("backend", "pe_dim", "pe_heads", "pe_layers", "pe_temperature", "pe_warmup_steps", "transfer_beta",
               "contrastive_size", "contrastive_batch", "transfer_size", "transfer_batch", "shift_pool",
               "pe_main_batch_size")
_SEQPE_DEFAULTS = dict(contrastive_weight=0.1, transfer_weight=0.1, shift_rate=0.1)  # the paper scripts
_BASELINE_METHODS = {"learned": "input_add", "sinusoidal": "input_add", "rope": "rotary", "alibi": "alibi",
                     "none": "nope"}  # how the model applies each baseline (seqpe_kernels.training.baselines)


@dataclass
class TrainConfig:
    """Everything a run needs. ``None`` fields take the task's default (:data:`TASK_DEFAULTS`)."""
    task: str = "lm"  # 'lm' | 'vit'
    pe: str = "seqpe"  # 'seqpe' or a baseline of seqpe_kernels.training.baselines (learned, sinusoidal, rope, alibi, none)
    steps: Optional[int] = None
    backend: str = "auto"  # FusedSeqPE backend: auto | torch | triton | cuda | cpu
    dropout: float = 0.1  # encoder resid dropout and model dropout
    seed: int = 0
    contrastive_weight: Optional[float] = None  # lambda_ct: 0.1 for seqpe, 0 (off) for the baselines
    transfer_weight: Optional[float] = None  # lambda_tr: 0.1 for seqpe, 0 (off) for the baselines
    transfer_beta: float = 1.0  # both paper scripts
    pe_warmup_steps: int = 0  # PeWeightScheduler warm-up (0: full weights from the start)
    device: Optional[str] = None
    batch_size: Optional[int] = None  # global batch (split across ranks)
    lr: Optional[float] = None
    pe_lr: Optional[float] = None  # encoder learning rate (default: lr)
    weight_decay: float = 0.01
    clip: float = 5.0  # max-norm, applied to the encoder and to the model separately
    data: Optional[str] = None
    # model / encoder sizes
    model_dim: Optional[int] = None
    model_layers: Optional[int] = None
    model_heads: Optional[int] = None
    pe_dim: Optional[int] = None  # encoder embed_dim D (its output width O is set by the model)
    pe_heads: Optional[int] = None
    pe_layers: Optional[int] = None
    pe_temperature: float = 1.0  # encoder output is out_proj(...) / temperature (SEQPE_SPEC §2.3)
    pe_method: Optional[str] = None  # how the model applies the PE (seqpe_kernels.training.pe_apply)
    pe_qk: Optional[str] = None  # 'none' | 'single' | 'multi' Q/K projection of the PE (attn_* methods)
    block_size: Optional[int] = None  # LM training length N
    img_size: Optional[int] = None  # ViT training resolution
    patch_size: Optional[int] = None
    max_position: Optional[int] = None  # pe_max_position (1-D: positions < it; 2-D: grid floor(sqrt) per axis)
    # regulariser batches (per position stream, like the reference's per-GPU sizes)
    contrastive_size: Optional[int] = None  # C
    contrastive_batch: Optional[int] = None  # B_c
    transfer_size: Optional[int] = None  # T_n
    transfer_batch: Optional[int] = None  # B_t
    shift_rate: Optional[float] = None  # pe_random_shift_rate: 0.1 for seqpe, 0 (off) for the baselines
    shift_pool: int = 320  # pe_random_shift_downsample
    pe_main_batch_size: int = -1  # P when a shift fires (-1: the stream's batch size)
    # evaluation
    eval_scales: Optional[Sequence[float]] = None
    eval_tokens: int = 8192  # LM: held-out tokens per length (at most)
    eval_samples: int = 512  # ViT: images per grid (synthetic; a folder uses its held-out split)
    do_eval: bool = True
    position_streams: Optional[int] = None  # default: the world size
    progress: bool = True
    cuda_graphs: Optional[bool] = None  # encoder step as CUDA graphs (GraphedSeqPE); None: on where it applies
    resume: Optional[str] = None  # a `train --save` file: continue that run for `steps` more steps
    # the fields set on the command line (config_from_args); with --resume every other field takes the saved
    # run's value. None (a TrainConfig built in code): the fields left at None are the ones not given
    given: Optional[Tuple[str, ...]] = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d.get("eval_scales") is not None:
            d["eval_scales"] = list(d["eval_scales"])
        return d


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """A copy with every ``None`` replaced by the task default, validated."""
    from .baselines import PE_CHOICES, VIT_PE_CHOICES

    if cfg.task not in TASK_DEFAULTS:
        raise ValueError(f"--task must be one of {', '.join(TASK_DEFAULTS)}, got {cfg.task!r}")
    choices = PE_CHOICES if cfg.task == "lm" else VIT_PE_CHOICES
    if cfg.pe not in choices:
        raise ValueError(f"--pe {cfg.pe}: not available for --task {cfg.task} (choose from {', '.join(choices)})")
    d = cfg.to_dict()
    if cfg.pe != "seqpe":  # a baseline: no SeqPE regularisers, no random shift, its own way of applying the PE
        for k, flag in (("contrastive_weight", "--contrastive-weight"), ("transfer_weight", "--transfer-weight"),
                        ("shift_rate", "--shift-rate")):
            if d.get(k):
                raise ValueError(f"{flag} applies to --pe seqpe only (the baselines train without SeqPE's "
                                 f"regularisers and random shift); got {flag} {d[k]:g} with --pe {cfg.pe}")
            d[k] = 0.0
        if cfg.pe_method is not None or cfg.pe_qk is not None:
            raise ValueError(f"--pe-method / --pe-qk choose how the model applies SeqPE; --pe {cfg.pe} applies "
                             "itself its own way")
        if cfg.pe_lr is not None:
            raise ValueError(f"--pe-lr is the SeqPE encoder's learning rate; --pe {cfg.pe} trains at --lr")
        seqpe_only = [k for k in _SEQPE_ONLY if k in (cfg.given or ())]
        if seqpe_only:  # (on the command line: accepted and ignored before)
            raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in seqpe_only)} set(s) the SeqPE encoder "
                             f"or its regularisers; --pe {cfg.pe} has neither")
        d["pe_method"], d["pe_qk"] = _BASELINE_METHODS[cfg.pe], "none"
    for k, v in _SEQPE_DEFAULTS.items():
        if d.get(k) is None:
            d[k] = v
    for k, v in TASK_DEFAULTS[cfg.task].items():
        if d.get(k) is None and not (k == "pe_lr" and cfg.pe != "seqpe"):
            d[k] = list(v) if isinstance(v, tuple) else v
    out = TrainConfig(**d)
    if cfg.transfer_size is None:  # the default T_n never exceeds the window (T_n slots are drawn from N)
        n = out.block_size if out.task == "lm" else (out.img_size // out.patch_size) ** 2
        out.transfer_size = min(out.transfer_size, n)
    if out.steps < 1:
        raise ValueError("--steps must be >= 1")
    if not 0.0 <= out.dropout < 1.0:
        raise ValueError("--dropout must be in [0, 1)")
    if out.contrastive_weight < 0 or out.transfer_weight < 0:
        raise ValueError("regulariser weights must be >= 0")
    if out.model_dim % out.model_heads:
        raise ValueError("--model-heads must divide --model-dim")
    if out.pe_dim % out.pe_heads:
        raise ValueError("--pe-heads must divide --pe-dim")
    if out.task == "vit" and out.img_size % out.patch_size:
        raise ValueError("--patch-size must divide --img-size")
    return out


