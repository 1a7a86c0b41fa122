"""Data-parallel training under torchrun: who this process is, and the few collectives the
loop needs.

One process is the default and needs nothing here: every function below is then the
identity, so the one-process path computes exactly what it did before DDP existed.
Under ``torchrun`` (one process per GPU, or per CPU with gloo) the entry point
(``thaw.stage_job``) joins the process group and the loop asks ``current()``:

- each stage wraps its network in a fresh ``DistributedDataParallel`` after freezing,
  because changing ``requires_grad`` under an existing wrapper silently skips the gradient
  sync of the parameters that became trainable;
- each step's *global* batch is ``batch_size * world_size`` consecutive samples of the
  epoch's order, split into contiguous shares, one per rank (``share``): every sample is seen
  once per epoch, with no padding and no dropped tail;
- validation splits the data into contiguous parts without padding and gathers them back in
  order, so every rank computes the same metrics and takes the same early-stopping decision;
- only rank 0 writes (checkpoints, MLflow, artifacts).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, MLflow records and artifacts."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """The first process on its node: the one that fetches files onto the node's disk."""
        return self.local_rank == 0

    def device(self) -> torch.device:
        """This process's GPU (``cuda:<local_rank>``), or the CPU without one."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank if self.enabled else 0)
        return torch.device("cpu")

    def wrap(self, net: nn.Module) -> nn.Module:
        """``net`` in a new DDP wrapper (call after its trainable set is final), or ``net``.

        BatchNorm statistics stay per process as in timm without ``--sync-bn`` (rank 0's are
        broadcast before each forward); they only move with ``update_bn_stats``: frozen and,
        by default, trainable BatchNorm use the running statistics, which makes the result
        independent of how the global batch is split over GPUs."""
        if not self.enabled:
            return net
        device = next(net.parameters()).device
        return nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks (in place; returned)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def concat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (first dimensions may differ) concatenated in rank order."""
        if not self.enabled:
            return tensor
        sizes = [torch.zeros((), dtype=torch.int64, device=tensor.device)
                 for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor(len(tensor), device=tensor.device))
        longest = max(int(s) for s in sizes)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[:len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:int(size)] for part, size in zip(parts, sizes, strict=True)])


SINGLE = Distributed()


def current() -> Distributed:
    """The running process group's view of this process; ``SINGLE`` outside one."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def join_from_environment() -> Distributed:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``
    ...): NCCL on GPUs, gloo on CPUs. A lone process (no ``WORLD_SIZE`` or 1) joins nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return current()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return current()


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def share(total: int, parts: int, index: int) -> tuple[int, int]:
    """(start, stop) of part ``index`` when ``total`` items are cut into ``parts`` contiguous
    parts whose sizes differ by at most one (the first ones larger), as ``np.array_split``."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)
