"""Data parallelism on torch.distributed: which rank this process is, its share of the work, and
the collectives that make per-rank statistics equal to the single-process ones.

A run is distributed when it is started by torchrun (or any launcher that sets the standard
`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT` variables, e.g. Slurm's srun
with those exported). Every helper here is the identity in a single process, so callers need no
second code path. Backend: `nccl` for CUDA devices, `gloo` otherwise.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

log = logging.getLogger(__name__)

ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(ValueError):
    """A distributed run that cannot start or go on (a bad launch, an unreachable rendezvous)."""


class PeerFailed(DistributedError):
    """Another rank failed (and said why): this one stops too."""


def launched() -> bool:
    """Whether the environment asks for more than one process (torchrun's variables)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return True  # a malformed WORLD_SIZE is reported by env_world()


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment, checked."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise DistributedError(
            f"RANK, WORLD_SIZE and LOCAL_RANK must be integers ({exc}); start the run with torchrun"
        ) from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DistributedError(
            f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} is not a valid rank of a world; "
            "start the run with torchrun"
        )
    if world > 1:
        missing = [k for k in ENV_KEYS if not os.environ.get(k)]
        if missing:
            raise DistributedError(
                f"WORLD_SIZE is {world} but {', '.join(missing)} is not set; start the run with "
                "torchrun (or export the rendezvous variables)"
            )
    return rank, world, local


def active() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 in a single process)."""
    return dist.get_rank() if active() else 0


def world() -> int:
    """How many processes share the work (1 in a single process)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes results, exports, caches, logs and progress bars (rank 0)."""
    return rank() == 0


def backend_for(device: str) -> str:
    """nccl for CUDA devices, gloo for the CPU."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


def rank_device(device: str, local_rank: int) -> str:
    """The device this rank computes on: its own GPU (cuda:LOCAL_RANK) for `cuda`."""
    if str(device) == "cuda":
        return f"cuda:{local_rank}"
    return str(device)


def check_device(device: str) -> None:
    """Refuse a CUDA device on a rank that has none, before anything loads."""
    if not str(device).startswith("cuda"):
        return
    r, _, local = env_world()
    if launched() and str(device) != "cuda":
        raise DistributedError(
            f"--device {device} under torchrun would put every rank on one GPU; give --device "
            "cuda (each rank takes GPU LOCAL_RANK)"
        )
    if not torch.cuda.is_available():
        raise DistributedError(
            f"rank {r}: --device {device} but this machine has no usable GPU "
            "(torch.cuda.is_available() is False); use --device cpu or run where GPUs are"
        )
    if launched() and local >= torch.cuda.device_count():
        raise DistributedError(
            f"rank {r}: LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} "
            "GPU(s); start at most that many processes per node (--nproc-per-node)"
        )


def init(device: str = "cpu", timeout_s: float = 1800.0) -> bool:
    """Join the process group the launcher describes (nothing in a single process); True if joined.

    `timeout_s` bounds the rendezvous and every collective: a rank that died or never came ends
    the others with an error instead of a hang.
    """
    if not launched() or active():
        return active()
    r, w, local = env_world()
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(local)
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    try:
        dist.init_process_group(
            backend,
            init_method="env://",
            rank=r,
            world_size=w,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    except Exception as exc:  # noqa: BLE001 - every failure to join is the same user error
        raise DistributedError(
            f"rank {r} of {w} could not join the rendezvous at {where} within {timeout_s:g} s "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}); "
            "check that every rank was started and MASTER_ADDR/MASTER_PORT (torchrun "
            "--rdzv-endpoint) are reachable"
        ) from None
    log.info("rank %d of %d joined (%s, %s)", r, w, backend, where)
    return True


def shutdown() -> None:
    """Leave the process group (nothing when none is running)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_divides(n: int, what: str, w: int | None = None) -> None:
    """Refuse `n` items of work that `w` ranks (default: the launch's world) cannot share evenly."""
    w = w if w is not None else (world() if active() else env_world()[1])
    if w > 1 and n % w != 0:
        raise DistributedError(
            f"{n} {what} cannot be shared evenly by {w} ranks: use a multiple of {w} "
            f"(e.g. {max(w, n - n % w)}) or another --nproc-per-node"
        )


def shard(n: int) -> range:
    """This rank's contiguous share of `n` items (rank order is item order; the last ranks get
    one fewer when `n` does not divide)."""
    w, r = world(), rank()
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


def shard_start(n: int) -> int:
    """How many of `n` items the ranks before this one hold."""
    return shard(n).start


def all_reduce_(t: Tensor, op: str = "sum") -> Tensor:
    """Combine `t` over ranks in place (`sum` or `max`); returns `t`."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def all_reduce_grads_(tensors: Sequence[Tensor | None]) -> None:
    """Sum gradients (or any tensors) over ranks in place, as one flat message."""
    if not active():
        return
    live = [t for t in tensors if t is not None]
    if not live:
        return
    flat = torch.cat([t.reshape(-1) for t in live])
    dist.all_reduce(flat)
    offset = 0
    for t in live:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def sum_int(value: int) -> int:
    """An integer summed over ranks."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


def gather_cat(t: Tensor, dim: int = 0) -> Tensor:
    """Every rank's `t` concatenated along `dim` in rank order (sizes along `dim` may differ)."""
    if not active():
        return t
    moved = t.movedim(dim, 0).contiguous()
    sizes = torch.tensor([moved.shape[0]], dtype=torch.int64, device=t.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world())]
    dist.all_gather(all_sizes, sizes)
    counts = [int(s.item()) for s in all_sizes]
    if max(counts) == 0:
        return t
    # all_gather moves equal shapes: pad every part to the longest, cut after
    padded = torch.zeros((max(counts), *moved.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: moved.shape[0]] = moved
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    out = torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)])
    return out.movedim(0, dim)


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order (small objects: lists of floats, records)."""
    if not active():
        return [obj]
    out: list = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def gather_list(items: list) -> list:
    """Every rank's list concatenated in rank order (per-item results of a sharded loop)."""
    return [x for part in gather_objects(items) for x in part]


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """Overwrite `t` with rank `src`'s in place; returns `t`."""
    if active():
        dist.broadcast(t, src)
    return t


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s picklable `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def barrier() -> None:
    """Wait for every rank."""
    if active():
        dist.barrier()


def agree(ok: bool) -> bool:
    """True on every rank only if `ok` on every rank (a rank's failure ends them all)."""
    if not active():
        return ok
    t = torch.tensor([0 if ok else 1], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item()) == 0
