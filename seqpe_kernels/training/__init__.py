"""The training stack around the encoder (SEQPE_SPEC §4-§5): what ``seqpe-kernels train`` and ``study`` run.

  samplers.py, contrastive.py   main windows with the random shift, transfer windows, the merged call's layout;
                                the contrastive pivots / candidates / labels
  pe_apply.py                   how a PE enters the model's attention (input_add, attn_mul/add, attn_scalar as
                                augmented-head SDPA, rotary, ALiBi), q/k projections, per-window broadcast
  models.py, baselines.py       the small GPT-2 LM and ViT; the baseline position encodings
  datasets.py, data/            the training data (the embedded text corpus, image folders, the synthetic task)
  config.py, train.py           a run's configuration; the §5.8 training step and loop (DDP under torchrun)
  evaluate.py, resume.py        the extrapolation evaluation and a run's outputs; --save / --resume
  study.py                      ``seqpe-kernels study``: SeqPE against the baselines over seeds and scales
"""
