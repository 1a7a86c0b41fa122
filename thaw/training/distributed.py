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
- only rank 0 writes (checkpoints, MLflow, artifacts);
- model initialisation, the data order and the crops are the same on every process.

Two timeouts (torch 2.15.0, ``torch/distributed/distributed_c10d.py``: without ``timeout``
``init_process_group`` takes ``default_pg_nccl_timeout``, 10 minutes, for NCCL and
``default_pg_timeout``, 30 minutes, for gloo; ``ProcessGroupNCCL.hpp``: with
``TORCH_NCCL_ASYNC_ERROR_HANDLING`` the watchdog aborts a process whose collective waited
longer):

- ``THAW_COLLECTIVE_TIMEOUT_S`` (default 1800): how long a training collective (gradient
  all-reduce, loss and metric sums) may wait for the other processes;
- ``THAW_RANK_WAIT_TIMEOUT_S`` (default 10800): how long the others may wait while one
  process works alone (the node's first process downloads the prepared set, rank 0 saves,
  mirrors checkpoints to S3, uploads the stage or rides out an MLflow outage). Those waits
  are ``Distributed.barrier``: a ``monitored_barrier`` on a gloo group of their own, so no
  NCCL collective is pending while they last and the watchdog has nothing to time out;
  when the wait is over, the error names the processes that did not arrive.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from thaw.errors import ThawError

COLLECTIVE_TIMEOUT_ENV = "THAW_COLLECTIVE_TIMEOUT_S"
RANK_WAIT_TIMEOUT_ENV = "THAW_RANK_WAIT_TIMEOUT_S"
DEFAULT_COLLECTIVE_TIMEOUT_S = 30 * 60
DEFAULT_RANK_WAIT_TIMEOUT_S = 3 * 60 * 60
# The gloo group of Distributed.barrier (its own timeout); set by join_from_environment.
_wait_group: dist.ProcessGroup | None = None


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

        ``broadcast_buffers=False``: DDP would otherwise broadcast rank 0's buffers before
        every forward, a collective per step (torch 2.15.0,
        ``torch/nn/parallel/distributed.py``). Frozen BatchNorm, and by default every
        BatchNorm (``update_bn_stats``), is in eval mode and never changes its running
        statistics, which DDP's constructor made equal on every process; the model's other
        buffers are constants. BatchNorm that does update them normalises each process's
        share by its own batch statistics (as timm without ``--sync-bn``), and
        ``average_batchnorm`` averages the running statistics over the processes once per
        epoch (timm's ``distribute_bn(reduce=True)``)."""
        if not self.enabled:
            return net
        device = next(net.parameters()).device
        return nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)

    def average_batchnorm(self, model: nn.Module) -> None:
        """Average the running statistics of the BatchNorm layers in training mode (those
        that updated them this epoch) over the processes: one collective."""
        if not self.enabled:
            return
        stats = [buffer for module in model.modules()
                 if isinstance(module, _BatchNorm) and module.training
                 and module.track_running_stats
                 for buffer in (module.running_mean, module.running_var)]
        if not stats:
            return
        flat = self.sum(torch.cat([buffer.flatten() for buffer in stats])) / self.world_size
        for buffer, mean in zip(stats, flat.split([b.numel() for b in stats]), strict=True):
            buffer.copy_(mean.view_as(buffer))

    def barrier(self) -> None:
        """Wait until every process gets here, for up to ``THAW_RANK_WAIT_TIMEOUT_S`` (see
        the module): the place to wait while one process works alone."""
        if not self.enabled:
            return
        if _wait_group is None:  # a process group thaw did not start: its own timeout
            dist.barrier()
            return
        dist.monitored_barrier(_wait_group, timeout=rank_wait_timeout(),
                               wait_all_ranks=True)

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
    ...): NCCL on GPUs, gloo on CPUs, with ``THAW_COLLECTIVE_TIMEOUT_S``; and the gloo group
    of ``Distributed.barrier``, with ``THAW_RANK_WAIT_TIMEOUT_S``. A lone process (no
    ``WORLD_SIZE`` or 1) joins nothing."""
    global _wait_group
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return current()
    collectives, waits = collective_timeout(), rank_wait_timeout()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", timeout=collectives)
    else:
        dist.init_process_group("gloo", timeout=collectives)
    _wait_group = dist.new_group(backend="gloo", timeout=waits)
    return current()


def leave() -> None:
    global _wait_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _wait_group = None


def collective_timeout() -> timedelta:
    """``THAW_COLLECTIVE_TIMEOUT_S`` (default 30 minutes): see the module."""
    return _timeout(COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT_S)


def rank_wait_timeout() -> timedelta:
    """``THAW_RANK_WAIT_TIMEOUT_S`` (default 3 hours): see the module."""
    return _timeout(RANK_WAIT_TIMEOUT_ENV, DEFAULT_RANK_WAIT_TIMEOUT_S)


def _timeout(variable: str, default: float) -> timedelta:
    text = os.environ.get(variable, "").strip()
    try:
        seconds = float(text) if text else default
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise ThawError(f"{variable}={text!r}: give a positive number of seconds")
    return timedelta(seconds=seconds)


def share(total: int, parts: int, index: int) -> tuple[int, int]:
    """(start, stop) of part ``index`` when ``total`` items are cut into ``parts`` contiguous
    parts whose sizes differ by at most one (the first ones larger), as ``np.array_split``."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)
