"""Data-parallel extraction on torch.distributed: one process per GPU (or per CPU worker), launched by
`torchrun --nproc_per_node N` or `accelerate launch`, all writing into ONE activation store.

The unit of work is the store's fixed-size shard (extract.store). On a fresh store rank r computes
the shards whose index % world_size == r. On a resumed store only the missing shards are computed,
dealt out the same way (`missing[r::world_size]`), so a relaunch after one rank died spreads that
rank's unfinished shards over all ranks instead of leaving the others idle at the final barrier.
The store's content does not depend on who computed a shard: it equals a single-process run row
for row (each shard is generated in the same batches either way).

Order of a distributed `run_extraction` (see `run_extraction_distributed`):
1. rank 0 alone opens the store: it writes settings.json (or checks it against the run's settings)
   and lists the missing shards; it broadcasts that list, or its error. The other ranks wait for the
   broadcast, so none writes a shard before settings.json exists, and a settings mismatch is raised
   on every rank instead of leaving them hanging.
2. every rank computes its share and writes its own shard files (atomic renames).
3. all ranks exchange their status: a failure on one rank is raised on all of them.
4. rank 0 writes the manifest (`StoreWriter.finalize`) and broadcasts the outcome; the other ranks
   then open the finished store.
The distributed environment comes from the variables torchrun / accelerate set: WORLD_SIZE, RANK,
LOCAL_RANK (plus MASTER_ADDR / MASTER_PORT, read by torch itself).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

log = logging.getLogger(__name__)

# Ranks wait for each other at the end (the slowest one's last shard) and rank 0 waits while the
# others load the model; NCCL's default of 10 minutes is too short for a shard of a 70B model.
DEFAULT_TIMEOUT = timedelta(hours=2)


class DistributedError(RuntimeError):
    """The distributed launch is misconfigured, or another rank failed (the message names it)."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a data-parallel run.

    rank / world_size: this process and the number of processes (1 = no torch.distributed at all).
    local_rank: the process's index on its node (selects its GPU).
    device: the model device this rank should load on (`cuda:<local_rank>` for auto/cuda on a GPU
    node; the configured device otherwise).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "auto"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, shards: Sequence[int]) -> list[int]:
        """This rank's part of `shards`: every world_size-th item, starting at position `rank`."""
        return list(shards)[self.rank :: self.world_size]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (a picklable Python object)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """`[obj of rank 0, obj of rank 1, ...]` on every rank."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered


@contextmanager
def main_rank_first(ctx: DistContext) -> Iterator[None]:
    """Rank 0 runs the block first, the other ranks after it is done: for one-time work on a shared
    disk (e.g. the first de-quantization of a GGUF model into the model cache), which ranks doing it
    at the same time would race on."""
    if not ctx.is_main:
        ctx.broadcast(None)  # wait for rank 0
        yield
        return
    try:
        yield
    finally:
        ctx.broadcast(None)  # release the others (also when rank 0 failed: they then fail on their own)


def _env_int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise DistributedError(
                f"WORLD_SIZE is set but {name} is not: launch with torchrun or accelerate launch"
            )
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


def detect_environment(env: Mapping[str, str] | None = None) -> DistContext:
    """Rank, world size and local rank from WORLD_SIZE / RANK / LOCAL_RANK (single process when unset)."""
    env = os.environ if env is None else env
    world_size = _env_int(env, "WORLD_SIZE", default=1)
    if world_size < 1:
        raise DistributedError(f"environment variable WORLD_SIZE={world_size}: must be >= 1")
    if world_size == 1:
        return DistContext()
    rank = _env_int(env, "RANK")
    local_rank = _env_int(env, "LOCAL_RANK", default=rank)
    if not 0 <= rank < world_size:
        raise DistributedError(
            f"environment variable RANK={rank}: must be in 0..{world_size - 1} (WORLD_SIZE={world_size})"
        )
    if local_rank < 0:
        raise DistributedError(f"environment variable LOCAL_RANK={local_rank}: must be >= 0")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


def is_main_process(env: Mapping[str, str] | None = None) -> bool:
    """True outside a distributed launch and on rank 0 (the rank that trains and reports)."""
    return detect_environment(env).is_main


def rank_device(ctx: DistContext, device: str) -> str:
    """The model device for this rank: `auto`/`cuda` become `cuda:<local_rank>` when CUDA is there.

    An explicit `cpu` or `cuda:N` is kept (the user asked for it). Single process: unchanged.
    """
    import torch

    if not ctx.enabled or device not in {"auto", "cuda"} or not torch.cuda.is_available():
        return device
    count = torch.cuda.device_count()
    if ctx.local_rank >= count:
        raise DistributedError(
            f"LOCAL_RANK={ctx.local_rank} but this node has {count} CUDA device(s): "
            f"launch at most {count} processes per node (torchrun --nproc_per_node {count})"
        )
    return f"cuda:{ctx.local_rank}"


@contextmanager
def distributed_context(
    model_device: str = "auto", env: Mapping[str, str] | None = None, timeout: timedelta = DEFAULT_TIMEOUT
) -> Iterator[DistContext]:
    """Join the process group for the duration of the block (no-op for a single process).

    Backend: nccl when this rank's model runs on CUDA, gloo otherwise. A process group that the
    caller already initialized (e.g. by accelerate) is used as is and left open; one made here is
    destroyed on exit.
    """
    ctx = detect_environment(env)
    ctx = replace(ctx, device=rank_device(ctx, model_device))
    if not ctx.enabled:
        yield ctx
        return
    import torch
    import torch.distributed as dist

    # rank_device turned auto/cuda into cuda:<local_rank> when CUDA is there.
    on_cuda = ctx.device.startswith("cuda") and torch.cuda.is_available()
    owned = not dist.is_initialized()
    if owned:
        if on_cuda:
            torch.cuda.set_device(torch.device(ctx.device))  # NCCL collectives run on the current device
        dist.init_process_group(
            backend="nccl" if on_cuda else "gloo", timeout=timeout, rank=ctx.rank, world_size=ctx.world_size
        )
    elif (dist.get_rank(), dist.get_world_size()) != (ctx.rank, ctx.world_size):
        raise DistributedError(
            f"the initialized process group is rank {dist.get_rank()} of {dist.get_world_size()}, "
            f"but RANK={ctx.rank} WORLD_SIZE={ctx.world_size}"
        )
    log.info(
        "rank %d of %d (local rank %d), model device %s", ctx.rank, ctx.world_size, ctx.local_rank, ctx.device
    )
    try:
        yield ctx
    finally:
        if owned:
            dist.destroy_process_group()
