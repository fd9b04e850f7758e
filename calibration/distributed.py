"""Calibration spread over processes (``torchrun``): one view of the counts on every rank.

llm-compressor's ``oneshot`` under ``torchrun`` gives every rank its own slice of the
calibration data. Per-expert token counts are therefore partial on each rank; they are summed
over ranks (:func:`all_reduce_counts`) before anything decides on them (coverage report,
``min_tokens``, policy), so every rank decides the same and the totals equal a one-process run
on the same data. Files are written by rank 0 only (:func:`is_main_process`).

Works with whatever process group is initialised (gloo on the CPU, NCCL on GPUs);
:func:`init_from_env` initialises one from ``torchrun``'s environment when none is.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from defuser_quant.core.errors import DefuserQuantError

__all__ = [
    "DistributedMismatchError",
    "DuplicatedCalibrationDataError",
    "all_gather_ints",
    "all_reduce_counts",
    "all_reduce_ints",
    "check_distinct_shares",
    "init_from_env",
    "int_env",
    "is_distributed",
    "is_main_process",
    "launched_by_torchrun",
    "partition_bounds",
    "rank",
    "rank_share",
    "world_size",
]

logger = logging.getLogger(__name__)

Counts = Mapping[str, tuple[Sequence[int], Sequence[int]]]


class DistributedMismatchError(DefuserQuantError, RuntimeError):
    """Ranks hold different models (other experts blocks): their counts cannot be summed."""


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0, and when not distributed: the process that writes files."""
    return rank() == 0


def int_env(name: str, default: int = 1) -> int:
    """An integer ``torchrun`` environment variable (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``)."""
    return int(os.environ.get(name, default))


def launched_by_torchrun() -> bool:
    """True in a process ``torchrun`` started as one of several."""
    return int_env("WORLD_SIZE") > 1 and "RANK" in os.environ


def init_from_env(backend: str | None = None, timeout: datetime.timedelta | None = None) -> bool:
    """Initialise the default process group from ``torchrun``'s environment; True when this call did.

    ``backend``: ``"nccl"`` (one GPU per process, ``LOCAL_RANK``) or ``"gloo"`` (CPU); default
    NCCL when CUDA is available, else gloo. (llm-compressor's own ``init_dist`` needs an
    accelerator.) No-op when already initialised or not launched by ``torchrun``.
    """
    if dist.is_initialized() or not launched_by_torchrun():
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    logger.info("rank %d of %d: process group initialised (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_counts(counts: Counts) -> dict[str, tuple[list[int], list[int]]]:
    """``{block path: (routed, forced)}`` per expert, summed over every rank (a copy when not distributed).

    Raises:
        DistributedMismatchError: on every rank, when the ranks' blocks or expert counts differ.
    """
    paths = sorted(counts)
    local = {p: ([int(v) for v in counts[p][0]], [int(v) for v in counts[p][1]]) for p in paths}
    if not is_distributed():
        return local
    signature = [(p, len(local[p][0]), len(local[p][1])) for p in paths]
    signatures: list = [None] * dist.get_world_size()
    dist.all_gather_object(signatures, signature)
    for other, theirs in enumerate(signatures):
        if theirs != signature:
            differ = sorted(set(map(tuple, theirs)) ^ set(signature))[:3]
            raise DistributedMismatchError(
                f"rank {dist.get_rank()} and rank {other} count tokens for different experts blocks "
                f"(e.g. {differ}): every rank must load the same model with the same defuse filter"
            )
    flat = torch.tensor([v for p in paths for part in local[p] for v in part], dtype=torch.long, device=_device())
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    values = iter(flat.cpu().tolist())
    return {p: ([next(values) for _ in local[p][0]], [next(values) for _ in local[p][1]]) for p in paths}


def partition_bounds(num_samples: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """``[start, end)`` of this rank's share of ``num_samples`` (llm-compressor's own split formula)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    return num_samples * rank_ // world, num_samples * (rank_ + 1) // world


def rank_share(dataset: Any) -> Any:
    """This rank's slice of a ``datasets.Dataset`` (the whole dataset when not distributed).

    Pass it to ``oneshot`` under ``torchrun`` instead of the full dataset: llm-compressor 0.14
    splits a dataset that is identical on every rank, but its data loader then indexes the
    *unsplit* dataset with the split's indices, so every rank calibrates on the first
    ``1/world_size`` of the data and the rest is never seen.
    """
    if not is_distributed():
        return dataset
    start, end = partition_bounds(len(dataset))
    if end <= start:
        raise DefuserQuantError(
            f"{len(dataset)} calibration samples cannot be split over {world_size()} processes: use at least "
            f"{world_size()} samples or fewer processes"
        )
    return dataset.select(range(start, end))


class DuplicatedCalibrationDataError(DefuserQuantError, RuntimeError):
    """Two ranks calibrated on the same batches: the data was not split over the ranks."""


def check_distinct_shares(fingerprints: Sequence[Any]) -> None:
    """Raise on every rank when two ranks saw the same batches (in any order).

    ``fingerprints`` holds one hashable value per calibration batch of this rank (for instance
    the per-expert routed counts of the first experts block). A collective: every rank calls it.
    """
    if not is_distributed():
        return
    mine = sorted(fingerprints)
    shares: list = [None] * dist.get_world_size()
    dist.all_gather_object(shares, mine)
    for a in range(len(shares)):
        for b in range(a + 1, len(shares)):
            if shares[a] and shares[a] == shares[b]:
                raise DuplicatedCalibrationDataError(
                    f"ranks {a} and {b} calibrated on the same {len(shares[a])} batch(es): the calibration data was not "
                    "split over the processes (llm-compressor 0.14 splits a dataset that is identical on every rank but "
                    "then loads the first 1/world_size of it on every rank). Pass each rank its own slice: "
                    "oneshot(dataset=defuser_quant.calibration.distributed.rank_share(dataset), ...)"
                )


def all_reduce_ints(values: Sequence[int]) -> list[int]:
    """Element-wise sum of ``values`` over the ranks (the values themselves when not distributed)."""
    if not is_distributed():
        return [int(v) for v in values]
    tensor = torch.tensor([int(v) for v in values], dtype=torch.long, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def all_gather_ints(values: Sequence[int]) -> list[list[int]]:
    """Every rank's ``values`` (same length on every rank), indexed by rank."""
    if not is_distributed():
        return [[int(v) for v in values]]
    mine = torch.tensor([int(v) for v in values], dtype=torch.long, device=_device())
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return [t.cpu().tolist() for t in everyone]
