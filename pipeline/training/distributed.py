"""Several processes, one training: DistributedDataParallel under torchrun or srun.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; under `srun` with several
tasks, SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID are mapped onto them (the batch script exports
MASTER_ADDR and MASTER_PORT; on one node 127.0.0.1 is the default). NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.errors import SnowpipeError


@dataclass(frozen=True)
class Processes:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _from_slurm() -> None:
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")


def start(device_setting: str) -> Processes:
    """Join the process group when there are several processes; pick this process's device."""
    _from_slurm()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device_setting != "cpu"
    if device_setting == "cuda" and not torch.cuda.is_available():
        raise SnowpipeError("training.device is cuda but no CUDA device is visible (set device: auto or cpu)")
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    return Processes(rank, world, local_rank, device)


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def sum_all(tensor: torch.Tensor, procs: Processes) -> torch.Tensor:
    """Sum over processes (in place); a no-op for one process."""
    if procs.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(procs: Processes) -> None:
    if procs.distributed:
        dist.barrier()
