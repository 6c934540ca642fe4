"""Batch statistics over all processes: BatchNorm layers made synchronous, on any device.

With several processes each sees a slice of the global batch; plain BatchNorm would normalise by the
slice's statistics and a 2-process run would train another model than a 1-process one. torch's
`SyncBatchNorm` fixes that on GPUs only (timm converts to it); `CpuSyncBatchNorm` does the same on CPU processes (gloo):
the mean, then the variance around it, are summed over processes with differentiable all-reduces,
so forward, backward and the running statistics equal one process's on the whole batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["CpuSyncBatchNorm", "convert_sync_batchnorm", "has_batchnorm"]


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of `model` synchronised over the processes: timm's conversion (torch's SyncBatchNorm,
    timm's SyncBatchNormAct) on CUDA, `CpuSyncBatchNorm` elsewhere. Parameters stay the same objects."""
    if device.type == "cuda":
        from timm.layers import convert_sync_batchnorm as timm_convert

        return timm_convert(model)
    return _convert(model)


def _convert(module: nn.Module) -> nn.Module:
    """BatchNorm layers swapped for `CpuSyncBatchNorm` that keeps their very parameters and buffers (an
    optimizer built before still steps them); timm's BatchNormAct keeps its activation and dropout."""
    if isinstance(module, _BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        sync = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)  # fmt: skip
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            setattr(sync, name, tensor)
        sync.act, sync.drop = getattr(module, "act", nn.Identity()), getattr(module, "drop", nn.Identity())
        return sync.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, _convert(child))
    return module


class CpuSyncBatchNorm(_BatchNorm):
    """BatchNorm over the global batch of all processes (any input rank: [N, C, ...]), its training statistics
    in float64 on any process count; plain BatchNorm in eval mode. Parameter and buffer names are BatchNorm's; `act` and `drop`
    (identity unless converted from timm's BatchNormAct) follow the normalisation."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.act, self.drop = nn.Identity(), nn.Identity()

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self._normalise(x)))

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        # Statistics in float64, summed over processes: the same numbers whatever the process count (float32
        # sums would differ by rounding, which an Adam step turns into lr-sized moves of near-zero gradients).
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        x64 = x.double()
        total = _all_sum(torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device))
        mean = _all_sum(x64.sum(dims)) / total
        centred = x64 - mean.view(shape)
        var = _all_sum(centred.pow(2).sum(dims)) / total  # biased, as BatchNorm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = 1 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
                unbiased = var * total / (total - 1).clamp(min=1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        y = (centred * torch.rsqrt(var + self.eps).view(shape)).to(x.dtype)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the processes (differentiable); `x` itself on one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _AllReduceSum.apply(x)
    return x


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; its gradient is the sum of every process's gradient (each process's statistics
    feed every process's loss)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad
