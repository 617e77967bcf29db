"""torch.distributed glue for multi-GPU (or multi-process CPU) calibration.

``torchrun --nproc-per-node N -m slimexport build ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; the CLI
then calls :func:`init_from_env`. Calibration prompts are sharded across ranks and the statistics
all-reduced (NCCL on GPU, gloo on CPU); rank 0 alone decomposes, writes artifacts and reports.
"""

from __future__ import annotations

import os
from datetime import timedelta


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` under ``torch.distributed``, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def dist_backend() -> str | None:
    """The process group's backend (``nccl``, ``gloo``), ``None`` without ``torch.distributed``."""
    import torch.distributed as dist

    return str(dist.get_backend()) if dist.is_available() and dist.is_initialized() else None


def broadcast(value):
    """Rank 0's ``value`` on every rank (identity without ``torch.distributed``)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def init_from_env() -> str | None:
    """Join the process group torchrun describes; returns this rank's device (``cuda:LOCAL_RANK`` or ``cpu``).

    Returns ``None`` when not launched by torchrun (``WORLD_SIZE`` unset or 1).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    # Collectives wait for the slowest rank's calibration shard; the default 10 minutes can be too short at SD size.
    raw = os.environ.get("SLIMEXPORT_DIST_TIMEOUT_S", "3600")
    try:
        timeout = timedelta(seconds=float(raw))
    except ValueError:
        from slimexport.errors import UsageError

        raise UsageError(f"SLIMEXPORT_DIST_TIMEOUT_S={raw!r} is not a number of seconds", "set it to e.g. 3600") from None
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local), timeout=timeout)
        return f"cuda:{local}"
    dist.init_process_group("gloo", timeout=timeout)
    return "cpu"


def shutdown() -> None:
    """Leave the process group, without a barrier: the other ranks finish after calibration while rank 0 goes on
    for minutes (decompose, export, verify), and a rank that failed must exit (torchrun then stops the rest)
    rather than wait in a collective its peers never join."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
