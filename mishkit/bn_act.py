"""Old import path of the fused BatchNorm modules, kept so that models pickled with it still load.

Only re-exports: the modules live in :mod:`mishkit.batchnorm`.
"""

from .batchnorm.modules import BatchNormAct2d, SyncBatchNormAct2d

__all__ = ["BatchNormAct2d", "SyncBatchNormAct2d"]
