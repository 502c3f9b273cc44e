"""Process set-up for ``torchrun``: the device of each rank, one process group for CPU and GPU tensors, and the
collectives the loop needs.

The group is created with ``cpu:gloo,cuda:nccl`` when the ranks run on GPUs: a collective takes the backend of its
tensor's device, so the host-side bookkeeping of a step (stop request, good / bad file counts: CPU tensors) goes over
gloo without touching the GPU, and the loss statistics and DDP's gradients (CUDA tensors) go over NCCL. NCCL alone
refuses CPU tensors; gloo alone would copy every gradient through the host. CPU runs use gloo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sslam_fast.train.config import ConfigError

__all__ = ["DistEnv", "select_device", "setup", "teardown"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank among ``world`` processes, its index on the node, and its device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks in place, on whichever device it lives (gloo for CPU, NCCL for CUDA tensors)."""
        if self.world > 1:
            dist.all_reduce(t)
        return t


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def select_device(requested: str, local_rank: int) -> torch.device:
    """The device of the process with index ``local_rank`` on its node.

    ``cpu``: the CPU. ``cuda``: ``cuda:<local_rank>``; an error when no GPU is visible. ``auto``: ``cuda`` when a GPU
    is visible, else the CPU. A local rank with no GPU of its own is an error naming both numbers (two processes on
    one GPU would each hold a full model and fight for its memory)."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {requested!r}")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible (torch.cuda.is_available() is False)")
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise ConfigError(
            f"LOCAL_RANK={local_rank} but only {n} GPU(s) are visible on this node: start one process per GPU "
            f"(torchrun --nproc_per_node={n}) or pass --device=cpu"
        )
    return torch.device("cuda", local_rank)


def setup(requested_device: str = "auto") -> DistEnv:
    """Read the torchrun environment, choose the device, and (for more than one process) join the process group."""
    rank, world, local_rank = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    device = select_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, **kwargs)
    if world > 1 and device.type == "cpu":
        torch.set_num_threads(1)  # the processes share the cores
    return DistEnv(rank, world, local_rank, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
