"""Fused BatchNorm + activation: ``BatchNormAct2d``, ``SyncBatchNormAct2d``, ``batch_norm_act``.

Layers inside, top to bottom: ``modules`` (nn.Module drop-ins for BatchNorm2d + activation) →
``functional`` (validation, backend choice) → ``residual`` / ``output`` (saving only the output)
/ ``autograd`` (the shared autograd over a backend's four kernels) → ``distributed`` (SyncBN
reductions).
"""

from .functional import batch_norm_act
from .modules import BatchNormAct2d, SyncBatchNormAct2d

__all__ = ["BatchNormAct2d", "SyncBatchNormAct2d", "batch_norm_act"]
