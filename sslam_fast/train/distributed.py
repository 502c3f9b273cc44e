"""Process set-up for ``torchrun``: the device of each rank, one process group for CPU and GPU tensors, and the
collectives the loop needs.

The group is created with ``cpu:gloo,cuda:nccl`` when the ranks run on GPUs: a collective takes the backend of its
tensor's device, so the host-side bookkeeping of a step (stop request, good / bad file counts: CPU tensors) goes over
gloo without touching the GPU, and the loss statistics and DDP's gradients (CUDA tensors) go over NCCL. NCCL alone
refuses CPU tensors; gloo alone would copy every gradient through the host. CPU runs use gloo.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta

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


# How long the ranks wait for each other to join the process group (rank 0's store included): generous, since a busy
# node can take a while to import torch, yet bounded, so that a group that cannot form fails instead of hanging.
_JOIN_TIMEOUT = timedelta(minutes=10)


def group_store(rank: int, world: int) -> dist.Store:
    """A store of this worker group's own, for ``init_process_group`` under torchrun's agent store.

    torchrun's agent serves one TCPStore for the whole job (``TORCHELASTIC_USE_AGENT_STORE=True``), and the default
    ``env://`` set-up builds every incarnation of the worker group on it under the same keys. After a worker dies and
    ``--max-restarts`` restarts the group, the keys of the dead incarnation are still there: gloo connects to a dead
    peer's address ("Gloo connectFullMesh failed ... Connection refused"), NCCL reads a stale unique id. Prefixing
    the keys with ``TORCHELASTIC_RESTART_COUNT`` is not enough: each node's agent counts its own restarts.

    So rank 0 serves a new store on a free port and publishes its port, with a random token, in the agent's store;
    the other ranks connect to what they read there. What they read may be left by the dead incarnation, whose
    processes are all gone before the agent starts the next one: its port refuses the connection, or (taken again
    since) serves a store without the token, and they read again until rank 0 of their own incarnation has written."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = dist.TCPStore(host, port, is_master=False, timeout=_JOIN_TIMEOUT)
    key = "sslam_fast/group_store/" + os.environ.get("TORCHELASTIC_RUN_ID", "")
    if rank == 0:
        # rank 0 runs on the agent's host (MASTER_ADDR); wait_for_workers=False: it must publish before they connect
        own = dist.TCPStore(host, 0, world, is_master=True, timeout=_JOIN_TIMEOUT, wait_for_workers=False)
        token = os.urandom(16).hex()
        own.set("token", token)
        agent.set(key, f"{own.port} {token}")
        return own
    deadline = time.monotonic() + _JOIN_TIMEOUT.total_seconds()
    while True:
        own_port, token = agent.get(key).decode().split()  # waits until a rank 0 has published
        try:
            own = dist.TCPStore(host, int(own_port), is_master=False, timeout=timedelta(seconds=3))
            if own.get("token").decode() == token:
                own.set_timeout(_JOIN_TIMEOUT)
                return own
        except RuntimeError:  # refused (DistNetworkError) or no token in time: a dead incarnation's store
            pass
        if time.monotonic() > deadline:
            from sslam_fast.train.loop import TrainingError

            raise TrainingError(f"rank {rank}: rank 0 did not open the process group's store within "
                                f"{_JOIN_TIMEOUT.total_seconds():.0f} s")
        time.sleep(0.2)


def setup(requested_device: str = "auto") -> DistEnv:
    """Read the torchrun environment, choose the device, and (for more than one process) join the process group: on
    a store of the worker group's own under torchrun's agent (:func:`group_store`), so that a group restarted by
    ``--max-restarts`` forms again."""
    rank, world, local_rank = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    device = select_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            kwargs.update(store=group_store(rank, world), rank=rank, world_size=world)
        dist.init_process_group(backend, **kwargs)
    if world > 1 and device.type == "cpu":
        torch.set_num_threads(1)  # the processes share the cores
    return DistEnv(rank, world, local_rank, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
