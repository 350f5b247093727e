"""``seqpe-kernels train``: train a tiny SeqPE language model or ViT end to end (SEQPE_SPEC §4, §5.5-§5.8).

One training step (§5.8):

1. draw the main-task window(s) (default window, or P shifted windows with probability ``--shift-rate``);
2. draw a contrastive batch and, if this step's P == 1, a transfer batch;
3. merge all positions and run the position encoder **once** (train mode, dropout on);
4. split its output into main PE [P, N, O], pivots, candidates and transfer PEs;
5. run the model with the main PE (sample b uses window b mod P) and compute the main loss;
6. total = main + λ_ct·L_ct + λ_tr·L_tr (transfer only when P == 1), weights through PeWeightScheduler;
7. backward, clip the encoder and the model separately (max-norm ``--clip``, 5.0), one AdamW step for both.

After training the extrapolation is evaluated with the encoder in eval mode, run once per length: LM
perplexity on held-out text at 1x, 2x, 4x, 8x the training length (positions 0..L-1), ViT accuracy on
larger patch grids (positions (0,0)..(g-1,g-1)). A table is printed and a PNG drawn.

Data: the LM trains on bytes (vocab 256) of ``--data`` (a UTF-8 text file) or of the embedded synthetic
corpus ``seqpe_kernels/training/data/chronicle.txt``; the ViT on an image folder (one subfolder per class, read with
Pillow) or on the built-in synthetic task (:func:`synthetic_images`: colour pair x which side of a boundary
the first colour is on; the side needs position information).

Scale-out: under ``torchrun --nproc_per_node N`` the encoder and the model are each wrapped in
DistributedDataParallel (gloo on CPU, NCCL on CUDA); the global ``--batch-size`` is split across ranks and
every rank draws its own positions from samplers seeded with ``seed + rank``, as the reference does. Each
rank's stream of positions is a *position stream*; ``--position-streams K`` lets one process own several
streams (its loss is then the mean over its streams, exactly what K DDP ranks average), so a 1-process run
with ``--position-streams 2`` reproduces a 2-rank run step for step with dropout off (used by the tests).
With dropout on it draws the same positions but not the same dropout pattern: the K streams share one
encoder call, in which a window that K ranks would encode once each (or once per rank, tiled over its samples)
gets its own dropout draw per copy in the call. Only rank 0 prints and writes files.

Baselines: ``--pe {learned,sinusoidal,rope,alibi,none}`` trains the same model with a baseline position
encoding of :mod:`seqpe_kernels.training.baselines` in place of SeqPE (the ViT: their 2-D forms; no ALiBi). The SeqPE
regularisers (contrastive, transfer) and the random window shift are off for them, so a baseline trains on the
positions 0..N-1 only, as a standard GPT-2 / ViT does; ``seqpe-kernels study`` compares them all.

Use ``python -m seqpe_kernels.training.train ...`` or ``seqpe-kernels train ...``; programmatically
:func:`train` with a :class:`TrainConfig`.

``--save PATH`` writes the run (:func:`save_run`: the encoder with its configuration, which
:func:`seqpe_kernels.load_checkpoint` reads, the model, AdamW, sampler and RNG states); ``--resume PATH``
continues it for ``--steps`` more steps, exactly as an uninterrupted run would.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TrainConfig", "train", "add_arguments", "run", "main", "synthetic_images", "resolve_config", "save_run",
           "TASK_DEFAULTS"]

from .config import _BASELINE_METHODS, _SEQPE_DEFAULTS, TASK_DEFAULTS, TrainConfig, resolve_config  # noqa: F401
from .datasets import (_PAIRS, SYNTHETIC_CLASSES, ImageFolderData, MissingDependency, TextData,  # noqa: F401
                       synthetic_images)
from .evaluate import evaluate, format_eval, plot, write_json  # noqa: F401
from .resume import (_apply_given_lrs, _check_resume_config, _read_resume, _restore, _resume_config,  # noqa: F401
                     _train_state, save_run)

# ---------------------------------------------------------------------------------------------------- streams
class _PositionStream:
    """One stream of positions (one reference GPU): main / contrastive / transfer samplers, seed + index."""

    def __init__(self, cfg: TrainConfig, index: int, stream_batch: int):
        from .contrastive import ContrastiveSampler
        from .samplers import MainWindowSampler, TransferSampler, resolve_main_batch_size

        main_seed, ct_seed, tr_seed = np.random.SeedSequence(cfg.seed + index).spawn(3)
        if cfg.task == "lm":
            shape, dd, pipeline = cfg.block_size, 1, "text"
        else:
            g = cfg.img_size // cfg.patch_size
            shape, dd, pipeline = (g, g), 2, "image"
        self.num_windows = resolve_main_batch_size(stream_batch, cfg.pe_main_batch_size)
        self.main = MainWindowSampler(shape, cfg.max_position, data_dim=dd, use_random_shift=cfg.shift_rate > 0,
                                      shift_rate=cfg.shift_rate, shift_pool_size=cfg.shift_pool, seed=main_seed)
        if self.main.use_random_shift and self.num_windows > self.main.pool_len:
            # (the sampler raises this only when a shifted step is first drawn: possibly hundreds of steps in)
            raise ValueError(f"a shifted step draws {self.num_windows} windows (one per sample of this stream's "
                             f"batch, or --pe-main-batch-size) but the shift pool holds {self.main.pool_len} "
                             f"(--shift-pool {cfg.shift_pool}; the windows that fit below --max-position "
                             f"{cfg.max_position}): raise them, or lower the batch")
        self.contrastive = None
        if cfg.contrastive_weight > 0:
            self.contrastive = ContrastiveSampler(cfg.max_position, cfg.contrastive_size, cfg.contrastive_batch,
                                                  data_dim=dd, pipeline=pipeline, seed=ct_seed)
        self.transfer = None
        if cfg.transfer_weight > 0:
            self.transfer = TransferSampler(shape, cfg.max_position, cfg.transfer_size, cfg.transfer_batch,
                                            data_dim=dd, pipeline=pipeline, seed=tr_seed)


def _combine_main(mains, stream_batch: int):
    """Main positions of this process's streams -> (positions, P, teacher window index per stream).

    One stream: its windows as drawn. Several streams with the same default window: that window once
    (P = 1). Otherwise one window per sample (P = local batch): sample ``r*stream_batch + b`` gets stream r's
    window ``b mod P_r``, which is what rank r computes.
    """
    if len(mains) == 1:
        return mains[0].positions, mains[0].num_windows, [0]
    first = mains[0]
    if all(m.num_windows == 1 and torch.equal(m.positions, first.positions) for m in mains):
        return first.positions, 1, [0] * len(mains)
    wins, teacher = [], []
    for m in mains:
        pos = m.positions.view(m.num_windows, m.window_len, *m.positions.shape[1:])
        teacher.append(len(wins))
        wins.extend(pos[b % m.num_windows] for b in range(stream_batch))
    return torch.cat(wins), len(wins), teacher


# ---------------------------------------------------------------------------------------------------- models
def _build(cfg: TrainConfig, device: torch.device, num_classes: int):
    from ..fused import FusedSeqPE
    from .models import GPTConfig, SeqPEGPT, SeqPEViT, ViTConfig
    from ..reference.tokenize import max_digits_for

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    p = cfg.dropout
    multi_head = cfg.pe != "rope"  # RoPE: one d_h table shared by all heads
    if cfg.task == "lm":
        mcfg = GPTConfig(vocab_size=256, block_size=cfg.block_size, n_embd=cfg.model_dim, n_layer=cfg.model_layers,
                         n_head=cfg.model_heads, embd_pdrop=p, resid_pdrop=p, attn_pdrop=p,
                         pe_method=cfg.pe_method, pe_qk=cfg.pe_qk, pe_multi_head=multi_head)
        dd, init = 1, "text"
    else:
        mcfg = ViTConfig(img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=num_classes,
                         embed_dim=cfg.model_dim, depth=cfg.model_layers, num_heads=cfg.model_heads, drop_rate=p,
                         attn_drop_rate=p, pe_method=cfg.pe_method, pe_qk=cfg.pe_qk, pe_multi_head=multi_head,
                         cls_pe="identity" if cfg.pe == "rope" else "learned")
        dd, init = 2, "image"
    if cfg.pe != "seqpe":
        from .baselines import build_position_module

        enc = build_position_module(cfg.pe, dd, cfg.model_dim, cfg.model_heads, cfg.max_position)
        model = SeqPEGPT(mcfg, enc) if cfg.task == "lm" else SeqPEViT(mcfg, enc)
        model.pe_encoder = None
        return enc.to(device), model.to(device), mcfg
    enc = FusedSeqPE(embed_dim=cfg.pe_dim, num_heads=cfg.pe_heads,
                     max_digits=max_digits_for(cfg.max_position, dd), num_layers=cfg.pe_layers, data_dim=dd,
                     out_dim=mcfg.pe_dim, resid_pdrop=p, init=init, temperature=cfg.pe_temperature,
                     backend=cfg.backend)
    if mcfg.pe_dim % cfg.pe_heads:
        raise ValueError(f"the transfer loss splits the PE (width {mcfg.pe_dim}) into --pe-heads={cfg.pe_heads} "
                         "chunks; choose a divisor")
    model = SeqPEGPT(mcfg, enc) if cfg.task == "lm" else SeqPEViT(mcfg, enc)
    # the encoder stays a separate module: its own DDP wrapper and its own gradient clipping; the model only
    # ever receives the PE from the merged encoder call (training) or from encode-once (evaluation)
    model.pe_encoder = None
    return enc.to(device), model.to(device), mcfg


def _param_groups(enc: nn.Module, model: nn.Module, cfg: TrainConfig):
    """AdamW groups: encoder and model, each split into decayed and undecayed parameters. Model: matrices are
    decayed, the rest (biases, norms, embeddings, CLS tokens) not. Encoder: as its reference pipeline does
    (SEQPE_SPEC §8.2 item 8): the image one decays matrices only; the text one decays every parameter whose
    name matches none of ``no_weight_decay_keywords`` (its biases included). The encoder may have its own
    learning rate (``pe_lr``, as the image pipeline)."""
    groups = []
    enc_skip = tuple(enc.no_weight_decay_keywords())
    model_skip = ("wte", "cls_token")  # token embedding (tied head) and the ViT's CLS token / CLS PE
    enc_min_dim = 1 if cfg.task == "lm" else 2
    for module, skip, lr, min_dim in ((enc, enc_skip, cfg.pe_lr or cfg.lr, enc_min_dim),
                                      (model, model_skip, cfg.lr, 2)):
        decay, rest = [], []
        for name, p in module.named_parameters():
            (decay if p.dim() >= min_dim and not any(k in name for k in skip) else rest).append(p)
        groups += [{"params": decay, "weight_decay": cfg.weight_decay, "lr": lr},
                   {"params": rest, "weight_decay": 0.0, "lr": lr}]
    return [g for g in groups if g["params"]]  # a parameter-free baseline has none


# ---------------------------------------------------------------------------------------------------- train
def _distributed():
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def cuda_graphs_plan(requested: Optional[bool], device: torch.device, backend: str, distributed: bool):
    """(on, why): whether the encoder step runs as CUDA graphs (GraphedSeqPE). On by default where replay is
    exact and safe: a CUDA device, the triton or cuda backend, one process (not under DDP, whose gradient hooks
    a captured backward would bypass). ``requested`` False (``--no-cuda-graphs``) turns it off."""
    if requested is False:
        return False, "off (--no-cuda-graphs)"
    why = None
    if device.type != "cuda":
        why = "needs a CUDA device"
    elif distributed:
        why = "not under DDP"
    elif backend not in ("triton", "cuda"):
        why = f"needs the triton or cuda backend, not {backend}"
    if why is None:
        return True, "on (--no-cuda-graphs turns it off)"
    return False, f"off ({'requested, but ' if requested else ''}{why})"


_LOG_EVERY = 25  # CUDA: training steps between host reads of the logged losses (each read is a host-device sync)


def _log_every(device: torch.device) -> int:
    """Steps per host read of the logged losses: every step on CPU (no sync to save; the bar moves per step)."""
    return _LOG_EVERY if device.type == "cuda" else 1


_PIN = [True]  # pinned host memory usable (set False after the first failure)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without a host sync. A plain ``.to("cuda")`` of pageable memory first waits for
    the stream's queued work (CUDA stages pageable copies synchronously), so every step's samplers and data
    loading ran with the GPU idle; from pinned memory the copy is queued (torch's pinned-memory cache keeps the
    buffer until the copy has run)."""
    if device.type != "cuda" or t.device.type != "cpu" or not _PIN[0]:
        return t.to(device)
    try:
        pinned = t.pin_memory()
    except RuntimeError:  # no page-locked memory here (a locked-memory limit, some containers): blocking copies
        _PIN[0] = False
        return t.to(device)
    return pinned.to(device, non_blocking=True)


def _flush_stats(pending: list, hist: dict, K: int, bar) -> None:
    """The logged losses of the steps in ``pending`` (one [5] tensor each: total, main, contrastive, transfer sum,
    active transfer streams) into ``hist``, in one host read; empties ``pending``."""
    rows = torch.stack([st for st, _ in pending]).tolist()
    for s, (_, ct) in zip(rows, pending):
        hist["losses"].append(s[0])
        hist["main"].append(s[1])
        hist["contrastive"].append(s[2] if ct else None)
        hist["transfer"].append(s[3] / K if s[4] > 0 else None)
    if bar is not None:
        bar.set_postfix(loss=f"{rows[-1][0]:.4f}", main=f"{rows[-1][1]:.4f}", refresh=False)
        bar.update(len(rows))
    pending.clear()


def train(cfg: TrainConfig, log=print, progress_desc: Optional[str] = None) -> dict:
    """Run one training (and evaluation). Uses the default process group if one is initialised.
    ``progress_desc`` labels the progress bar (default ``train <task>``).

    Returns a dict: ``losses``, ``main``, ``contrastive``, ``transfer`` (per step, averaged over all ranks;
    ``None`` where a term was inactive), ``eval``, ``config``, ``checks``, ``time_s``, and the trained
    (unwrapped) ``encoder`` and ``model`` modules.
    """
    from ..reference.losses import PeWeightScheduler, contrastive_loss, transfer_loss
    from .samplers import merge_positions, split_outputs, transfer_active

    resume = _read_resume(cfg.resume) if cfg.resume else None
    if resume is not None:
        cfg = _resume_config(cfg, resume)
    cfg = resolve_config(cfg)
    if resume is not None:
        _check_resume_config(cfg, resume)
    distributed = _distributed()
    if distributed:
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    is_main = rank == 0
    if cfg.device is not None:
        device = torch.device(cfg.device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if distributed else
                              torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)

    K = cfg.position_streams or world
    if K % world:
        raise ValueError(f"--position-streams ({K}) must be a multiple of the number of ranks ({world})")
    k_local = K // world
    if cfg.batch_size % K:
        raise ValueError(f"--batch-size ({cfg.batch_size}) must be divisible by the number of position streams "
                         f"({K}: ranks x streams per rank)")
    stream_batch = cfg.batch_size // K
    local_batch = stream_batch * k_local

    # data
    if cfg.task == "lm":
        data = TextData(cfg.data)
        num_classes = 0
    elif cfg.data is not None:
        data = ImageFolderData(cfg.data, cfg.img_size)
        num_classes = data.num_classes
    else:
        data, num_classes = None, SYNTHETIC_CLASSES
    data_rng = np.random.default_rng([cfg.seed, 7919])  # global batch: same stream on every rank, sliced

    enc, model, mcfg = _build(cfg, device, num_classes)
    seqpe = cfg.pe == "seqpe"
    enc_backend = enc.resolved_backend(device) if seqpe else f"none ({cfg.pe} baseline)"
    streams = [_PositionStream(cfg, rank * k_local + i, stream_batch) for i in range(k_local)]
    opt = torch.optim.AdamW(_param_groups(enc, model, cfg), lr=cfg.lr)
    sched = PeWeightScheduler(cfg.contrastive_weight, cfg.transfer_weight, cfg.pe_warmup_steps)
    torch.manual_seed(cfg.seed + 1_000_003 * rank)  # dropout masks differ per rank
    start_step = 0
    if resume is not None:
        start_step = _restore(resume, enc, model, opt, sched, streams, data_rng, rank * k_local, rank, device,
                              log if is_main else (lambda *a, **k: None))
        _apply_given_lrs(opt, _param_groups(enc, model, cfg), cfg, resume["config"],
                         log if is_main else (lambda *a, **k: None))

    enc_run, model_run = enc, model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        # every parameter gets a gradient every step (the fused CLS-only last block included, checked below),
        # so DDP runs without find_unused_parameters
        if any(p.requires_grad for p in enc.parameters()):  # parameter-free baselines need no wrapper
            enc_run = DDP(enc, device_ids=ids)
        model_run = DDP(model, device_ids=ids)
    graphs_on, graphs_why = cuda_graphs_plan(cfg.cuda_graphs, device, enc_backend, distributed)
    if graphs_on:
        from ..savings.graphs import GraphedSeqPE

        # one capture per positions shape; same outputs, gradients and dropout masks as the eager encoder
        enc_run = GraphedSeqPE(enc)

    if is_main:
        n_enc = sum(p.numel() for p in enc.parameters())
        n_model = sum(p.numel() for p in model.parameters())
        log(f"seqpe-kernels train: task={cfg.task} steps={cfg.steps} device={device} encoder backend="
            f"{enc_backend} (asked {cfg.backend}) ranks={world} position streams={K} global batch={cfg.batch_size}")
        log(f"  encoder CUDA graphs: {graphs_why}")
        data_name = data.name if data is not None else "built-in synthetic images (colour pair x side of a boundary)"
        log(f"  data: {data_name}")
        pe_desc = (f"encoder: D={cfg.pe_dim} heads={cfg.pe_heads} layers={cfg.pe_layers} K={enc.max_digits} "
                   f"O={enc.out_dim}" if seqpe else f"position encoding: {cfg.pe} baseline ({type(enc).__name__}, "
                   f"applied as {cfg.pe_method}, O={enc.out_dim}; SeqPE regularisers and random shift off)")
        log(f"  {pe_desc} ({n_enc:,} params); model: dim={cfg.model_dim} layers={cfg.model_layers} heads={cfg.model_heads}"
            f" ({n_model:,} params); dropout={cfg.dropout} lr={cfg.lr} "
            f"lambda_ct={cfg.contrastive_weight} lambda_tr={cfg.transfer_weight}")

    hist = {"losses": [], "main": [], "contrastive": [], "transfer": []}
    checks = {}
    bar = None
    if cfg.progress and is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc=progress_desc or f"train {cfg.task}", dynamic_ncols=True, file=sys.stderr)
    # positions are range-checked on the host, where the samplers made them (no device sync); the encoder's own
    # check (a host sync per call on CUDA, a device-side assert inside a CUDA graph) is off while training
    host_check = seqpe and getattr(enc, "check_range", False) is True
    if host_check:
        from ..reference.tokenize import check_positions

        enc.check_range = False
    t0 = time.perf_counter()
    enc.train()
    model.train()
    pending: list = []  # (stats on the device, contrastive active) of the steps not yet read (_flush_stats)
    log_every = _log_every(device)
    try:
        for step in range(cfg.steps):
            w_ct, w_tr = sched.step()
            # --- 1-2. positions of every stream owned by this process
            mains = [s.main.next(s.num_windows) for s in streams]
            cts = [s.contrastive.next() for s in streams] if cfg.contrastive_weight > 0 else None
            trs = [s.transfer.next() if transfer_active(m, cfg.transfer_weight) else None
                   for s, m in zip(streams, mains)]
            main_pos, P, teacher = _combine_main(mains, stream_batch)
            piv = cand = None
            if cts is not None:
                piv = torch.cat([c.pivots for c in cts])
                cand = torch.cat([c.candidates for c in cts])
                labels_ct = _to_device(torch.cat([c.labels for c in cts]), device)
            active = [t for t in trs if t is not None]
            tr_pos = torch.cat([t.positions for t in active]) if active else None
            # --- 3-4. one merged encoder call, split
            merged, layout = merge_positions(main_pos, piv, cand, tr_pos, num_windows=P)
            if host_check:
                check_positions(merged, enc.max_digits, enc.base, enc.data_dim)
            y = enc_run(_to_device(merged, device))
            parts = split_outputs(y, layout)
            # --- 5. main task (this process's slice of the global batch)
            lo = rank * local_batch
            if cfg.task == "lm":
                ids = _to_device(data.batch(data_rng, cfg.batch_size, cfg.block_size)[lo:lo + local_batch], device)
                _, loss_main = model_run(ids, pe=parts.main, labels=ids)
            else:
                if data is None:
                    x, lab = synthetic_images(data_rng, cfg.batch_size, cfg.img_size // cfg.patch_size, cfg.patch_size)
                else:
                    x, lab = data.batch(data_rng, cfg.batch_size)
                x, lab = _to_device(x[lo:lo + local_batch], device), _to_device(lab[lo:lo + local_batch], device)
                loss_main = F.cross_entropy(model_run(x, pe=parts.main).float(), lab)
            # --- 6. regularisers
            total = loss_main
            loss_ct = None
            if cts is not None:
                loss_ct = contrastive_loss(parts.pivots, parts.candidates, labels_ct)
                total = total + w_ct * loss_ct
            tr_sum = torch.zeros((), device=device)
            row = 0
            for r, t in enumerate(trs):
                if t is None:
                    continue
                n = t.positions.shape[0]
                tr_sum = tr_sum + transfer_loss(parts.main[teacher[r]], _to_device(t.pivot_indices, device),
                                                parts.transfer[row:row + n],
                                                num_heads=cfg.pe_heads, beta=cfg.transfer_beta,
                                                batch_size=t.batch_size)
                row += n
            if active:
                total = total + w_tr * (tr_sum / k_local)
            # --- 7. backward, separate clipping, one AdamW step
            opt.zero_grad(set_to_none=True)
            total.backward()
            if step == 0:
                checks["encoder_params_without_grad"] = [n for n, p in enc.named_parameters() if p.grad is None]
                checks["model_params_without_grad"] = [n for n, p in model.named_parameters() if p.grad is None]
            if cfg.clip > 0:
                if seqpe or any(True for _ in enc.parameters()):  # not for parameter-free baselines
                    torch.nn.utils.clip_grad_norm_(enc.parameters(), cfg.clip)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()

            # --- logging: averages over all ranks (the DDP loss), transfer as its contribution to the total
            stats = torch.stack([total.detach().float(), loss_main.detach().float(),
                                 (loss_ct.detach().float() if loss_ct is not None else torch.zeros((), device=device)),
                                 tr_sum.detach().float(), torch.full((), float(len(active)), device=device)])
            if distributed:
                dist.all_reduce(stats)
                stats[:3] /= world
            # on CUDA read on the host every _LOG_EVERY steps, not every step: a read waits for the step's GPU work,
            # after which the next step's host work (samplers, data, launches) ran with the GPU idle
            pending.append((stats, loss_ct is not None))
            if len(pending) == log_every or step == cfg.steps - 1:
                _flush_stats(pending, hist, K, bar)
        if bar is not None:
            bar.close()
    finally:
        if host_check:
            enc.check_range = True
    train_time = time.perf_counter() - t0
    train_state = _train_state(start_step + cfg.steps, sched, data_rng, streams, rank * k_local, device, distributed)
    if is_main:
        first, last = hist["losses"][0], hist["losses"][-1]
        log(f"trained {cfg.steps} steps in {train_time:.1f}s: loss {first:.4f} -> {last:.4f} "
            f"(main {hist['main'][0]:.4f} -> {hist['main'][-1]:.4f})")
        if checks["encoder_params_without_grad"] or checks["model_params_without_grad"]:
            log(f"  warning: parameters without a gradient after step 1: {checks}")

    ev = None
    if cfg.do_eval and is_main:
        ev = evaluate(cfg, enc, model, data, device)
        log(format_eval(ev))
    if distributed:
        dist.barrier()
    config = cfg.to_dict()
    config.update(world_size=world, position_streams=K, encoder_backend=enc_backend, device=str(device),
                  encoder_cuda_graphs=graphs_on,
                  max_digits=getattr(enc, "max_digits", None), pe_out_dim=enc.out_dim, data_name=(data.name if data is not None
                                                                                 else "synthetic"))
    return dict(hist, eval=ev, config=config, checks=checks, time_s=train_time, encoder=enc, model=model,
                optimizer=opt, train_state=train_state)


# ---------------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``seqpe-kernels train`` (task-dependent defaults are shown as 'task default')."""
    from .baselines import PE_CHOICES
    from ..cli import (existing_path, float_in, minus_one_or_positive, nonnegative_int, output_path, positive_int,
                      seed_int, usable_device)

    lm, vit = TASK_DEFAULTS["lm"], TASK_DEFAULTS["vit"]

    def td(key):
        return f"task default: lm {lm.get(key)}, vit {vit.get(key)}"

    p.add_argument("--task", choices=sorted(TASK_DEFAULTS), default=None, help="language model or ViT (default lm)")
    p.add_argument("--pe", choices=list(PE_CHOICES), default=None,
                   help="position encoding: seqpe (default) or a baseline (learned, sinusoidal, rope, alibi, none; "
                        "the ViT takes their 2-D forms and has no alibi). The SeqPE regularisers and random shift "
                        "are off for the baselines")
    p.add_argument("--steps", type=positive_int, default=None, help=f"training steps ({td('steps')})")
    p.add_argument("--backend", default=None, choices=["auto", "torch", "triton", "cuda", "cpu"],
                   help="FusedSeqPE backend of the position encoder (default auto)")
    p.add_argument("--dropout", type=float_in(0.0, 1.0, hi_open=True), default=None,
                   help="encoder residual dropout and model dropout (default 0.1)")
    p.add_argument("--seed", type=seed_int, default=None, help="seed of weights, data and positions (rank r: seed + r)")
    p.add_argument("--json", default=None, metavar="PATH", type=output_path(),
                   help="write per-step losses, config and evaluation as JSON")
    p.add_argument("--contrastive-weight", type=float_in(0.0), default=None,
                   help="lambda_ct (default 0.1 with --pe seqpe; 0 disables; baselines: off)")
    p.add_argument("--transfer-weight", type=float_in(0.0), default=None,
                   help="lambda_tr (default 0.1 with --pe seqpe; 0 disables; baselines: off)")
    p.add_argument("--device", default=None, type=usable_device,
                   help="cpu or cuda[:i] (default: cuda if present; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"global batch, split across ranks ({td('batch_size')})")
    p.add_argument("--lr", type=float_in(0.0, lo_open=True), default=None, help=f"AdamW learning rate ({td('lr')})")
    p.add_argument("--pe-lr", type=float_in(0.0, lo_open=True), default=None,
                   help="SeqPE encoder learning rate (task default: lm --lr, vit 1e-4; not for the baselines)")
    p.add_argument("--data", default=None, metavar="PATH", type=existing_path,
                   help="lm: a UTF-8 text file (byte tokens); vit: an image folder with one subfolder per class "
                        "(needs Pillow). Default: embedded data, no download")
    p.add_argument("--plot", default=None, metavar="PATH", type=output_path(""),
                   help="PNG of the losses and the extrapolation (default seqpe_train_<task>.png; '' for none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the encoder's forward + backward as CUDA graphs (GraphedSeqPE: same results, "
                        "no per-kernel launch cost). Default: on with a CUDA device, the triton or cuda backend "
                        "and one process; --no-cuda-graphs turns it off")
    g = p.add_argument_group("model and encoder sizes")
    g.add_argument("--model-dim", type=positive_int, default=None, help=td("model_dim"))
    g.add_argument("--model-layers", type=positive_int, default=None, help=td("model_layers"))
    g.add_argument("--model-heads", type=positive_int, default=None, help=td("model_heads"))
    g.add_argument("--pe-dim", type=positive_int, default=None, help=f"encoder embed_dim ({td('pe_dim')})")
    g.add_argument("--pe-heads", type=positive_int, default=None, help=td("pe_heads"))
    g.add_argument("--pe-layers", type=positive_int, default=None, help=td("pe_layers"))
    g.add_argument("--pe-temperature", type=float_in(0.0, lo_open=True), default=None,
                   help="encoder output temperature (default 1.0)")
    g.add_argument("--pe-method", default=None, choices=["input_add", "attn_mul", "attn_add", "attn_scalar"],
                   help=f"how the model applies the PE ({td('pe_method')})")
    g.add_argument("--pe-qk", default=None, choices=["none", "single", "multi"],
                   help=f"Q/K projection of the PE for the attn_* methods ({td('pe_qk')})")
    g.add_argument("--block-size", type=positive_int, default=None, help=f"LM training length N ({td('block_size')})")
    g.add_argument("--img-size", type=positive_int, default=None, help=f"ViT training resolution ({td('img_size')})")
    g.add_argument("--patch-size", type=positive_int, default=None, help=td("patch_size"))
    g.add_argument("--max-position", type=positive_int, default=None, help=f"pe_max_position ({td('max_position')})")
    g = p.add_argument_group("regularisers and sampling (sizes per position stream, like the reference's per GPU)")
    g.add_argument("--contrastive-size", type=positive_int, default=None,
                   help=f"C candidates ({td('contrastive_size')})")
    g.add_argument("--contrastive-batch", type=positive_int, default=None,
                   help=f"B_c pivots ({td('contrastive_batch')})")
    g.add_argument("--transfer-size", type=positive_int, default=None, help=f"T_n slots ({td('transfer_size')})")
    g.add_argument("--transfer-batch", type=positive_int, default=None, help=f"B_t windows ({td('transfer_batch')})")
    g.add_argument("--transfer-beta", type=float_in(0.0, 1.0), default=None,
                   help="transfer beta in [0, 1] (default 1.0, the scripts)")
    g.add_argument("--shift-rate", type=float_in(0.0, 1.0), default=None,
                   help="random-shift probability (default 0.1 with --pe seqpe; 0 = off; baselines: off)")
    g.add_argument("--shift-pool", type=int, default=None,
                   help="random-shift pool size (default 320; <= 0 keeps every window, as the text pipeline)")
    g.add_argument("--pe-main-batch-size", type=minus_one_or_positive, default=None,
                   help="P windows on a shifted step (default -1: the stream's batch size)")
    g.add_argument("--pe-warmup-steps", type=nonnegative_int, default=None, help="regulariser weight warm-up (default 0)")
    g.add_argument("--position-streams", type=positive_int, default=None,
                   help="independent position streams (seed + index) the global batch is drawn from; default "
                        "the number of ranks. A single process with K streams reproduces a K-rank run")
    g = p.add_argument_group("optimisation and evaluation")
    g.add_argument("--weight-decay", type=float_in(0.0), default=None,
                   help="AdamW weight decay of matrices (default 0.01)")
    g.add_argument("--clip", type=float_in(0.0), default=None,
                   help="gradient max-norm, encoder and model separately (5.0; 0 disables)")
    g.add_argument("--eval-scales", type=float_in(0.0, lo_open=True), nargs="+", default=None,
                   help=f"evaluation lengths / grids as multiples of the training ones ({td('eval_scales')})")
    g.add_argument("--eval-tokens", type=positive_int, default=None, help="LM: held-out tokens per length, at most")
    g.add_argument("--eval-samples", type=positive_int, default=None, help="ViT synthetic: images per grid")
    g.add_argument("--no-eval", action="store_true", help="skip the extrapolation evaluation")
    g.add_argument("--save", default=None, metavar="PATH", type=output_path(),
                   help="save the run (encoder with its config, model, optimizer, sampler and RNG states); "
                        "seqpe_kernels.load_checkpoint(PATH) reads the encoder, --resume PATH continues the run")
    g.add_argument("--resume", default=None, metavar="PATH", type=existing_path,
                   help="continue a run saved with --save for --steps more steps (flags left out take the saved "
                        "run's values; flags that define the model or the loss must match it)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed flags (every flag named like a TrainConfig field is taken over). Flags not given
    parse to None and keep TrainConfig's default; ``given`` records the ones given, so that ``--resume`` takes
    the saved run's value for every other one (a default is not a choice)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    kw.update(do_eval=not args.no_eval, progress=not args.no_progress)
    cfg = TrainConfig(**kw)
    cfg.given = tuple(sorted(k for k in kw if k not in ("do_eval", "progress")))
    return cfg


def _init_distributed(device_arg: Optional[str]) -> bool:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE and MASTER_ADDR set)."""
    if "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    use_cuda = (device_arg is None and torch.cuda.is_available()) or (device_arg or "").startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return True


def run(args: argparse.Namespace) -> int:
    """Entry point of ``seqpe-kernels train``; returns the exit code."""
    try:
        cfg = config_from_args(args)
        resolve_config(cfg)
        if cfg.task == "lm" and cfg.data is not None and os.path.isdir(cfg.data):
            raise ValueError(f"--data {cfg.data}: a directory; the lm task reads one UTF-8 text file")
        if args.save and args.save.endswith(".safetensors"):
            raise ValueError(f"--save {args.save}: a run file holds the optimizer, sampler and RNG states too, "
                             "which safetensors cannot: use a .pth name (load_checkpoint reads the encoder from it; "
                             "save_checkpoint(encoder, 'x.safetensors') writes the encoder alone)")
        if cfg.pe != "seqpe" and (args.save or cfg.resume):
            raise ValueError(f"--save / --resume write and read SeqPE runs; not available with --pe {cfg.pe}")
    except ValueError as e:
        print(f"seqpe-kernels train: {e}", file=sys.stderr)
        return 2
    started = _init_distributed(cfg.device)
    try:
        if started and cfg.device is not None and cfg.device.startswith("cuda"):
            cfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        rank = int(os.environ.get("RANK", "0")) if started else 0
        log = print if rank == 0 else (lambda *a, **k: None)
        from ..backend import BackendUnavailable

        try:
            result = train(cfg, log=log)
        except (ValueError, BackendUnavailable, MissingDependency, FileNotFoundError) as e:
            print(f"seqpe-kernels train: {e}", file=sys.stderr)
            return 2
        if rank == 0:
            if args.json:
                write_json(result, args.json)
                print(f"wrote {args.json}")
            plot_path = f"seqpe_train_{result['config']['task']}.png" if args.plot is None else args.plot
            if plot_path:
                try:
                    plot(result, plot_path)
                    print(f"wrote {plot_path}")
                except ImportError as e:
                    print(f"seqpe-kernels train: no plot ({e})", file=sys.stderr)
            if args.save:
                save_run(result, args.save)
                print(f"wrote {args.save}")
        return 0
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqpe_kernels.training.train",
                                     description="Train a tiny SeqPE LM or ViT and evaluate extrapolation")
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a refused argument (one line on stderr already): its exit code, as cli.main does
        return int(e.code or 0)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
