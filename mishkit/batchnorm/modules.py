"""``BatchNormAct2d`` and ``SyncBatchNormAct2d``: BatchNorm2d followed by an activation, fused.

Drop-in for ``nn.BatchNorm2d`` (+ activation): the same parameters, buffers and state_dict keys,
the same momentum / eps / affine / track_running_stats semantics. Training saves only the input and
per-channel statistics for backward (``saves="output"``: only the output, a branch bit per element
and the statistics); eval is one fused elementwise pass. Not twice differentiable.
``forward(x, residual)`` computes ``act(bn(x) + residual)``, saving only x and the residual.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .. import backends
from ..registry import get_spec
from .functional import batch_norm_act
from .output import check_invertible, check_saves

# Module hook dictionaries shared (not copied) when one module takes another's place, so handles
# registered on the old module keep working.
HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)


class BatchNormAct2d(_NormBase):
    """``activation(BatchNorm2d(x))`` in fused kernels (CPU C++, CUDA, Triton or pure torch).

    Not a ``_BatchNorm`` subclass on purpose: ``nn.SyncBatchNorm.convert_sync_batchnorm`` would
    otherwise replace it by a plain SyncBatchNorm and silently drop the activation.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as BatchNorm2d
            (``momentum=None`` is the cumulative moving average).
        activation: any name or alias in ``mishkit.ACTIVATIONS``.
        backend: ``"auto" | "cuda" | "triton" | "cpu" | "torch"``.
        saves: what training keeps for backward: ``"input"`` (x and per-channel statistics) or
            ``"output"`` (y, one branch bit per element and the statistics; y is what the next
            layer saves anyway). ``"output"`` needs an invertible activation (not relu,
            hardswish, hardmish); see :mod:`mishkit.batchnorm.output`.
        **activation_params: the activation's parameters, e.g. ``negative_slope=0.1``.
    """

    saves = "input"  # class default: modules pickled before ``saves`` existed

    def __init__(self, num_features: int, activation: str = "mish", eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *,
                 backend: str = "auto", saves: str = "input", **activation_params):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        backends.check_backend_name(backend, type(self).__name__)
        spec = get_spec(activation)
        self.activation = spec.name
        self.activation_params = spec.bind((), activation_params)
        self.backend = backend
        if check_saves(saves, type(self).__name__) == "output":
            check_invertible(spec.name, self.activation_params, type(self).__name__)
        self.saves = saves

    def _check_input_dim(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__}: expected a 4D (N, C, H, W) input, got {got}")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: expected {self.num_features} channels, got input of "
                f"shape {list(x.shape)}"
            )

    def _momentum_and_batch_stats(self) -> tuple[float, bool]:
        """The running-average factor and whether to normalize with batch statistics (as BN)."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        return factor, use_batch_stats

    def _running_stats(self):
        # BN's rule: buffers are updated only in training with track_running_stats
        if not self.training or self.track_running_stats:
            return self.running_mean, self.running_var
        return None, None

    def _sync_group(self, use_batch_stats: bool):
        """The process group to reduce batch statistics over; None: this process only."""
        return None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``act(bn(x))``, or ``act(bn(x) + residual)`` (a ResNet block's end) fused."""
        self._check_input_dim(x)
        factor, use_batch_stats = self._momentum_and_batch_stats()
        running_mean, running_var = self._running_stats()
        return batch_norm_act(x, running_mean, running_var, self.weight, self.bias,
                              use_batch_stats, factor, self.eps, self.activation,
                              self.activation_params, self.backend,
                              process_group=self._sync_group(use_batch_stats), residual=residual,
                              saves=self.saves)

    def extra_repr(self) -> str:
        spec = get_spec(self.activation)
        params = "".join(f", {k}={v}" for k, v in spec.kwargs(self.activation_params).items())
        saves = ", saves=output" if self.saves == "output" else ""
        return (f"{super().extra_repr()}, activation={self.activation}{params}, "
                f"backend={self.backend}{saves}")

    # -- conversion -------------------------------------------------------------------------------

    def _adopt(self, bn: nn.Module) -> None:
        """Share ``bn``'s parameters, buffers, hooks and mode (no copies)."""
        for name in ("weight", "bias"):
            setattr(self, name, getattr(bn, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self._buffers[name] = bn._buffers.get(name)
        for name in HOOK_DICTS:
            if hasattr(bn, name):
                setattr(self, name, getattr(bn, name))
        self.train(bn.training)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, activation: str, params: tuple = (),
                       backend: str = "auto", saves: str = "input") -> BatchNormAct2d:
        """A BatchNormAct2d that shares ``bn``'s parameter and buffer objects."""
        if not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"from_batchnorm expects nn.BatchNorm2d, got {type(bn).__name__}")
        spec = get_spec(activation)
        module = cls(bn.num_features, spec.name, bn.eps, bn.momentum, bn.affine,
                     bn.track_running_stats, device="meta", backend=backend, saves=saves,
                     **spec.kwargs(spec.bind(tuple(params), {})))
        module._adopt(bn)
        return module

    def _native_batchnorm(self, cls, **kwargs) -> nn.Module:
        bn = cls(self.num_features, self.eps, self.momentum, self.affine,
                 self.track_running_stats, device="meta", **kwargs)
        for name in ("weight", "bias"):
            setattr(bn, name, getattr(self, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            bn._buffers[name] = self._buffers.get(name)
        return bn.train(self.training)

    def to_batchnorm(self) -> tuple[nn.BatchNorm2d, str, tuple]:
        """``(nn.BatchNorm2d sharing this module's tensors, activation name, params)``."""
        return self._native_batchnorm(nn.BatchNorm2d), self.activation, self.activation_params


class SyncBatchNormAct2d(BatchNormAct2d):
    """BatchNormAct2d whose training statistics are reduced over a process group.

    Works like ``nn.SyncBatchNorm`` (also inside DDP); ranks may hold different batch sizes. Runs
    unsynchronized when torch.distributed is not initialized or the group has one process.
    """

    def __init__(self, num_features: int, activation: str = "mish", eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 backend: str = "auto", saves: str = "input", **activation_params):
        super().__init__(num_features, activation, eps, momentum, affine, track_running_stats,
                         device, dtype, backend=backend, saves=saves, **activation_params)
        self.process_group = process_group

    def _sync_group(self, use_batch_stats: bool):
        if not (use_batch_stats and self.training):
            return None
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    @classmethod
    def from_sync_batchnorm(cls, bn: nn.SyncBatchNorm, activation: str, params: tuple = (),
                            backend: str = "auto", saves: str = "input") -> SyncBatchNormAct2d:
        if not isinstance(bn, nn.SyncBatchNorm):
            raise TypeError(
                f"from_sync_batchnorm expects nn.SyncBatchNorm, got {type(bn).__name__}"
            )
        spec = get_spec(activation)
        module = cls(bn.num_features, spec.name, bn.eps, bn.momentum, bn.affine,
                     bn.track_running_stats, bn.process_group, device="meta", backend=backend,
                     saves=saves, **spec.kwargs(spec.bind(tuple(params), {})))
        module._adopt(bn)
        return module

    def to_batchnorm(self) -> tuple[nn.SyncBatchNorm, str, tuple]:
        bn = self._native_batchnorm(nn.SyncBatchNorm, process_group=self.process_group)
        return bn, self.activation, self.activation_params
