"""Data parallelism inside one training run: the collectives the trainer needs (torch.distributed,
gloo or NCCL), the DDP wrapper and the replica check. Nothing here knows Ray: platform/scale/ starts
the processes and the process group."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from selfflow.components.core import module_device
from selfflow.platform.errors import TrainingError


def all_gather_objects(value: Any, world_size: int) -> list[Any]:
    """Every rank's `value`, in rank order (a collective: every rank calls it)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


def rank_max(value: float, device: torch.device) -> float:
    """The largest of the ranks' `value`s (a collective with one host read)."""
    import torch.distributed as dist

    reduced = torch.tensor([float(value)], device=device)  # NCCL reduces device tensors only
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    return float(reduced.item())


def any_rank_tensor(flag: torch.Tensor) -> torch.Tensor:
    """`flag` (a 0-d bool tensor) OR-ed over the ranks, on the device: a collective with no
    device-to-host read (NCCL enqueues it on the stream; the caller reads it when it must)."""
    import torch.distributed as dist

    value = flag.to(torch.float32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value > 0


def parameter_fingerprint(module: nn.Module) -> list[float]:
    """Per tensor, a float64 position-weighted sum: equal parameters give equal numbers."""
    values = []
    for tensor in module.state_dict().values():
        flat = tensor.detach().cpu().double().flatten()
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64).remainder_(7).add_(1)
        values.append(float((flat * weights).sum()))
    return values


class ReplicaCheck:
    """At the last step, every rank compares its parameters with rank 0's (a collective);
    logs dist/replica_divergence and stops loudly if the replicas drifted apart."""

    def on_step_end(self, trainer, logs) -> None:
        if trainer.world_size == 1 or trainer.step != trainer.config.steps:
            return
        divergence = trainer.replica_divergence()
        trainer.tracker.log_metrics({"dist/replica_divergence": divergence}, step=trainer.step)
        if divergence > 0.0:
            raise TrainingError(f"worker replicas diverged (parameter fingerprints differ by {divergence:.3g})")


def ddp_wrapper() -> Callable[[nn.Module], nn.Module]:
    """Wraps the training module in DistributedDataParallel on the device it already lives on."""

    def wrap(module: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        # A mixture's step trains one modality: the other modalities' input and output layers get no
        # gradient that step, which DDP must be told to expect.
        options = {"find_unused_parameters": bool(getattr(module.model, "modalities", ()))}
        device = module_device(module)  # the Trainer has placed the module already
        if device.type == "cuda":
            return DistributedDataParallel(module, device_ids=[device], **options)
        return DistributedDataParallel(module, **options)

    return wrap
