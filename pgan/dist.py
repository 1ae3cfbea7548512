"""Data-parallel training under torchrun: the process group from the environment, and the few collective
operations the trainer needs (gradient averaging, agreeing on values, rank 0 writing while the others wait).

Every function here is a no-op (or the identity) in a single process, so the trainer calls them
unconditionally. Under `torchrun --nproc_per_node=N`, each process trains on its shard of every global
batch (`schedule.batch_size` / N images), its gradients are averaged with the other ranks' before every
optimizer step, and all ranks therefore hold the same weights after every step.

The gradients are averaged with one explicit all-reduce of the flattened gradients per optimizer step
rather than by wrapping the networks in DistributedDataParallel: the D step's gradient penalty is an
`autograd.grad(create_graph=True)` followed by one ordinary backward, and a DDP wrapper would also have
to be rebuilt for every stage (the networks grow). The all-reduce carries the step's loss too, so that
the non-finite guard sees the same (averaged) values on every rank and all of them skip the same steps.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from pgan.errors import UserError, first_line

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: its rank, how many there are, and its rank on its own node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files, logs and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1


SINGLE = Ranks()


def ranks_from_env() -> Ranks:
    """The ranks torchrun (or SLURM through it) put in the environment; one process when there are none."""
    try:
        return Ranks(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )
    except ValueError as exc:
        raise UserError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun): {exc}") from exc


def export_slurm_env() -> bool:
    """In a SLURM job of several tasks without torchrun's variables (submitit, or `srun pgan-train`): set RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from SLURM's, with submitit's helper. Returns whether
    it did."""
    if "RANK" in os.environ or "SLURM_JOB_ID" not in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return False
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError as exc:
        raise UserError(
            "a SLURM job with several tasks needs submitit to find its ranks: pip install -e '.[slurm]' "
            "(or start the tasks with torchrun)"
        ) from exc
    TorchDistributedEnvironment().export()
    return True


def current() -> Ranks:
    """This process's ranks: those of the initialised process group, or a single process."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return SINGLE


def init_from_env(use_cuda: bool, timeout_s: float = 1800.0) -> Ranks:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); nothing for a single process.

    On CUDA each process takes the GPU of its local rank. Idempotent.
    """
    ranks = ranks_from_env()
    if not ranks.distributed or (dist.is_available() and dist.is_initialized()):
        return ranks
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if use_cuda:
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return ranks


def draw_for_rank(draw: Callable[..., torch.Tensor], n: int, *shape: int, device: torch.device) -> torch.Tensor:
    """This rank's `n` rows of `draw(n * world_size, *shape)` (e.g. torch.randn): every rank draws the whole
    global batch from the same stream and keeps its chunk, so the ranks together use exactly the numbers one
    process would, and their random streams stay equal. In one process: `draw(n, *shape)`."""
    ranks = current()
    full = draw(n * ranks.world_size, *shape, device=device)
    return full if not ranks.distributed else full[ranks.rank * n : (ranks.rank + 1) * n]


def average_gradients(params: Sequence[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """Average the gradients of `params` across ranks in place (one all-reduce); returns the averaged `loss`.

    Parameters without a gradient on this rank count as zero (they have none on any rank in this trainer).
    """
    if not current().distributed:
        return loss
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1).to(grads[0].dtype)])
    dist.all_reduce(flat)
    flat /= current().world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return flat[offset].to(loss.dtype)


def mean_across_ranks(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each value (a tensor on the device) averaged across ranks, in one all-reduce."""
    if not current().distributed or not values:
        return values
    keys = sorted(values)
    flat = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    dist.all_reduce(flat)
    flat /= current().world_size
    return dict(zip(keys, flat.unbind()))


def max_across_ranks(value: int, device: torch.device) -> int:
    """The largest of the ranks' `value`s, on every rank (e.g. the number of a stop signal that reached only
    some of them, 0 for none)."""
    if not current().distributed:
        return value
    box = torch.tensor([value], device=device, dtype=torch.int64)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return int(box.item())


def broadcast_object(value: object) -> object:
    """Rank 0's `value` on every rank."""
    if not current().distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written a checkpoint the others will read)."""
    if current().distributed:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (at the end of a run, or on the way out after an error)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main_first(fn: Callable[[], T]) -> T:
    """`fn()` on rank 0, then on the other ranks once it has finished there: for steps that create or repair
    files the others then only read (prepared stores, scan caches, damaged checkpoints set aside).

    When it fails on rank 0 the other ranks do not wait forever: they raise a UserError naming the failure.
    """
    if not current().distributed:
        return fn()
    if current().is_main:
        try:
            result = fn()
        except BaseException as exc:
            broadcast_object(first_line(exc) or type(exc).__name__)
            raise
        broadcast_object(None)
        return result
    failure = broadcast_object(None)
    if failure is not None:
        raise UserError(f"rank 0 stopped: {failure}")
    return fn()


def broadcast_modules(*modules: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers copied into every rank's modules (in place)."""
    if not current().distributed:
        return
    for module in modules:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def check_in_sync(*modules: torch.nn.Module) -> None:
    """Raise when the ranks' parameters differ (they must be bit-identical after every step): a per-tensor
    sum compared across ranks by one all-reduce of the maximum and one of the minimum."""
    if not current().distributed:
        return
    sums = torch.stack([t.detach().double().sum() for m in modules for t in m.state_dict().values()])
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        differing = int((low != high).sum())
        raise RuntimeError(f"the ranks' weights differ ({differing} tensors): data-parallel training went out of sync")
