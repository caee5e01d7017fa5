"""torchrun-compatible data parallelism: env detection, process group, sampler, reductions.

``torchrun --nproc_per_node P -m btp.cli train ...`` sets WORLD_SIZE / RANK / LOCAL_RANK; with
WORLD_SIZE > 1 we join a process group (NCCL on CUDA, gloo on CPU) and wrap the model in
DistributedDataParallel. WORLD_SIZE unset or 1 = plain single-process training.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env(environ=None) -> DistEnv:
    """Read torchrun's variables. Raises ValueError when they are inconsistent."""
    env = os.environ if environ is None else environ

    def _int(key: str, default: int) -> int:
        raw = env.get(key, "")
        if raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"${key}={raw!r} is not an integer (set by torchrun)") from None

    world = _int("WORLD_SIZE", 1)
    rank = _int("RANK", 0)
    local = _int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"inconsistent torchrun env: WORLD_SIZE={world} RANK={rank}")
    return DistEnv(world_size=world, rank=rank, local_rank=local)


def init_distributed(env: DistEnv, device: str = "cpu") -> None:
    """Join the process group when ``env.enabled`` (MASTER_ADDR/PORT come from torchrun)."""
    if not env.enabled:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)


def shutdown(env: DistEnv) -> None:
    if env.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        import torch.distributed as dist

        dist.barrier()


def mean_across(env: DistEnv, value: float) -> float:
    """Average a python float over ranks (for logging)."""
    if not env.enabled:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / env.world_size


def wrap_model(model, env: DistEnv, device: str = "cpu", find_unused: bool = False):
    """DDP-wrap when distributed (frozen parameters are not DDP's: ablations need no unused-parameter scan)."""
    if not env.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.local_rank] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def unwrap(model):
    return getattr(model, "module", model)
