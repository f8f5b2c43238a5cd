"""Training and evaluation engine: ``trainer`` (DDP, AMP, poly LR, checkpoints, exact resume),
``evaluator`` (single/multi-scale, flip, sliding window; ADE20K metrics), ``checkpoint``,
``distributed`` (torchrun), ``optim``, ``loss``, ``sync_bn`` (SyncBN on gloo/CPU), ``logging``,
``stats`` and ``report`` (the activation experiment's statistics and report)."""
