"""Splitting work across processes: ``--shard i/n`` (no process group: job arrays, preemptible nodes)
and ``torchrun`` (ranks from the environment; ``torch.distributed`` for rendezvous and a final barrier
only, never in the hot path). Core layer; the commands use it.

Which work a shard does is decided by the caller from (i, n) alone (e.g. ``surface.dataset.owned_chunks``);
random draws never depend on the rank, so the merged result equals a one-process run bit for bit on CPU.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist


def parse_shard(text: str) -> tuple[int, int]:
    """``"1/4"`` -> (1, 4); i in 0..n-1."""
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r} is not i/n, e.g. 0/4 (shard i of n, counted from 0)") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text!r} is not allowed; use i/n with n >= 1 and i in 0..n-1")
    return i, n


def from_env() -> tuple[int, int] | None:
    """(rank, world size) when launched by torchrun with more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


@contextlib.contextmanager
def process_group(device: str, timeout_s: float):
    """A process group for rendezvous and barriers: gloo on CPU, nccl on CUDA."""
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier(timeout_s: float):
    """Wait for every rank; a rank that died or hangs fails the wait after ``timeout_s`` (gloo names it)."""
    if dist.get_backend() == "gloo":
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
    else:
        dist.barrier()
